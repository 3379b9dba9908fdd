//! Tests on real images built with real tools (mke2fs, mkfs.vfat + mcopy, mkntfs + ntfs-3g,
//! sgdisk, sfdisk), compared against the source tree and `stat`.
//!
//! Packages: e2fsprogs, dosfstools, mtools, ntfs-3g, gdisk, fdisk (a missing tool fails the
//! test with the `apt-get install` command).

mod fuzz;
mod harness;
mod speed;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use self::harness::*;
use super::{open, partitions, Device, Filesystem, Kind, Slice};

fn ext_image(
    dir: &Path,
    fstype: &str,
    args: &[&str],
    opts: TreeOpts,
    size: u64,
) -> Box<dyn Filesystem> {
    let mke2fs = tool("mke2fs", "e2fsprogs");
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(&src, opts);
    let img = dir.join("fs.img");
    blank(&img, size);
    run(Command::new(mke2fs)
        .args(["-q", "-F", "-t", fstype])
        .args(args)
        .arg("-d")
        .arg(&src)
        .arg(&img));
    let fs = open(device(&img))
        .unwrap()
        .expect("ext filesystem detected");
    // mke2fs -d keeps whole seconds only; nanoseconds are checked with debugfs below.
    let checks = Checks {
        owners_and_modes: true,
        nlink: true,
        mtime_res: 1_000_000_000,
        specials: opts.specials,
    };
    compare_tree(&*fs, &src, checks);
    fs
}

const FULL: TreeOpts = TreeOpts {
    posix: true,
    specials: true,
    huge_sparse: true,
    many: 0,
};

