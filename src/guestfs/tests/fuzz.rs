//! Hostile input: flip random bytes in the metadata areas of real images and walk the whole
//! tree. Every call must return `Ok` or `Err`: no panic, no hang (each variant runs under a
//! deadline), and bounded work.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::harness::*;
use crate::guestfs::{open, partitions, Device, Filesystem, Kind, Slice};

/// An in-memory copy-on-write view of an image with a few bytes patched.
struct Patched {
    base: Arc<Vec<u8>>,
    patches: Vec<(u64, u8)>,
    reads: Option<Mutex<Vec<(u64, usize)>>>,
}

impl Device for Patched {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset as usize + buf.len();
        let src = self
            .base
            .get(offset as usize..end)
            .ok_or_else(|| std::io::Error::other("past the end"))?;
        buf.copy_from_slice(src);
        for &(at, v) in &self.patches {
            if at >= offset && (at as usize) < end {
                buf[(at - offset) as usize] = v;
            }
        }
        if let Some(r) = &self.reads {
            r.lock().unwrap().push((offset, buf.len()));
        }
        Ok(())
    }
}

/// Visits everything reachable (bounded), reading the start of every file; returns the
/// number of entries seen.
fn walk(fs: &dyn Filesystem, read_data: bool) -> usize {
    let mut seen = HashSet::new();
    let mut stack = vec![fs.root()];
    let mut steps = 0;
    while let Some(dir) = stack.pop() {
        if !seen.insert(dir) || steps > 20_000 {
            continue;
        }
        let Ok(entries) = fs.readdir(dir) else {
            continue;
        };
        for e in entries {
            steps += 1;
            let _ = fs.lookup(dir, &e.name);
            let Ok(a) = fs.getattr(e.ino) else { continue };
            match a.kind {
                Kind::Dir => stack.push(a.ino),
                Kind::Symlink => drop(fs.readlink(a.ino)),
                Kind::File if read_data => {
                    let mut buf = vec![0u8; 64 << 10];
                    for k in 0..4u64 {
                        let _ = fs.read(a.ino, k * (64 << 10), &mut buf);
                    }
                    let _ = fs.read(a.ino, a.size.saturating_sub(100), &mut buf);
                }
                _ => {}
            }
        }
    }
    let _ = fs.resolve(b"a/b/c/deep.txt");
    steps
}

/// Opens the filesystem (or the partitions of a disk) and walks it; returns the number of
/// partitions plus entries seen.
fn exercise(dev: Arc<dyn Device>, read_data: bool) -> usize {
    let mut seen = 0;
    if let Ok(parts) = partitions(&*dev) {
        seen += parts.len();
        for p in parts.iter().take(8) {
            if let Ok(s) = Slice::partition(dev.clone(), p) {
                if let Ok(Some(fs)) = open(Arc::new(s)) {
                    seen += walk(&*fs, read_data);
                }
            }
        }
    }
    if let Ok(Some(fs)) = open(dev) {
        seen += walk(&*fs, read_data);
    }
    seen
}

/// Byte ranges read while opening and walking without file data: the metadata areas.
fn metadata_ranges(base: &Arc<Vec<u8>>) -> Vec<(u64, usize)> {
    let dev = Arc::new(Patched {
        base: base.clone(),
        patches: Vec::new(),
        reads: Some(Mutex::new(Vec::new())),
    });
    exercise(dev.clone(), false);
    let mut r = dev.reads.as_ref().unwrap().lock().unwrap().clone();
    r.sort();
    r.dedup();
    assert!(!r.is_empty());
    r
}

