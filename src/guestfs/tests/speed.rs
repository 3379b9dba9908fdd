//! A quick local speed check, not a benchmark and never a timing assertion:
//! `cargo test --no-default-features --lib guestfs::tests::speed -- --ignored --nocapture`.
//! It lists a 10,000-file tree (10 directories of 1,000 files; readdir + getattr of every
//! entry, cold caches) and reads a 100 MB file with 128 KiB reads (what FUSE sends) from a
//! page-cached image. (mcopy is quadratic in the size of one directory, hence 10 × 1,000.)

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use super::harness::*;
use crate::guestfs::{open, Device, FileDevice};

/// Counts `read_at` calls.
struct Counting(FileDevice, std::sync::atomic::AtomicU64);

impl Device for Counting {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.read_at(buf, offset)
    }
}

fn measure(label: &str, img: &std::path::Path) {
    let _ = std::fs::read(img).unwrap(); // warm the page cache
    let dev = Arc::new(Counting(FileDevice::open(img).unwrap(), 0.into()));
    let fs = open(dev.clone()).unwrap().unwrap();
    let t = Instant::now();
    let mut stack = vec![fs.resolve(b"many").unwrap().ino];
    let mut entries = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in fs.readdir(dir).unwrap() {
            if fs.getattr(e.ino).unwrap().kind == crate::guestfs::Kind::Dir {
                stack.push(e.ino);
            }
            entries.push(e);
        }
    }
    let list = t.elapsed();
    let calls = dev.1.swap(0, std::sync::atomic::Ordering::Relaxed);
    let a = fs.resolve(b"big100").unwrap();
    let mut buf = vec![0u8; 128 << 10];
    let t = Instant::now();
    let mut off = 0;
    loop {
        let n = fs.read(a.ino, off, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        off += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{label}: list {} entries in {:.1} ms ({calls} device reads); read {} MB in {:.0} ms = {:.0} MB/s ({} device reads)",
        entries.len(),
        list.as_secs_f64() * 1e3,
        off / 1_000_000,
        secs * 1e3,
        off as f64 / 1e6 / secs,
        dev.1.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
#[ignore = "speed check; run by hand with --ignored --nocapture"]
fn speed() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for d in 0..10 {
        std::fs::create_dir_all(src.join(format!("many/dir{d}"))).unwrap();
        for i in 0..1000 {
            std::fs::write(
                src.join(format!("many/dir{d}/file-{i:05}.txt")),
                format!("{i}"),
            )
            .unwrap();
        }
    }
    std::fs::write(src.join("big100"), pattern(9, 100_000_000)).unwrap();
    let img = t.path().join("ext4.img");
    blank(&img, 400 << 20);
    run(Command::new(tool("mke2fs", "e2fsprogs"))
        .args(["-q", "-F", "-t", "ext4", "-N", "20000", "-d"])
        .arg(&src)
        .arg(&img));
    measure("ext4", &img);
    let img = t.path().join("fat32.img");
    blank(&img, 400 << 20);
    run(Command::new(tool("mkfs.vfat", "dosfstools"))
        .args(["-F", "32"])
        .arg(&img));
    run(Command::new(tool("mcopy", "mtools"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-i"])
        .arg(&img)
        .arg(src.join("many"))
        .arg(src.join("big100"))
        .arg("::/"));
    measure("vfat", &img);
    let img = super::ntfs_image(t.path(), &src, 400 << 20);
    measure("ntfs", &img);
}
