//! Backups from NBD exports with changed-block tracking, against real servers: qemu-nbd with a
//! persistent bitmap, and qemu-storage-daemon driven over QMP (freeze-and-rotate transaction,
//! an NBD export carrying the frozen bitmap).
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SEG: u64 = 4 << 20;

/// A child killed by its own PID and reaped on drop.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into()
}

fn qemu_nbd(dir: &Path, img: &Path, bitmap: Option<&str>) -> (Guard, String) {
    let sock = dir.join(format!(
        "nbd-{}.sock",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut c = Command::new("qemu-nbd");
    c.args(["-r", "-f", "qcow2", "-x", "root", "-k"]).arg(&sock);
    if let Some(b) = bitmap {
        c.args(["-B", b]);
    }
    let g = Guard(c.arg(img).stderr(Stdio::null()).spawn().unwrap());
    wait_for(&sock);
    (g, format!("nbd+unix:///root?socket={}", sock.display()))
}

/// Seeded random regions (offset, len) inside `size`.
fn regions(n: usize, size: u64, seed: u64) -> Vec<(u64, u64)> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            (
                (next() % (size - (1 << 20))) & !511,
                (4096 + (next() % (200 << 10))) & !511,
            )
        })
        .collect()
}

fn dirty_segments(rs: &[(u64, u64)]) -> u64 {
    let s: BTreeSet<u64> = rs
        .iter()
        .flat_map(|&(o, l)| (o / SEG)..=((o + l - 1) / SEG))
        .collect();
    s.len() as u64
}

fn to_raw(qcow: &Path, out: &Path) {
    let _ = std::fs::remove_file(out);
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(qcow)
        .arg(out));
}

#[test]
fn incremental_from_qemu_nbd_reads_only_dirty_segments() {
    require("qemu-nbd", "qemu-utils");
    let d = disks();
    let repo = Repo::new();
    let qcow = repo.tmp("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(d.join("base.img"))
        .arg(&qcow));
    sh(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&qcow)
        .arg("b0"));

    // First backup: no earlier backup, so a full read of the allocated extents.
    let (g, uri) = qemu_nbd(repo.dir.path(), &qcow, Some("b0"));
    let b1 = repo.backup_args(&["vm1", "--disk", &format!("root={uri}"), "--bitmap", "b0"]);
    drop(g);
    assert!(b1["disks"][0].get("since").is_none());
    assert!(
        u(&b1, "/stats/read_bytes") < 128 << 20,
        "holes are skipped: {b1}"
    );
    let ref1 = repo.tmp("ref1.img");
    to_raw(&qcow, &ref1);
    let out = repo.tmp("out.img");
    repo.run(&["restore", "vm1", "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &ref1);

    // Write random regions; the persistent bitmap records them.
    let rs = regions(12, 256 << 20, 42);
    for (i, (o, l)) in rs.iter().enumerate() {
        sh(Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {} {o} {l}", 0x30 + i),
            ])
            .arg(&qcow));
    }
    let (g, uri) = qemu_nbd(repo.dir.path(), &qcow, Some("b0"));
    let b2 = repo.backup_args(&["vm1", "--disk", &format!("root={uri}"), "--bitmap", "b0"]);
    drop(g);
    assert_eq!(b2["disks"][0]["since"], b1["id"]);
    assert_eq!(b2["disks"][0]["bitmap"], "b0");
    assert_eq!(
        u(&b2, "/stats/read_bytes"),
        dirty_segments(&rs) * SEG,
        "bytes read must equal the dirty segments: {b2}"
    );
    let ref2 = repo.tmp("ref2.img");
    to_raw(&qcow, &ref2);
    let _ = std::fs::remove_file(&out);
    repo.run(&["restore", "vm1", "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &ref2);
    // The first backup still restores as it was.
    let _ = std::fs::remove_file(&out);
    repo.run(&[
        "restore",
        &format!("vm1@{}", b1["id"].as_str().unwrap()),
        "--to",
        out.to_str().unwrap(),
    ])
    .ok();
    assert_same(&out, &ref1);

    // A bitmap the server does not have is a clear error before anything is read.
    let (_g, uri) = qemu_nbd(repo.dir.path(), &qcow, Some("b0"));
    let r = repo.run(&[
        "backup",
        "vm1",
        "--disk",
        &format!("root={uri}"),
        "--bitmap",
        "nope",
    ]);
    assert!(
        r.err().contains("does not offer qemu:dirty-bitmap:nope"),
        "{}",
        r.stderr
    );
    let r = repo.run(&[
        "backup",
        "vm1",
        "--disk",
        &format!("root={}", ref1.display()),
        "--bitmap",
        "b0",
    ]);
    assert!(r.err().contains("--bitmap needs NBD disks"), "{}", r.stderr);
}

/// A minimal QMP client for the test (the product's own QMP client is another module's job).
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        wait_for(path);
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "{greeting}");
        q.cmd("qmp_capabilities", json!({}));
        q
    }
    fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        writeln!(
            self.w,
            "{}",
            json!({"execute": execute, "arguments": arguments})
        )
        .unwrap();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "{execute} failed: {v}");
        }
    }
}