/// Variants per image: 200, or `GUESTFS_FUZZ_VARIANTS` for a longer local run.
fn fuzz_image(name: &str, img: &Path, variants: u64) {
    let variants = std::env::var("GUESTFS_FUZZ_VARIANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(variants);
    let base = Arc::new(std::fs::read(img).unwrap());
    let ranges = metadata_ranges(&base);
    let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let nonzero: Vec<u64> = ranges
        .iter()
        .flat_map(|&(off, len)| (off..off + len as u64).filter(|&p| base[p as usize] != 0))
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    let mut rng =
        0x5eed_0000 ^ name.len() as u64 ^ blake3::hash(name.as_bytes()).as_bytes()[0] as u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut deep = 0;
    for v in 0..variants {
        let mut patches = Vec::new();
        for _ in 0..1 + next() % 8 {
            // Mostly hit bytes that carry something (zeros are mostly unused space).
            let at = if next() % 4 != 0 && !nonzero.is_empty() {
                nonzero[(next() % nonzero.len() as u64) as usize]
            } else {
                let mut k = next() % total;
                let r = ranges.iter().find(|r| {
                    let hit = k < r.1 as u64;
                    if !hit {
                        k -= r.1 as u64;
                    }
                    hit
                });
                r.unwrap().0 + k
            };
            patches.push((at, base[at as usize] ^ (1 + (next() % 255) as u8)));
        }
        let dev = Arc::new(Patched {
            base: base.clone(),
            patches: patches.clone(),
            reads: None,
        });
        let (tx, rx) = mpsc::channel();
        let h = std::thread::spawn(move || {
            let _ = tx.send(exercise(dev, true));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(n) => {
                h.join().unwrap();
                deep += (n > 0) as u64;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{name} variant {v} panicked; patches {patches:?}")
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{name} variant {v} hangs; patches {patches:?}")
            }
        }
    }
    println!("{name}: {variants} variants over {total} metadata bytes, {deep} still readable");
    assert!(
        deep * 4 >= variants,
        "most variants must get past the superblock for the fuzzing to mean something"
    );
}

fn small_tree(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(
        &src,
        TreeOpts {
            posix: true,
            specials: true,
            huge_sparse: false,
            many: 0,
        },
    );
    src
}

#[test]
fn fuzz_ext() {
    let t = tempfile::tempdir().unwrap();
    let src = small_tree(t.path());
    for (i, args) in [
        &["-t", "ext4"][..],
        &["-t", "ext2", "-b", "1024"],
        &["-t", "ext4", "-O", "inline_data"],
    ]
    .iter()
    .enumerate()
    {
        let img = t.path().join(format!("ext{i}.img"));
        blank(&img, 24 << 20);
        run(Command::new(tool("mke2fs", "e2fsprogs"))
            .arg("-q")
            .arg("-F")
            .args(*args)
            .arg("-d")
            .arg(&src)
            .arg(&img));
        fuzz_image(&format!("ext{i}"), &img, 200);
    }
}

#[test]
fn fuzz_fat() {
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
    for (bits, extra) in [("12", &[][..]), ("32", &["-S", "512", "-s", "1"])] {
        let img = t.path().join(format!("fat{bits}.img"));
        blank(&img, if bits == "12" { 16 << 20 } else { 40 << 20 });
        run(Command::new(tool("mkfs.vfat", "dosfstools"))
            .args(["-F", bits])
            .args(extra)
            .arg(&img));
        let mut cp = Command::new(tool("mcopy", "mtools"));
        cp.env("MTOOLS_SKIP_CHECK", "1")
            .args(["-s", "-m", "-i"])
            .arg(&img);
        for e in std::fs::read_dir(&src).unwrap() {
            cp.arg(e.unwrap().path());
        }
        run(cp.arg("::/"));
        fuzz_image(&format!("fat{bits}"), &img, 200);
    }
}

#[test]
fn fuzz_ntfs() {
    let t = tempfile::tempdir().unwrap();
    let src = small_tree(t.path());
    let img = super::ntfs_image(t.path(), &src, 24 << 20);
    fuzz_image("ntfs", &img, 200);
}

#[test]
fn fuzz_partition_tables() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("gpt.img");
    blank(&img, 8 << 20);
    run(Command::new(tool("sgdisk", "gdisk"))
        .args(["-n", "1:2048:+2M", "-n", "2:0:0"])
        .arg(&img));
    fuzz_image("gpt", &img, 200);
    let img = t.path().join("mbr.img");
    blank(&img, 64 << 20);
    let mut child = Command::new(tool("sfdisk", "fdisk"))
        .arg("-q")
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let script = "label: dos\nstart=2048, size=8192, type=83\nstart=10240, size=81920, type=5\n\
                  start=12288, size=4096, type=83\nstart=18432, size=4096, type=c\n";
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    fuzz_image("mbr", &img, 200);
}
