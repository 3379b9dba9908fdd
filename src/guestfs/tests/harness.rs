//! Shared test harness: tools, a source tree with every kind of object, image builders and
//! a tree comparison against the source's `stat`.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use crate::guestfs::{Attr, Device, FileDevice, Filesystem, Kind};

/// The full path of `tool`; fails the test with the install command when it is missing.
pub fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is missing: install it with `apt-get install -y --no-install-recommends {package}`"
    );
}

/// Runs a command to success, with UTC times and a UTF-8 locale (mtools and FAT times).
pub fn run(cmd: &mut Command) {
    cmd.env("TZ", "UTC").env("LC_ALL", "C.UTF-8");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Which objects a source tree gets (FAT cannot hold links, special files or owners).
#[derive(Clone, Copy)]
pub struct TreeOpts {
    pub posix: bool,
    pub specials: bool,
    pub huge_sparse: bool,
    pub many: usize,
}

fn touch(path: &Path, secs: i64, nanos: i64) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: secs - 1000,
            tv_nsec: nanos,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
    ];
    // SAFETY: a NUL-terminated path and two initialised timespecs that outlive the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {path:?}");
}

/// Builds the source tree under `root`.
pub fn make_tree(root: &Path, o: TreeOpts) {
    let w = |p: &str, data: &[u8]| fs::write(root.join(p), data).unwrap();
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    w("a/b/c/deep.txt", b"deep inside\n");
    w("a/hello.txt", b"hello world\n");
    w("empty", b"");
    w("with space.txt", b"spaces\n");
    w(
        "\u{fc}n\u{ef}c\u{f8}d\u{e9}-\u{6587}\u{4ef6}.txt",
        "unicode ✓\n".as_bytes(),
    );
    w(&"n".repeat(255), b"a 255-byte name\n");
    w("big.bin", &pattern(1, 3 * 1024 * 1024 + 123));
    let sparse = fs::File::create(root.join("sparse.bin")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    sparse.write_all_at(&pattern(2, 5000), 0).unwrap();
    sparse.write_all_at(&pattern(3, 70_000), 5 << 20).unwrap();
    // Data at the very end too: mke2fs -O inline_data drops a trailing hole from the size.
    sparse.write_all_at(b"end", (8 << 20) - 3).unwrap();
    fs::create_dir(root.join("medium")).unwrap();
    for i in 0..300 {
        w(
            &format!("medium/file number {i:04}.txt"),
            format!("{i}\n").as_bytes(),
        );
    }
    if o.many > 0 {
        fs::create_dir(root.join("many")).unwrap();
        for i in 0..o.many {
            w(&format!("many/f{i:05}"), format!("{i}").as_bytes());
        }
    }
    if o.huge_sparse {
        let f = fs::File::create(root.join("huge.bin")).unwrap();
        f.set_len(5 << 30).unwrap();
        f.write_all_at(&pattern(4, 8192), (4 << 30) + (512 << 20))
            .unwrap();
    }
    if o.posix {
        add_links_and_owners(root);
    }
    if o.specials {
        add_specials(root);
    }
    // Times with nanoseconds, set last (children first so directory times stick).
    let mut paths = walk_source(root);
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in paths.iter().enumerate() {
        touch(
            &root.join(p),
            1_600_000_000 + i as i64 * 7,
            123_456_789 + i as i64,
        );
    }
}

/// Symlinks (short, > 60 bytes, dangling), hard links, modes and owners.
fn add_links_and_owners(root: &Path) {
    std::os::unix::fs::symlink("a/b", root.join("link_short")).unwrap();
    let long = format!("a/b/c/{}/../../deep.txt", "x".repeat(80));
    std::os::unix::fs::symlink(long, root.join("link_long")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("a/dangling")).unwrap();
    fs::hard_link(root.join("a/hello.txt"), root.join("hard1")).unwrap();
    fs::hard_link(root.join("a/hello.txt"), root.join("a/b/hard2")).unwrap();
    // Enough names that NTFS spills them into extension records (an attribute list).
    fs::create_dir(root.join("links")).unwrap();
    for i in 0..150 {
        let name = format!("links/a rather long hard link name number {i:03}");
        fs::hard_link(root.join("a/b/c/deep.txt"), root.join(name)).unwrap();
    }
    fs::set_permissions(root.join("a/hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("big.bin"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(root.join("big.bin"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(root.join("link_short"), Some(42), Some(43)).unwrap();
}

/// A FIFO and device nodes (root only).
fn add_specials(root: &Path) {
    let p = |s: &str| {
        std::ffi::CString::new(root.join(s).into_os_string().into_encoded_bytes()).unwrap()
    };
    // SAFETY: NUL-terminated paths that live until each call returns.
    unsafe {
        assert_eq!(libc::mkfifo(p("fifo").as_ptr(), 0o644), 0);
        assert_eq!(
            libc::mknod(
                p("chardev").as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(1, 3)
            ),
            0
        );
        assert_eq!(
            libc::mknod(
                p("blockdev").as_ptr(),
                libc::S_IFBLK | 0o600,
                libc::makedev(259, 300)
            ),
            0
        );
    }
}

/// Paths (relative, without the root) of everything under `root`.
pub fn walk_source(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out
}

/// How a filesystem's view is checked against the source.
#[derive(Clone, Copy)]
pub struct Checks {
    pub owners_and_modes: bool,
    pub nlink: bool,
    /// Time resolution in nanoseconds (FAT: 2 s, NTFS: 100 ns).
    pub mtime_res: u64,
    pub specials: bool,
}

fn kind_of(m: &fs::Metadata) -> Kind {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    match () {
        _ if t.is_dir() => Kind::Dir,
        _ if t.is_symlink() => Kind::Symlink,
        _ if t.is_fifo() => Kind::Fifo,
        _ if t.is_char_device() => Kind::CharDev,
        _ if t.is_block_device() => Kind::BlockDev,
        _ if t.is_socket() => Kind::Socket,
        _ => Kind::File,
    }
}

/// Compares file contents: whole files up to 64 MiB, else the source's data extents.
fn compare_content(fs: &dyn Filesystem, a: &Attr, src: &Path, size: u64) {
    let f = fs::File::open(src).unwrap();
    let mut windows = Vec::new();
    if size <= 64 << 20 {
        windows.push((0, size));
    } else {
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
        let mut pos = 0i64;
        loop {
            // SAFETY: lseek on an open descriptor; no memory is passed.
            let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if d < 0 {
                break;
            }
            // SAFETY: as above.
            let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
            windows.push((d as u64, (h - d) as u64));
            pos = h;
        }
        windows.push((0, 1 << 20));
        windows.push((size - (1 << 20), 1 << 20));
        windows.push(((4 << 30) - 4096, 8192));
    }
    for (start, len) in windows {
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(1 << 20) as usize;
            let mut want = vec![0u8; n];
            f.read_exact_at(&mut want, off).unwrap();
            let mut got = vec![0xaau8; n];
            assert_eq!(
                fs.read(a.ino, off, &mut got).unwrap(),
                n,
                "{src:?} at {off}"
            );
            assert!(
                blake3::hash(&got) == blake3::hash(&want),
                "content of {src:?} differs at {off}"
            );
            off += n as u64;
        }
    }
    let mut tail = [0u8; 16];
    assert_eq!(
        fs.read(a.ino, size, &mut tail).unwrap(),
        0,
        "read at EOF of {src:?}"
    );
}

/// Walks the source tree and checks every object through `fs`: readdir names, kinds, sizes,
/// contents, symlink targets, times, and (per `c`) owners, modes, link counts and hard links.
pub fn compare_tree(fs: &dyn Filesystem, root: &Path, c: Checks) {
    let mut inos: HashMap<u64, u64> = HashMap::new();
    let mut dirs = vec![PathBuf::new()];
    for rel in walk_source(root) {
        let m = root.join(&rel).symlink_metadata().unwrap();
        let kind = kind_of(&m);
        if kind == Kind::Dir {
            dirs.push(rel.clone());
        }
        if !c.specials && !matches!(kind, Kind::File | Kind::Dir | Kind::Symlink) {
            continue;
        }
        let a = fs
            .resolve(rel.as_os_str().as_encoded_bytes())
            .unwrap_or_else(|e| panic!("resolve {rel:?}: {e}"));
        assert_eq!(a.kind, kind, "kind of {rel:?}");
        if let Some(prev) = inos.insert(m.ino(), a.ino) {
            assert_eq!(prev, a.ino, "hard links of {rel:?} must share an inode");
        }
        check_object(fs, &root.join(&rel), &m, &a, c);
    }
    let root_attr = fs.resolve(b"/").unwrap();
    assert_eq!((root_attr.ino, root_attr.kind), (fs.root(), Kind::Dir));
    for rel in dirs {
        check_entries(fs, root, &rel, c);
    }
}

/// Checks one object's attributes and contents against its source.
fn check_object(fs: &dyn Filesystem, src: &Path, m: &fs::Metadata, a: &Attr, c: Checks) {
    let kind = a.kind;
    // mke2fs -d drops the nanoseconds of symlinks and special files (debugfs shows the
    // same): compare those by the second. FAT keeps no directory times worth checking.
    let res = if matches!(kind, Kind::File | Kind::Dir) {
        c.mtime_res
    } else {
        c.mtime_res.max(1_000_000_000)
    };
    let want_mtime = (m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128) / res as i128;
    let got_mtime = (a.mtime.secs as i128 * 1_000_000_000 + a.mtime.nanos as i128) / res as i128;
    if kind != Kind::Dir || c.mtime_res <= 1_000_000_000 {
        assert_eq!(got_mtime, want_mtime, "mtime of {src:?}");
    }
    if c.owners_and_modes {
        assert_eq!(a.perm as u32, m.mode() & 0o7777, "mode of {src:?}");
        assert_eq!((a.uid, a.gid), (m.uid(), m.gid()), "owner of {src:?}");
    }
    if c.nlink && kind != Kind::Dir {
        assert_eq!(a.nlink as u64, m.nlink(), "nlink of {src:?}");
    }
    match kind {
        Kind::File => {
            assert_eq!(a.size, m.len(), "size of {src:?}");
            compare_content(fs, a, src, m.len());
        }
        Kind::Symlink => {
            let t = fs::read_link(src).unwrap();
            let got = fs.readlink(a.ino).unwrap();
            assert_eq!(got, t.as_os_str().as_encoded_bytes(), "target of {src:?}");
            assert_eq!(a.size, t.as_os_str().len() as u64);
        }
        Kind::CharDev | Kind::BlockDev => {
            let (maj, min) = (libc::major(m.rdev()), libc::minor(m.rdev()));
            let enc = (min & 0xff) | (maj << 8) | ((min & !0xff) << 12);
            assert_eq!(a.rdev, enc, "rdev of {src:?}");
        }
        _ => {}
    }
}

/// Checks that `readdir` lists exactly the source directory's names, with the right kinds.
fn check_entries(fs: &dyn Filesystem, root: &Path, rel: &Path, c: Checks) {
    let a = fs.resolve(rel.as_os_str().as_encoded_bytes()).unwrap();
    let top = rel.as_os_str().is_empty();
    let entries = fs.readdir(a.ino).unwrap();
    let got: BTreeSet<String> = entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .filter(|n| !(top && n == "lost+found"))
        .collect();
    let special = |e: &fs::DirEntry| {
        matches!(
            kind_of(&e.metadata().unwrap()),
            Kind::Fifo | Kind::CharDev | Kind::BlockDev | Kind::Socket
        )
    };
    let want: BTreeSet<String> = fs::read_dir(root.join(rel))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| c.specials || !special(e))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let diff: Vec<_> = got.symmetric_difference(&want).collect();
    assert!(diff.is_empty(), "entries of {rel:?} differ: {diff:?}");
    for e in entries {
        let name = String::from_utf8_lossy(&e.name);
        assert_eq!(
            fs.getattr(e.ino).unwrap().kind,
            e.kind,
            "readdir kind of {name:?}"
        );
    }
}

/// Opens an image file as a device.
pub fn device(path: &Path) -> Arc<dyn Device> {
    Arc::new(FileDevice::open(path).unwrap())
}

/// Creates an all-zero image file of `len` bytes.
pub fn blank(path: &Path, len: u64) {
    fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// An ntfs-3g mount that is unmounted (by path) and waited for when dropped.
pub struct NtfsMount {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl NtfsMount {
    pub fn new(image: &Path, dir: &Path) -> NtfsMount {
        let bin = tool("ntfs-3g", "ntfs-3g");
        let child = Command::new(bin)
            .arg("-o")
            .arg("no_detach")
            .arg(image)
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let m = NtfsMount {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let dev = fs::metadata(dir.parent().unwrap()).unwrap().dev();
        for _ in 0..200 {
            if fs::metadata(dir).map(|md| md.dev() != dev).unwrap_or(false) {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("ntfs-3g did not mount {image:?} (is /dev/fuse available?)");
    }

    /// Unmounts and waits for ntfs-3g to finish writing.
    pub fn finish(mut self) {
        self.unmount();
    }

    fn unmount(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("umount").arg(&self.dir).status();
            let _ = child.wait();
        }
    }
}

impl Drop for NtfsMount {
    fn drop(&mut self) {
        self.unmount();
    }
}