#[test]
fn ext4_matches_source_tree() {
    let t = tempfile::tempdir().unwrap();
    let opts = TreeOpts {
        many: 10_000,
        ..FULL
    };
    let fs = ext_image(
        t.path(),
        "ext4",
        &["-b", "4096", "-N", "20000"],
        opts,
        160 << 20,
    );
    assert_eq!(fs.kind(), "ext4");
    assert_eq!(
        fs.readdir(fs.resolve(b"many").unwrap().ino).unwrap().len(),
        10_000
    );
    // Lookups and errors.
    let hello = fs.resolve(b"/a//hello.txt").unwrap();
    assert_eq!(fs.lookup(fs.root(), b"missing").unwrap(), None);
    assert_eq!(
        fs.resolve(b"a/hello.txt/x").unwrap_err().errno(),
        libc::ENOTDIR
    );
    assert_eq!(fs.readdir(hello.ino).unwrap_err().errno(), libc::ENOTDIR);
    assert_eq!(fs.readlink(hello.ino).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(
        fs.read(fs.root(), 0, &mut [0u8; 4]).unwrap_err().errno(),
        libc::EISDIR
    );
    assert_eq!(
        fs.getattr(u32::MAX as u64 + 7).unwrap_err().errno(),
        libc::ENOENT
    );
    let link = fs.resolve(b"link_short").unwrap();
    assert_eq!(link.kind, Kind::Symlink, "resolve follows no symlinks");
    assert!(hello.crtime.is_some());
}

#[test]
fn ext4_nanoseconds_and_post_2038_times() {
    let t = tempfile::tempdir().unwrap();
    let opts = TreeOpts {
        posix: false,
        specials: false,
        huge_sparse: false,
        many: 0,
    };
    drop(ext_image(t.path(), "ext4", &[], opts, 32 << 20));
    let img = t.path().join("fs.img");
    // nanoseconds 123456789 with epoch bits 1 (mtime + 2^32 s); atime without epoch bits.
    let debugfs = tool("debugfs", "e2fsprogs");
    for (field, value) in [("mtime_extra", "0x1d6f3455"), ("atime_extra", "0x00000028")] {
        run(Command::new(&debugfs)
            .args(["-w", "-R", &format!("sif /a/hello.txt {field} {value}")])
            .arg(&img));
    }
    let fs = open(device(&img)).unwrap().unwrap();
    let a = fs.resolve(b"a/hello.txt").unwrap();
    let src = std::fs::symlink_metadata(t.path().join("src/a/hello.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        a.mtime,
        super::Time {
            secs: src.mtime() + (1 << 32),
            nanos: 123_456_789
        }
    );
    assert_eq!(a.atime.nanos, 10);
}

#[test]
fn ext3_with_1k_blocks_and_indirect_maps() {
    let t = tempfile::tempdir().unwrap();
    let opts = TreeOpts { many: 2000, ..FULL };
    let fs = ext_image(
        t.path(),
        "ext3",
        &["-b", "1024", "-N", "8000"],
        opts,
        96 << 20,
    );
    assert_eq!(fs.kind(), "ext3");
}

#[test]
fn ext2_with_indirect_maps() {
    let t = tempfile::tempdir().unwrap();
    let fs = ext_image(t.path(), "ext2", &["-b", "4096"], FULL, 64 << 20);
    assert_eq!(fs.kind(), "ext2");
}

#[test]
fn ext4_inline_data_and_128_byte_inodes() {
    let t = tempfile::tempdir().unwrap();
    let opts = TreeOpts {
        huge_sparse: false,
        ..FULL
    };
    let fs = ext_image(
        t.path(),
        "ext4",
        &["-O", "inline_data", "-I", "256"],
        opts,
        64 << 20,
    );
    assert_eq!(fs.kind(), "ext4");
    let t2 = tempfile::tempdir().unwrap();
    let opts = TreeOpts {
        huge_sparse: false,
        specials: false,
        ..FULL
    };
    ext_image(t2.path(), "ext4", &["-I", "128"], opts, 64 << 20);
}

fn fat_image(bits: &str, size: u64, extra: &[&str]) {
    let (mkfs, mcopy) = (tool("mkfs.vfat", "dosfstools"), tool("mcopy", "mtools"));
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(
        &src,
        TreeOpts {
            posix: false,
            specials: false,
            huge_sparse: false,
            many: 0,
        },
    );
    let img = t.path().join("fat.img");
    blank(&img, size);
    run(Command::new(mkfs).args(["-F", bits]).args(extra).arg(&img));
    let mut cp = Command::new(mcopy);
    cp.env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-m", "-i"])
        .arg(&img);
    for e in std::fs::read_dir(&src).unwrap() {
        cp.arg(e.unwrap().path());
    }
    run(cp.arg("::/"));
    let fs = open(device(&img)).unwrap().expect("FAT detected");
    assert_eq!(fs.kind(), "vfat");
    let checks = Checks {
        owners_and_modes: false,
        nlink: true,
        mtime_res: 2_000_000_000,
        specials: false,
    };
    compare_tree(&*fs, &src, checks);
    // FAT names are case-insensitive.
    let a = fs.resolve(b"A/HELLO.TXT").unwrap();
    assert_eq!((a.perm, a.uid, a.kind), (0o644, 0, Kind::File));
    assert_eq!(fs.readlink(a.ino).unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn fat12_with_long_names() {
    fat_image("12", 16 << 20, &[]);
}

#[test]
fn fat16_with_long_names() {
    fat_image("16", 64 << 20, &[]);
}

#[test]
fn fat32_with_small_clusters() {
    fat_image("32", 64 << 20, &["-S", "512", "-s", "1"]);
}

/// Builds an NTFS image from `src` through an ntfs-3g mount.
pub(super) fn ntfs_image(dir: &Path, src: &Path, size: u64) -> std::path::PathBuf {
    let mkntfs = tool("mkntfs", "ntfs-3g");
    let img = dir.join("ntfs.img");
    blank(&img, size);
    run(Command::new(mkntfs).args(["-F", "-Q", "-q"]).arg(&img));
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = NtfsMount::new(&img, &mnt);
    let mut cp = Command::new("cp");
    cp.args(["-a", "--sparse=always"]);
    for e in std::fs::read_dir(src).unwrap() {
        cp.arg(e.unwrap().path());
    }
    run(cp.arg(&mnt));
    m.finish();
    img
}

#[test]
fn ntfs_matches_source_tree() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(&src, TreeOpts { many: 2000, ..FULL });
    let img = ntfs_image(t.path(), &src, 256 << 20);
    let fs = open(device(&img)).unwrap().expect("NTFS detected");
    assert_eq!(fs.kind(), "ntfs");
    let checks = Checks {
        owners_and_modes: false,
        nlink: true,
        mtime_res: 100,
        specials: true,
    };
    compare_tree(&*fs, &src, checks);
    let names: Vec<Vec<u8>> = fs
        .readdir(fs.root())
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(b"$")),
        "metadata files are hidden"
    );
    let d = fs.resolve(b"a").unwrap();
    assert_eq!((d.perm, d.uid, d.gid), (0o755, 0, 0));
    assert_eq!(
        fs.resolve(b"A/Hello.TXT").unwrap().ino,
        fs.resolve(b"hard1").unwrap().ino
    );
}

/// `sfdisk --json` of an image: (number, start sector, sectors, type, name).
fn sfdisk_view(img: &Path) -> Vec<(u32, u64, u64, String, String)> {
    let out = Command::new(tool("sfdisk", "fdisk"))
        .arg("--json")
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = img.to_str().unwrap();
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let number = node[name.len()..].parse().unwrap();
            let s = |k: &str| p[k].as_str().unwrap_or("").to_lowercase();
            (
                number,
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
                s("type"),
                s("name"),
            )
        })
        .collect()
}