#[test]
fn incremental_from_qemu_storage_daemon_with_freeze_and_rotate() {
    require("qemu-storage-daemon", "qemu-system-common");
    require("nbdcopy", "libnbd-bin");
    let d = disks();
    let repo = Repo::new();
    let dir = repo.dir.path();
    let qcow = repo.tmp("live.qcow2");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(d.join("second.img"))
        .arg(&qcow));
    let (qmp_path, nbd_path): (PathBuf, PathBuf) = (dir.join("qmp.sock"), dir.join("nbd.sock"));
    let _qsd = Guard(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                qcow.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk0,file=f0"])
            .arg("--chardev")
            .arg(format!(
                "socket,id=m0,path={},server=on,wait=off",
                qmp_path.display()
            ))
            .args(["--monitor", "chardev=m0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd_path.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut q = Qmp::connect(&qmp_path);
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", nbd_path.display());
    // Checkpoint 1: a persistent bitmap, then the full backup from a read-only export.
    q.cmd(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "cp1", "persistent": true}),
    );
    q.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk0", "name": "full", "writable": false}),
    );
    let b1 = repo.backup_args(&["vm2", "--disk", &format!("root={}", uri("full"))]);
    q.cmd("block-export-del", json!({"id": "e0"}));

    // The guest writes.
    q.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "disk0", "name": "rw", "writable": true}),
    );
    let rs = regions(9, 256 << 20, 7);
    for (i, (o, l)) in rs.iter().enumerate() {
        sh(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri("rw"),
            "-c",
            &format!("write -P {} {o} {l}", 0x60 + i),
        ]));
    }
    q.cmd("block-export-del", json!({"id": "w"}));

    // Freeze and rotate in one transaction: cp1 stops, cp2 starts; export cp1 with the disk.
    q.cmd("transaction", json!({"actions": [
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "cp1"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "cp2", "persistent": true}}
    ]}));
    q.cmd("block-export-add", json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "inc", "writable": false, "bitmaps": ["cp1"]}));
    let b2 = repo.backup_args(&[
        "vm2",
        "--disk",
        &format!("root={}", uri("inc")),
        "--bitmap",
        "cp1",
    ]);
    assert_eq!(b2["disks"][0]["since"], b1["id"]);
    assert_eq!(
        u(&b2, "/stats/read_bytes"),
        dirty_segments(&rs) * SEG,
        "{b2}"
    );
    let now = repo.tmp("now.img");
    sh(Command::new("nbdcopy").arg(uri("inc")).arg(&now));
    q.cmd("block-export-del", json!({"id": "e1"}));
    q.cmd(
        "block-dirty-bitmap-remove",
        json!({"node": "disk0", "name": "cp1"}),
    );
    let out = repo.tmp("out.img");
    repo.run(&["restore", "vm2", "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &now);
}

/// Forwards connections on `listen` to the NBD server at `upstream`, and cuts every connection
/// once the server has sent `budget` bytes in all: a server that goes away in the middle of a
/// pull. Returns the stop flag and the accept thread.
fn cutting_proxy(
    listen: &Path,
    upstream: &Path,
    budget: u64,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let l = std::os::unix::net::UnixListener::bind(listen).unwrap();
    l.set_nonblocking(true).unwrap();
    let (stop, left) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(budget)),
    );
    let (stop2, upstream) = (stop.clone(), upstream.to_path_buf());
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        while !stop2.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(120) {
            let Ok((c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            c.set_nonblocking(false).unwrap();
            let s = UnixStream::connect(&upstream).unwrap();
            let (mut c_rd, mut s_wr) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_rd, &mut s_wr);
                let _ = s_wr.shutdown(std::net::Shutdown::Both);
            });
            let left = left.clone();
            std::thread::spawn(move || {
                let (mut s, mut c) = (s, c);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let before = left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                            Some(v.saturating_sub(n as u64))
                        })
                        .unwrap_or(0);
                    let allowed = before.min(n as u64) as usize;
                    if c.write_all(&buf[..allowed]).is_err() || allowed < n {
                        break;
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Both);
                let _ = s.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (stop, t)
}

/// The server goes away in the middle of a pull: one clear line, a non-zero exit, no backup
/// committed; the next run against the server reads everything and restores byte-identical.
#[test]
fn connection_lost_mid_pull_commits_nothing() {
    require("qemu-nbd", "qemu-utils");
    let repo = Repo::new();
    let raw = repo.tmp("disk.img");
    let mut x = 0x9e3779b97f4a7c15u64;
    let bytes: Vec<u8> = (0..(48u64 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&raw, &bytes).unwrap();
    let qcow = repo.tmp("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    let (g, uri) = qemu_nbd(repo.dir.path(), &qcow, None);
    let upstream = PathBuf::from(uri.split("socket=").nth(1).unwrap());
    let proxy = repo.tmp("proxy.sock");
    let (stop, t) = cutting_proxy(&proxy, &upstream, 16 << 20);

    let r = repo.run(&[
        "backup",
        "vm1",
        "--disk",
        &format!("root=nbd+unix:///root?socket={}", proxy.display()),
    ]);
    let line = r.err();
    assert!(
        line.starts_with("holdfast: error: read error on nbd+unix:///root?socket=")
            && line.contains("connection lost"),
        "{line}"
    );
    assert_ne!(r.code, 0);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    t.join().unwrap();
    let listed = repo.run(&["--json", "backups"]).ok().json();
    assert_eq!(
        listed.as_array().map(|a| a.len()),
        Some(0),
        "nothing committed: {listed}"
    );

    // qemu-nbd without -t ends with its client; a fresh one for the re-run.
    drop(g);
    let (_g, uri) = qemu_nbd(repo.dir.path(), &qcow, None);
    let b = repo.backup_args(&["vm1", "--disk", &format!("root={uri}")]);
    assert_eq!(u(&b, "/stats/read_bytes"), 48 << 20);
    let out = repo.tmp("out.img");
    repo.run(&["restore", "vm1", "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &raw);
}
