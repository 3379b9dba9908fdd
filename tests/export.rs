//! `holdfast export`: any backup as an NBD export, proven with real clients (qemu-img, qemu-io,
//! nbdinfo, nbdcopy, and QEMU itself through qemu-storage-daemon).
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running export; `stop` signals it by its own PID, drop kills it.
struct Served {
    child: Child,
    sock: PathBuf,
    uri: String,
}

impl Served {
    fn start(repo: &Repo, spec: &str, sock: &Path, extra: &[&str]) -> Served {
        let mut args = vec!["export", spec, "--listen"];
        let l = format!("unix:{}", sock.display());
        args.push(&l);
        args.extend_from_slice(extra);
        let mut child = repo
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("serving "), "{line:?}");
        let uri = line.trim().rsplit(' ').next().unwrap().to_string();
        Served {
            child,
            sock: sock.to_path_buf(),
            uri,
        }
    }
    fn stop(mut self, sig: i32) -> std::process::ExitStatus {
        common::signal(self.child.id(), sig);
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "export did not stop on signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into()
}

/// nbdinfo --map as (offset, len, is_hole).
fn map(uri: &str) -> Vec<(u64, u64, bool)> {
    sh(Command::new("nbdinfo").args(["--map", uri]))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2] != "0")
        })
        .collect()
}