fn check_against_sfdisk(img: &Path, gpt: bool) -> Vec<super::Partition> {
    let parts = partitions(&*device(img)).unwrap();
    let want = sfdisk_view(img);
    assert_eq!(parts.len(), want.len());
    for (p, w) in parts.iter().zip(&want) {
        assert_eq!((p.number, p.start, p.len), (w.0, w.1 * 512, w.2 * 512));
        if gpt {
            assert_eq!(
                (p.kind.as_str(), p.name.to_lowercase().as_str()),
                (w.3.as_str(), w.4.as_str())
            );
        } else {
            assert_eq!(p.kind, format!("0x{:0>2}", w.3));
        }
    }
    parts
}

#[test]
fn gpt_partitions() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk.img");
    blank(&img, 64 << 20);
    run(Command::new(tool("sgdisk", "gdisk"))
        .args(["-n", "1:2048:+8M", "-t", "1:ef00", "-c", "1:EFI system"])
        .args([
            "-n",
            "3:0:+4M",
            "-t",
            "3:8200",
            "-n",
            "2:0:0",
            "-t",
            "2:8300",
            "-c",
            "2:root fs ✓",
        ])
        .arg(&img));
    let parts = check_against_sfdisk(&img, true);
    assert_eq!(parts[0].kind, "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    assert_eq!(parts[1].name, "root fs ✓");
    // A disk without a table, and one whose primary GPT header is damaged.
    let plain = t.path().join("plain.img");
    blank(&plain, 1 << 20);
    assert!(partitions(&*device(&plain)).unwrap().is_empty());
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"XXXX", 512 + 20).unwrap();
    assert_eq!(
        partitions(&*device(&img)).unwrap(),
        parts,
        "backup GPT header is used"
    );
}

#[test]
fn mbr_with_extended_and_logical_partitions() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk.img");
    blank(&img, 64 << 20);
    let script = "label: dos\nstart=2048, size=8192, type=83\nstart=10240, size=81920, type=5\n\
                  start=12288, size=4096, type=83\nstart=18432, size=4096, type=c\n\
                  start=24576, size=2048, type=82\nstart=92160, size=4096, type=7\n";
    let mut child = Command::new(tool("sfdisk", "fdisk"))
        .arg("-q")
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let parts = check_against_sfdisk(&img, false);
    let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3, 5, 6, 7]);
}

