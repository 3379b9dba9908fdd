//! `holdfast mount` on real FUSE, `holdfast cat` and `holdfast restore-files`: back up real
//! disks (GPT with FAT32 + ext4, MBR with FAT16 + NTFS + a logical ext3, a whole-disk ext2),
//! browse them, and compare every filesystem with its source tree (`diff -r`, then `stat`).
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `holdfast mount`, unmounted and stopped (by PID) when dropped.
struct Mount {
    child: Option<Child>,
    dir: PathBuf,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Mount {
    fn start(repo: &Repo, dir: &Path, extra: &[&str]) -> Mount {
        let _ = std::fs::create_dir(dir); // may exist, or be a stale mount point
        let mut args = vec!["mount", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut child = repo
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        {
            let (mut e, log) = (child.stderr.take().unwrap(), stderr.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = e.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("mounted holdfast backups at"),
            "mount said {line:?}, stderr {}",
            stderr.lock().unwrap()
        );
        Mount {
            child: Some(child),
            dir: dir.to_path_buf(),
            stderr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Wait (bounded) for the mount process to end; its exit code.
    fn wait(&mut self) -> i32 {
        let mut c = self.child.take().unwrap();
        let t = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "holdfast mount did not end"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The stderr seen so far once it holds `needle` (a thread collects stderr,
    /// so a line written before "mounted" may arrive after it); panics after 10 s.
    fn log_with(&self, needle: &str) -> String {
        let t = Instant::now();
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "stderr never said {needle:?}: {log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    /// Also after `wait`: a mount whose process died (a failed assertion about a signal) is
    /// still in the mount table and must not outlive the test.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            let _ = c.kill();
            let _ = c.wait();
        } else if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn is_mounted(dir: &Path) -> bool {
    let want = dir.canonicalize().unwrap_or(dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.to_str().unwrap()))
}

fn diff_r(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    // diff cannot compare FIFOs and says so even when both are FIFOs (compare_meta checks them).
    let text = String::from_utf8_lossy(&out.stdout);
    let special = |l: &str| {
        (l.contains(" is a fifo while file ") && l.ends_with(" is a fifo"))
            || (l.contains(" is a character special file while file ")
                && l.ends_with(" is a character special file"))
    };
    let real = text.lines().filter(|l| !special(l)).count();
    assert!(
        out.status.code() == Some(0) || (out.status.code() == Some(1) && real == 0),
        "diff -r {} {}:\n{}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every path under `root`, relative, sorted.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fs {
    Ext,
    Fat,
    Ntfs,
}

/// Compare `stat` of every entry: kind, size, symlink target, and what the filesystem keeps
/// (ext: mode, owner, mtime; FAT: mtime to 2 s; NTFS: mtime to the second). Hard links of the
/// source share an inode in the copy (`links`: the copy holds every link of the source).
fn compare_meta(src: &Path, got: &Path, fs: Fs, links: bool) {
    let paths = walk(src);
    assert_eq!(
        walk(got),
        paths,
        "{} and {} list different entries",
        src.display(),
        got.display()
    );
    let mut inodes: std::collections::HashMap<u64, u64> = Default::default();
    for rel in &paths {
        let (a, b) = (src.join(rel), got.join(rel));
        let (ma, mb) = (a.symlink_metadata().unwrap(), b.symlink_metadata().unwrap());
        let what = format!("{} vs {}", a.display(), b.display());
        assert_eq!(ma.file_type(), mb.file_type(), "{what}");
        if ma.is_file() {
            assert_eq!(ma.len(), mb.len(), "size of {what}");
        }
        if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&a).unwrap(),
                std::fs::read_link(&b).unwrap(),
                "{what}"
            );
        }
        if ma.file_type().is_char_device() || ma.file_type().is_block_device() {
            assert_eq!(ma.rdev(), mb.rdev(), "device number of {what}");
        }
        match fs {
            Fs::Ext => {
                assert_eq!(ma.mode(), mb.mode(), "mode of {what}");
                assert_eq!(
                    (ma.uid(), ma.gid()),
                    (mb.uid(), mb.gid()),
                    "owner of {what}"
                );
                if !ma.file_type().is_symlink() {
                    assert_eq!(ma.mtime(), mb.mtime(), "mtime of {what}");
                }
                if links && ma.nlink() > 1 && !ma.is_dir() {
                    let prev = inodes.insert(ma.ino(), mb.ino());
                    assert!(
                        prev.is_none_or(|p| p == mb.ino()),
                        "hard links of {what} must share an inode"
                    );
                    assert_eq!(ma.nlink(), mb.nlink(), "link count of {what}");
                }
            }
            Fs::Fat if !ma.is_dir() => assert!(
                (ma.mtime() - mb.mtime()).abs() <= 2,
                "mtime of {what}: {} vs {}",
                ma.mtime(),
                mb.mtime()
            ),
            Fs::Ntfs if !ma.is_dir() => assert_eq!(ma.mtime(), mb.mtime(), "mtime of {what}"),
            _ => {}
        }
    }
}

fn ls(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    v.sort();
    v
}

fn backup_all(repo: &Repo, d: &Path) -> String {
    let m = repo.backup(
        "web",
        &[
            ("gpt", &d.join("gpt.img")),
            ("mbr", &d.join("mbr.img")),
            ("whole", &d.join("whole.img")),
        ],
    );
    m["id"].as_str().unwrap().to_string()
}

#[test]
fn mount_shows_every_backup_down_to_the_guest_files() {
    let d = fs_disks();
    let trees = d.join("trees");
    let repo = Repo::new();
    let id = backup_all(&repo, d);
    let mnt = repo.tmp("mnt");
    let m = Mount::start(&repo, &mnt, &[]);

    assert_eq!(ls(&mnt), vec!["web"]);
    assert_eq!(ls(&mnt.join("web")), vec![id.clone(), "latest".into()]);
    assert_eq!(
        std::fs::read_link(mnt.join("web/latest")).unwrap(),
        PathBuf::from(&id)
    );
    let b = mnt.join("web/latest");
    assert_eq!(
        ls(&b),
        vec!["gpt", "gpt.img", "mbr", "mbr.img", "whole", "whole.img"]
    );
    // Raw disks and partitions, byte for byte.
    for disk in ["gpt", "mbr", "whole"] {
        assert_eq!(
            hash_file(&b.join(format!("{disk}.img"))),
            hash_file(&d.join(format!("{disk}.img"))),
            "{disk}.img"
        );
    }
    assert_eq!(
        ls(&b.join("gpt")),
        vec!["p1", "p1.img", "p2", "p2.img", "p3.img"],
        "p3 holds no filesystem: only its .img"
    );
    assert_eq!(
        ls(&b.join("mbr")),
        vec!["p1", "p1.img", "p2", "p2.img", "p5", "p5.img"],
        "MBR: primaries and the logical p5 (the extended p3 is a container)"
    );
    assert_eq!(
        ls(&b.join("whole")),
        vec!["fs"],
        "a disk without a table shows its filesystem"
    );
    let raw = std::fs::read(b.join("gpt/p3.img")).unwrap();
    let disk = std::fs::read(d.join("gpt.img")).unwrap();
    assert!(
        raw == disk[265 << 20..(265 + 16) << 20],
        "p3.img is the partition's bytes"
    );
    assert_eq!(
        std::fs::metadata(b.join("gpt/p2.img")).unwrap().len(),
        200 << 20
    );
    for img in ["gpt.img", "gpt/p2.img"] {
        let m = std::fs::metadata(b.join(img)).unwrap();
        assert_eq!(
            (m.mode() & 0o777, m.uid()),
            (0o400, 0),
            "{img}: raw images bypass the guest's permissions: root only"
        );
    }

    // Every guest filesystem against its source tree: bytes, then metadata.
    for (got, src, fs) in [
        ("gpt/p2", "root", Fs::Ext),
        ("gpt/p1", "esp", Fs::Fat),
        ("mbr/p1", "fat16", Fs::Fat),
        ("mbr/p2", "ntfs", Fs::Ntfs),
        ("mbr/p5", "ext3", Fs::Ext),
        ("whole/fs", "whole", Fs::Ext),
    ] {
        let (got, src) = (b.join(got), trees.join(src));
        if fs == Fs::Ext {
            // lost+found is made by mke2fs, not in the source tree.
            assert!(got.join("lost+found").is_dir());
            for e in ls(&src) {
                if std::fs::symlink_metadata(src.join(&e)).unwrap().is_dir() {
                    diff_r(&src.join(&e), &got.join(&e));
                    compare_meta(&src.join(&e), &got.join(&e), fs, true);
                }
            }
        } else {
            diff_r(&src, &got);
            compare_meta(&src, &got, fs, true);
        }
    }
    // Hard links share an inode number across the whole filesystem; the mount is read-only.
    let p2 = b.join("gpt/p2");
    let ino = |p: &str| std::fs::metadata(p2.join(p)).unwrap().ino();
    assert_eq!(ino("etc/fstab"), ino("home/user/fstab-hardlink"));
    assert_eq!(ino("etc/fstab"), ino("srv/fstab-hardlink-2"));
    assert_eq!(std::fs::metadata(p2.join("etc/fstab")).unwrap().nlink(), 3);
    assert_ne!(ino("etc/fstab"), ino("etc/nginx/sites/default"));
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(p2.join("etc/fstab"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(std::fs::symlink_metadata(p2.join("srv/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(ls(&p2.join("many")).len(), 10_000);

    // A new backup shows up, and latest follows it.
    let b2 = repo.backup("web", &[("whole", &d.join("whole.img"))]);
    let id2 = b2["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    while std::fs::read_link(mnt.join("web/latest"))
        .unwrap()
        .as_os_str()
        != id2.as_str()
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "latest did not move to {id2}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ls(&mnt.join("web")), {
        let mut v = vec![id.clone(), id2.clone(), "latest".into()];
        v.sort();
        v
    });
    assert_eq!(ls(&mnt.join("web").join(&id2)), vec!["whole", "whole.img"]);
    drop(m);
}

#[test]
fn umount_ctrl_c_and_stale_mounts() {
    let d = fs_disks();
    let repo = Repo::new();
    repo.backup("web", &[("whole", &d.join("whole.img"))]);
    let mnt = repo.tmp("mnt");

    // holdfast umount: the mount process ends with 0 and the directory is plain again.
    let mut m = Mount::start(&repo, &mnt, &[]);
    assert!(is_mounted(&mnt));
    let r = repo.run(&["umount", mnt.to_str().unwrap()]).ok();
    assert!(r.stdout.contains("unmounted"), "{}", r.stdout);
    assert_eq!(m.wait(), 0, "{}", m.log());
    assert!(!is_mounted(&mnt));
    let e = repo.run(&["umount", mnt.to_str().unwrap()]);
    assert!(e.err().contains("is not a holdfast mount"), "{}", e.stderr);

    // Busy: a file held open refuses a plain umount, --lazy detaches.
    let mut m = Mount::start(&repo, &mnt, &[]);
    let f = std::fs::File::open(mnt.join("web/latest/whole/fs/dir/file.txt")).unwrap();
    let e = repo.run(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(e.code, 4);
    assert!(
        e.err().contains("is busy") && e.err().contains("--lazy"),
        "{}",
        e.stderr
    );
    repo.run(&["umount", "--lazy", mnt.to_str().unwrap()]).ok();
    drop(f);
    assert_eq!(m.wait(), 0, "{}", m.log());
    assert!(!is_mounted(&mnt));

    // Ctrl-C (SIGINT) and SIGTERM unmount cleanly.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut m = Mount::start(&repo, &mnt, &[]);
        assert_eq!(ls(&mnt), vec!["web"]);
        common::signal(m.pid(), sig);
        assert_eq!(m.wait(), 0, "signal {sig}: {}", m.log());
        assert!(!is_mounted(&mnt), "signal {sig} left the mount");
    }

    // A killed mount leaves a stale mount point; the next mount cleans it.
    let mut m = Mount::start(&repo, &mnt, &[]);
    common::signal(m.pid(), libc::SIGKILL);
    m.wait();
    assert!(is_mounted(&mnt), "SIGKILL leaves the kernel mount behind");
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN)
    );
    let m = Mount::start(&repo, &mnt, &[]);
    m.log_with("removed a stale holdfast mount");
    assert_eq!(ls(&mnt), vec!["web"]);
    // A second mount on a live one is refused.
    let e = repo.run(&["mount", mnt.to_str().unwrap()]);
    assert_eq!(e.code, 4);
    assert!(
        e.err().contains("is already a holdfast mount"),
        "{}",
        e.stderr
    );
    drop(m);
    // Mounting on nothing, or with --vm of an unknown VM.
    let e = repo.run(&["mount", repo.tmp("nope").to_str().unwrap()]);
    assert!(
        e.err().contains("does not exist; create it first"),
        "{}",
        e.stderr
    );
    let e = repo.run(&["mount", mnt.to_str().unwrap(), "--vm", "ghost"]);
    assert!(
        e.err().contains("no backups of VM \"ghost\""),
        "{}",
        e.stderr
    );
}

/// Flip a byte in the middle of the stored chunk that holds `needle` of disk image `img` in
/// backup `spec` (found through the repository, so it works on encrypted stores too).
fn damage_chunk_holding(repo: &Repo, spec: &str, img: &Path, needle: &[u8]) {
    use holdfast::repo::format::SegEntry;
    let bytes = std::fs::read(img).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the needle is in the disk") as u64;
    let r = holdfast::repo::Repo::open(&repo.path()).unwrap();
    let m = r.resolve(spec).unwrap();
    let d = &m.disks[0];
    let seg = u64::from(d.segment_size);
    let i = at / seg;
    let sid = r.disk_segments(d).unwrap()[i as usize].unwrap();
    let mut pos = i * seg;
    for e in r.seglist(&sid, seg.min(d.size - pos)).unwrap() {
        let len = u64::from(e.len());
        if let SegEntry::Chunk(c, _) = e {
            if (pos..pos + len).contains(&at) {
                let loc = r.locate(&c).unwrap();
                drop(r);
                let pack = repo
                    .path()
                    .join(holdfast::store::pack::pack_key(&hex::encode(loc.pack)));
                let mut p = std::fs::read(&pack).unwrap();
                p[(loc.offset + u64::from(loc.stored_len) / 2) as usize] ^= 0x55;
                std::fs::write(&pack, p).unwrap();
                return;
            }
        }
        pos += len;
    }
    panic!("no chunk holds disk offset {at}");
}

#[test]
fn damaged_chunk_under_a_file_is_eio_and_the_rest_keeps_working() {
    let d = fs_disks();
    let repo = Repo::new();
    let m = repo.backup("web", &[("whole", &d.join("whole.img"))]);
    let id = m["id"].as_str().unwrap();
    let random = std::fs::read(d.join("trees/whole/dir/random")).unwrap();
    damage_chunk_holding(
        &repo,
        &format!("web@{id}"),
        &d.join("whole.img"),
        &random[250_000..250_064],
    );

    let mnt = repo.tmp("mnt");
    let m = Mount::start(&repo, &mnt, &[]);
    let f = mnt.join("web/latest/whole/fs/dir/random");
    let e = std::fs::read(&f).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Reading around the damage works; other files are whole.
    let mut head = vec![0u8; 4096];
    std::fs::File::open(&f)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(head == random[..4096]);
    assert_eq!(
        std::fs::read(mnt.join("web/latest/whole/fs/dir/file.txt")).unwrap(),
        b"whole disk\n"
    );
    let e = std::fs::read(&f).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EIO),
        "still EIO, never cached wrong bytes: {e}"
    );
    let log = m.log_with(&format!("web@{id} disk whole"));
    assert!(
        log.contains("offset"),
        "the damage is logged with backup and offset: {log}"
    );
    drop(m);

    // cat and restore-files say so with exit 3 and leave nothing behind.
    let c = repo.run(&["cat", "web:whole/fs/dir/random"]);
    assert_eq!(c.code, 3, "{}", c.stderr);
    assert!(
        c.err().contains("whole partition fs: /dir/random:") && c.err().contains("holdfast verify"),
        "{}",
        c.stderr
    );
    let to = repo.tmp("restored");
    std::fs::create_dir_all(&to).unwrap();
    let r = repo.run(&[
        "restore-files",
        "web:whole/fs/dir",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(ls(&to).is_empty(), "nothing half-written: {:?}", ls(&to));
}

#[test]
fn cat_and_restore_files_without_mounting() {
    let d = fs_disks();
    let trees = d.join("trees");
    let repo = Repo::new();
    let id = backup_all(&repo, d);

    let c = repo
        .run(&["cat", &format!("web@{id}:gpt/p2/etc/fstab")])
        .ok();
    assert_eq!(
        c.stdout.as_bytes(),
        std::fs::read(trees.join("root/etc/fstab")).unwrap()
    );
    let c = repo
        .cmd(&["cat", "web:gpt/p2/var/lib/app/data.bin"])
        .output()
        .unwrap();
    assert!(c.status.success());
    assert!(
        c.stdout == std::fs::read(trees.join("root/var/lib/app/data.bin")).unwrap(),
        "12 MiB file byte for byte"
    );
    // A symlink is followed inside the guest; NTFS and FAT work the same way.
    let c = repo.run(&["cat", "web:gpt/p2/home/user/fstab-link"]).ok();
    assert_eq!(
        c.stdout.as_bytes(),
        std::fs::read(trees.join("root/etc/fstab")).unwrap()
    );
    let c = repo
        .run(&["cat", "web:gpt/p2/docs-link/a/b/c/d/deep.txt"])
        .ok();
    assert_eq!(
        c.stdout.as_bytes(),
        std::fs::read(trees.join("root/usr/share/doc/a/b/c/d/deep.txt")).unwrap(),
        "a symlink inside the path"
    );
    let c = repo
        .run(&["cat", "web:mbr/p2/Users/Public/Documents/readme.txt"])
        .ok();
    assert_eq!(c.stdout, "windows text\r\n");
    let c = repo.run(&["cat", "web:gpt/p1/loader.conf"]).ok();
    assert_eq!(c.stdout, "timeout 3\n");

    // A directory tree, with owners, modes, times, symlinks and hard links.
    let to = repo.tmp("out");
    std::fs::create_dir_all(&to).unwrap();
    let r = repo
        .run(&[
            "--json",
            "restore-files",
            "web:gpt/p2/home/user",
            "--to",
            to.to_str().unwrap(),
        ])
        .ok()
        .json();
    assert_eq!(
        r["path"].as_str().unwrap(),
        to.join("user").to_str().unwrap()
    );
    diff_r(&trees.join("root/home/user"), &to.join("user"));
    compare_meta(
        &trees.join("root/home/user"),
        &to.join("user"),
        Fs::Ext,
        false,
    );
    // The whole filesystem: hard links inside it are links again, the sparse file stays sparse.
    let r = repo
        .run(&[
            "--json",
            "restore-files",
            "web:gpt/p2/srv",
            "--to",
            to.to_str().unwrap(),
        ])
        .ok()
        .json();
    assert_eq!(
        u(&r, "/skipped_devices"),
        1,
        "device nodes only with --devices: {r}"
    );
    assert!(!to.join("srv/null-dev").exists());
    let r = repo
        .run(&[
            "--json",
            "restore-files",
            "web:gpt/p2",
            "--to",
            to.to_str().unwrap(),
            "--devices",
        ])
        .ok()
        .json();
    let root = to.join("gpt-p2");
    assert_eq!(r["path"].as_str().unwrap(), root.to_str().unwrap());
    assert_eq!(u(&r, "/hardlinks"), 2);
    for e in ["etc", "home", "usr", "var", "srv", "many"] {
        diff_r(&trees.join("root").join(e), &root.join(e));
        compare_meta(&trees.join("root").join(e), &root.join(e), Fs::Ext, true);
    }
    let sparse = std::fs::metadata(root.join("var/lib/app/sparse.img")).unwrap();
    assert_eq!(sparse.len(), 64 << 20);
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "holes stay holes: {} blocks",
        sparse.blocks()
    );
    // One file of an NTFS partition.
    repo.run(&[
        "restore-files",
        "web:mbr/p2/Program Files/App/app.dll",
        "--to",
        to.to_str().unwrap(),
    ])
    .ok();
    assert_same(
        &to.join("app.dll"),
        &trees.join("ntfs/Program Files/App/app.dll"),
    );

    // Bad input: one clear line each, nothing written.
    // Each error: its exit code, its stable code (through --json) and its message.
    let bad = |args: &[&str], code: i32, stable: &str, want: &str| {
        let r = repo.run(args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(r.err().contains(want), "{args:?}: {}", r.stderr);
        let json: Vec<&str> = std::iter::once("--json")
            .chain(args.iter().copied())
            .collect();
        let j = repo.run(&json);
        assert_eq!(j.json()["error"]["code"], stable, "{args:?}: {}", j.stdout);
    };
    let t = to.to_str().unwrap();
    bad(
        &["restore-files", "web:gpt/p2/home/user", "--to", t],
        1,
        "exists",
        "exists; holdfast never overwrites",
    );
    bad(
        &[
            "restore-files",
            "web:gpt/p2/etc",
            "--to",
            "/nonexistent/dir",
        ],
        1,
        "not-found",
        "is not a directory; create it first",
    );
    bad(
        &["cat", "web"],
        2,
        "usage",
        "must be VM[@ID]:DISK/PART/PATH",
    );
    bad(
        &["cat", "web:gpt/p9/etc/fstab"],
        1,
        "not-found",
        "has no partition \"p9\"; its partitions: p1, p2, p3",
    );
    bad(
        &["cat", "web:gpt/p3/x"],
        1,
        "unsupported",
        "holds no filesystem holdfast can read",
    );
    bad(
        &["cat", "web:gpt/p2/etc/nope"],
        1,
        "not-found",
        "no /etc/nope in its filesystem",
    );
    bad(&["cat", "web:gpt/p2/etc"], 2, "usage", "is a directory");
    bad(
        &["cat", "web:gpt/p2/etc/fstab/x"],
        1,
        "guest-fs",
        "gpt partition p2: /etc/fstab/x: not a directory",
    );
    bad(
        &["cat", "web:nodisk/p1/x"],
        1,
        "not-found",
        "has no disk \"nodisk\"; its disks: gpt, mbr, whole",
    );
    bad(&["cat", "ghost:gpt/p2/etc/fstab"], 1, "not-found", "ghost");
    let before = ls(&to);
    assert!(
        !before.iter().any(|n| n.starts_with('.')),
        "no temporary directories left: {before:?}"
    );
}