#[test]
fn export_serves_a_backup_to_real_clients() {
    require("nbdinfo", "libnbd-bin");
    require("qemu-img", "qemu-utils");
    let d = disks();
    let base = d.join("base.img");
    let repo = Repo::new();
    repo.backup("vm1", &[("root", &base)]);
    let s = Served::start(&repo, "vm1", &repo.tmp("e.sock"), &[]);
    assert!(s.uri.starts_with("nbd+unix:///root?socket="), "{}", s.uri);

    let out = sh(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &s.uri])
        .arg(&base));
    assert!(out.contains("Images are identical"), "{out}");

    // Holes: ours are zeros in the original, and cover the original's holes.
    let original = std::fs::read(&base).unwrap();
    let ours = map(&s.uri);
    for &(o, l, hole) in &ours {
        if hole {
            assert!(
                original[o as usize..(o + l) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "hole at {o}+{l} is not zero in the original"
            );
        }
    }
    let qsock = repo.tmp("q.sock");
    let mut q = Command::new("qemu-nbd")
        .args(["-r", "-f", "raw", "-k"])
        .arg(&qsock)
        .arg(&base)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !qsock.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let theirs = map(&format!("nbd+unix:///?socket={}", qsock.display()));
    let _ = q.kill();
    let _ = q.wait();
    let holes = |m: &[(u64, u64, bool)]| m.iter().filter(|e| e.2).map(|e| e.1).sum::<u64>();
    assert!(
        holes(&ours) * 100 >= holes(&theirs) * 95,
        "ours {} vs qemu-nbd {}",
        holes(&ours),
        holes(&theirs)
    );

    // Several clients at once, each gets identical bytes.
    let copies: Vec<_> = (0..3)
        .map(|i| {
            let f = repo.tmp(&format!("copy{i}.img"));
            (
                Command::new("nbdcopy").arg(&s.uri).arg(&f).spawn().unwrap(),
                f,
            )
        })
        .collect();
    for (mut c, f) in copies {
        assert!(c.wait().unwrap().success());
        assert_same(&f, &base);
    }
    // A read-only export refuses writes.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", &s.uri, "-c", "write -P 1 0 4096"])
        .output()
        .unwrap();
    assert!(
        !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("failed"),
        "{o:?}"
    );

    // QEMU itself attaches the export as a block node and re-exports it.
    let (qmp2, out2) = (repo.tmp("qsd.sock"), repo.tmp("qsd-out.sock"));
    let _ = qmp2;
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,node-name=n0,server.type=unix,server.path={},export=root,read-only=on",
            s.sock.display()
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", out2.display()))
        .args(["--export", "type=nbd,id=e0,node-name=n0,name=x"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !out2.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let via_qemu = repo.tmp("via-qemu.img");
    sh(Command::new("nbdcopy")
        .arg(format!("nbd+unix:///x?socket={}", out2.display()))
        .arg(&via_qemu));
    let _ = qsd.kill();
    let _ = qsd.wait();
    assert_same(&via_qemu, &base);

    let sock = s.sock.clone();
    assert!(s.stop(libc::SIGTERM).success(), "SIGTERM is a clean exit");
    assert!(!sock.exists(), "the socket is removed on exit");
    // Ctrl-C the moment the export says it is serving: caught already, a clean exit too.
    let s = Served::start(&repo, "vm1", &sock, &[]);
    assert!(s.stop(libc::SIGINT).success(), "SIGINT is a clean exit");
    assert!(!sock.exists(), "the socket is removed on exit");
}

/// Our own client reads the whole export in odd-sized, unaligned requests, with and without
/// structured replies, twice: the first pass decodes chunks on the blocking pool, the second
/// finds them decoded and is answered inline from the cache. Every byte equals the original.
#[test]
fn reads_cold_and_cached_with_simple_and_structured_replies() {
    use holdfast::nbd::{Client, ConnectOptions};
    let d = disks();
    let base = d.join("base.img");
    let original = std::fs::read(&base).unwrap();
    let repo = Repo::new();
    repo.backup("vm1", &[("root", &base)]);
    let s = Served::start(&repo, "vm1", &repo.tmp("e.sock"), &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for structured in [true, false] {
            let opts = ConnectOptions {
                structured_replies: structured,
                meta_contexts: vec![],
                ..Default::default()
            };
            let c = std::sync::Arc::new(Client::connect(&s.uri, &opts).await.unwrap());
            assert_eq!(c.structured_replies(), structured);
            assert_eq!(c.size(), original.len() as u64);
            for pass in 0..2 {
                // 8 requests in flight; lengths cycle through sizes that split chunks anywhere.
                let mut at = 1u64; // unaligned from the start; byte 0 is read last
                let lens = [4096u32, 1, 300_000, 65_537, 1 << 20, 12_345];
                let mut k = 0;
                let mut jobs = Vec::new();
                while at < c.size() {
                    let len = lens[k % lens.len()].min((c.size() - at) as u32);
                    let c2 = c.clone();
                    jobs.push(tokio::spawn(async move { (at, c2.read(at, len).await) }));
                    at += u64::from(len);
                    k += 1;
                    if jobs.len() == 8 {
                        for j in jobs.drain(..) {
                            let (o, r) = j.await.unwrap();
                            let r = r.unwrap();
                            assert!(
                                r[..] == original[o as usize..o as usize + r.len()],
                                "structured={structured} pass {pass}: bytes at {o}"
                            );
                        }
                    }
                }
                for j in jobs {
                    let (o, r) = j.await.unwrap();
                    let r = r.unwrap();
                    assert!(
                        r[..] == original[o as usize..o as usize + r.len()],
                        "structured={structured} pass {pass}: bytes at {o}"
                    );
                }
                assert_eq!(c.read(0, 1).await.unwrap(), original[..1]);
            }
        }
    });
    assert!(s.stop(libc::SIGTERM).success());
}

/// The smallest cache (`--cache 1M` is raised to 256 chunks) under nbdcopy's 4 connections,
/// whose streams evict each other's read-ahead: still every byte, twice over.
#[test]
fn a_small_cache_still_serves_every_byte() {
    require("nbdcopy", "libnbd-bin");
    let d = disks();
    let base = d.join("base.img");
    assert!(
        std::fs::metadata(&base).unwrap().len() > 64 << 20,
        "the disk must be larger than the cache"
    );
    let repo = Repo::new();
    repo.backup("vm1", &[("root", &base)]);
    let s = Served::start(&repo, "vm1", &repo.tmp("e.sock"), &["--cache", "1M"]);
    for pass in 0..2 {
        let f = repo.tmp(&format!("copy{pass}.img"));
        sh(Command::new("nbdcopy")
            .args(["-C", "4"])
            .arg(&s.uri)
            .arg(&f));
        assert_same(&f, &base);
    }
    assert!(s.stop(libc::SIGTERM).success());
}

#[test]
fn writable_export_writes_to_an_overlay_never_the_store() {
    require("qemu-io", "qemu-utils");
    let d = disks();
    let base = d.join("base.img");
    let repo = Repo::new();
    repo.backup("vm1", &[("root", &base)]);
    let keep = repo.tmp("kept-overlay");
    let w = Served::start(
        &repo,
        "vm1",
        &repo.tmp("w.sock"),
        &["--writable", "--keep-overlay", keep.to_str().unwrap()],
    );
    let ro = Served::start(&repo, "vm1", &repo.tmp("r.sock"), &[]);
    let out = sh(Command::new("qemu-io").args([
        "-f",
        "raw",
        &w.uri,
        "-c",
        "write -P 0xab 1000 5000",
        "-c",
        "read -P 0xab 1000 5000",
        "-c",
        "write -z 1048576 65536",
    ]));
    assert!(!out.contains("fail"), "{out}");
    // The writable export shows the writes on top of the backup...
    let copy = repo.tmp("w.img");
    sh(Command::new("nbdcopy").arg(&w.uri).arg(&copy));
    let mut expect = std::fs::read(&base).unwrap();
    expect[1000..6000].fill(0xab);
    expect[1 << 20..(1 << 20) + 65536].fill(0);
    assert!(
        std::fs::read(&copy).unwrap() == expect,
        "writable export bytes differ from backup + writes"
    );
    // ...while another export of the same backup, and the store, are untouched.
    let out = sh(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &ro.uri])
        .arg(&base));
    assert!(out.contains("identical"), "{out}");
    assert!(w.stop(libc::SIGTERM).success());
    drop(ro);
    let v = repo.run(&["--json", "verify"]).ok().json();
    assert_eq!(v["damaged"].as_array().unwrap().len(), 0);
    let kept = std::fs::read(&keep).unwrap();
    assert!(kept[1000..6000].iter().all(|&b| b == 0xab));
    let map = std::fs::read(format!("{}.map", keep.display())).unwrap();
    assert_eq!(
        map[0] & 0b11,
        0b11,
        "blocks 0 and 1 are marked in the overlay map"
    );
}