#[test]
fn whole_disk_gpt_with_esp_and_ext4() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello.txt"), b"hi\n").unwrap();
    let (esp, root) = (t.path().join("esp.img"), t.path().join("root.img"));
    blank(&esp, 40 << 20);
    run(Command::new(tool("mkfs.vfat", "dosfstools"))
        .args(["-F", "32", "-S", "512", "-s", "1"])
        .arg(&esp));
    run(Command::new(tool("mcopy", "mtools"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&esp)
        .arg(src.join("hello.txt"))
        .arg("::/"));
    blank(&root, 24 << 20);
    run(Command::new(tool("mke2fs", "e2fsprogs"))
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(&root));
    let disk = t.path().join("disk.img");
    blank(&disk, 66 << 20);
    run(Command::new(tool("sgdisk", "gdisk"))
        .args(["-n", "1:2048:+40M", "-t", "1:ef00", "-n", "2:0:+24M"])
        .arg(&disk));
    let parts = partitions(&*device(&disk)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for (p, img) in parts.iter().zip([&esp, &root]) {
        std::os::unix::fs::FileExt::write_all_at(&f, &std::fs::read(img).unwrap(), p.start)
            .unwrap();
    }
    let dev = device(&disk);
    assert!(
        open(dev.clone()).unwrap().is_none(),
        "a partitioned disk is no filesystem"
    );
    let kinds: Vec<&str> = parts
        .iter()
        .map(|p| {
            let fs = open(Arc::new(Slice::partition(dev.clone(), p).unwrap()))
                .unwrap()
                .unwrap();
            let a = fs.resolve(b"hello.txt").unwrap();
            let mut buf = [0u8; 16];
            let n = fs.read(a.ino, 0, &mut buf).unwrap();
            assert_eq!(&buf[..n], b"hi\n");
            fs.kind()
        })
        .collect();
    assert_eq!(kinds, ["vfat", "ext4"]);
}

/// A device that can be told to fail every read.
struct Failing {
    inner: Arc<dyn Device>,
    fail: std::sync::atomic::AtomicBool,
}

impl Device for Failing {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("injected failure"));
        }
        self.inner.read_at(buf, offset)
    }
}

#[test]
fn device_errors_surface_as_io() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(
        &src,
        TreeOpts {
            posix: false,
            specials: false,
            huge_sparse: false,
            many: 0,
        },
    );
    let img = t.path().join("fs.img");
    blank(&img, 32 << 20);
    run(Command::new(tool("mke2fs", "e2fsprogs"))
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(&img));
    let ntfs = ntfs_image(t.path(), &src, 32 << 20);
    for img in [img, ntfs] {
        let img = &img;
        let dev = Arc::new(Failing {
            inner: device(img),
            fail: false.into(),
        });
        let fs = open(dev.clone()).unwrap().unwrap();
        let big = fs.resolve(b"big.bin").unwrap();
        let medium = fs.resolve(b"medium").unwrap();
        dev.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let err = fs.read(big.ino, 0, &mut vec![0u8; 1 << 20]).unwrap_err();
        assert!(err.is_io() && err.errno() == libc::EIO, "{err}");
        let err = fs.readdir(medium.ino).unwrap_err();
        assert!(err.is_io(), "{img:?}: {err}");
        assert!(open(dev.clone()).err().is_some_and(|e| e.is_io()));
    }
}

#[test]
fn concurrent_walks_agree() {
    let t = tempfile::tempdir().unwrap();
    let fs: Arc<dyn Filesystem> = Arc::from(ext_image(
        t.path(),
        "ext4",
        &[],
        TreeOpts { many: 500, ..FULL },
        64 << 20,
    ));
    let src = t.path().join("src");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let checks = Checks {
                    owners_and_modes: true,
                    nlink: true,
                    mtime_res: 1_000_000_000,
                    specials: true,
                };
                compare_tree(&*fs, &src, checks)
            });
        }
    });
}