#[test]
fn export_bad_input() {
    let d = disks();
    let repo = Repo::new();
    repo.backup("vm1", &[("root", &d.join("base.img"))]);
    let r = repo.run(&["export", "ghost", "--listen", "unix:/tmp/x.sock"]);
    assert!(
        r.err().contains("no backups of VM \"ghost\""),
        "{}",
        r.stderr
    );
    let r = repo.run(&["export", "vm1", "--listen", "udp:9"]);
    assert!(
        r.err()
            .contains("--listen \"udp:9\": use unix:PATH, tcp:PORT"),
        "{}",
        r.stderr
    );
    let taken = repo.tmp("taken.sock");
    std::fs::write(&taken, b"").unwrap();
    let r = repo.run(&[
        "export",
        "vm1",
        "--listen",
        &format!("unix:{}", taken.display()),
    ]);
    assert!(
        r.err()
            .contains("exists; remove it or pick another socket path"),
        "{}",
        r.stderr
    );
    let r = repo.run(&["export", "vm1", "--disk", "nope", "--listen", "tcp:0"]);
    assert!(r.err().contains("has no disk \"nope\""), "{}", r.stderr);
    let r = repo.run(&[
        "export",
        "vm1",
        "--listen",
        "tcp:0",
        "--keep-overlay",
        "/tmp/o",
    ]);
    assert!(
        r.err().contains("--keep-overlay needs --writable"),
        "{}",
        r.stderr
    );
    let r = repo.run(&["export", "vm1", "--listen", "tcp:0", "--cache", "lots"]);
    assert!(
        r.err()
            .contains("--cache: \"lots\" is not a size; write e.g. 512M or 4G"),
        "{}",
        r.stderr
    );
}
