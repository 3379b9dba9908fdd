//! Test harness: real QEMU processes on temp unix sockets.
//!
//! Every process is started here and killed by PID in `Drop` of its guard; every wait is
//! bounded. A missing tool fails the test with the command that installs it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::qmp::ops::{list_nodes, BlockNode};
use crate::qmp::Client;

pub const T: Duration = Duration::from_secs(20);

const BACKPORTS: &str = "add bookworm-backports (docs/qemu.md), then apt-get update && \
    apt-get install -y -t bookworm-backports --no-install-recommends";

/// Fail (never skip) when `tool` is missing.
pub fn require(tool: &str) {
    let install = match tool {
        "qemu-system-x86_64" => format!("{BACKPORTS} qemu-system-x86"),
        "qemu-storage-daemon" | "qemu-img" | "qemu-io" => format!("{BACKPORTS} qemu-utils"),
        "nbdinfo" | "nbdcopy" => "apt-get install -y libnbd-bin".to_string(),
        other => format!("apt-get install {other}"),
    };
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "{tool} is missing: install it with `{install}`");
}

/// A child process killed (by its PID) and reaped on drop.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QEMU process (qemu-system or qemu-storage-daemon) with a connected QMP client.
pub struct Qemu {
    pub client: Client,
    /// Per disk: (format node name, image file, qdev id if attached to a guest device).
    pub disks: Vec<(String, PathBuf, Option<String>)>,
    pub agent: Option<PathBuf>,
    proc: Proc,
    pub dir: TempDir,
}

impl Qemu {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn node(&self, i: usize) -> String {
        self.disks[i].0.clone()
    }
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

fn images(dir: &Path, n: usize, size_mib: u64) -> Vec<(String, PathBuf)> {
    require("qemu-img");
    (0..n)
        .map(|i| {
            let img = dir.join(format!("disk{i}.qcow2"));
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&img)
                .arg(format!("{size_mib}M"))
                .status()
                .expect("qemu-img");
            assert!(st.success(), "qemu-img create failed");
            (format!("disk{i}"), img)
        })
        .collect()
}

fn blockdev_args(cmd: &mut Command, name: &str, img: &Path) {
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name={name}-file",
            img.display()
        ))
        .arg("--blockdev")
        .arg(format!("driver=qcow2,file={name}-file,node-name={name}"));
}

/// qemu-storage-daemon with `n` qcow2 disks of `size_mib`, nodes `disk0`, `disk1`, …, and a
/// second monitor on `qmp2.sock` for a second client.
pub async fn qsd(n: usize, size_mib: u64) -> Qemu {
    require("qemu-storage-daemon");
    let dir = tempfile::tempdir().expect("tempdir");
    let qmp = dir.path().join("qmp.sock");
    let disks = images(dir.path(), n, size_mib);
    let mut cmd = Command::new("qemu-storage-daemon");
    for (name, img) in &disks {
        blockdev_args(&mut cmd, name, img);
    }
    cmd.arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=mon",
            qmp.display()
        ))
        .args(["--monitor", "chardev=mon"])
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=mon2",
            dir.path().join("qmp2.sock").display()
        ))
        .args(["--monitor", "chardev=mon2"]);
    let proc = Proc::spawn(cmd, dir.path().join("qemu.log"));
    let disks = disks.into_iter().map(|(n, p)| (n, p, None)).collect();
    finish(proc, dir, qmp, disks, None).await
}

/// qemu-system-x86_64 (TCG, 64 MiB, no guest OS) with `n` qcow2 disks on IDE devices
/// `ide0`, `ide1`, … and, with `agent`, a guest-agent virtio-serial port on `qga.sock`.
pub async fn vm(n: usize, size_mib: u64, agent: bool) -> Qemu {
    require("qemu-system-x86_64");
    let dir = tempfile::tempdir().expect("tempdir");
    let qmp = dir.path().join("qmp.sock");
    let disks = images(dir.path(), n, size_mib);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,accel=tcg", "-m", "64", "-display", "none"])
        .args(["-nodefaults", "-no-user-config", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    let mut out = Vec::new();
    for (i, (name, img)) in disks.into_iter().enumerate() {
        blockdev_args(&mut cmd, &name, &img);
        let id = format!("ide{i}");
        cmd.arg("-device")
            .arg(format!("ide-hd,drive={name},bus=ide.{i},id={id}"));
        out.push((name, img, Some(id)));
    }
    let qga = dir.path().join("qga.sock");
    if agent {
        cmd.arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                qga.display()
            ))
            .args(["-device", "virtio-serial"])
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]);
    }
    let proc = Proc::spawn(cmd, dir.path().join("qemu.log"));
    finish(proc, dir, qmp, out, agent.then_some(qga)).await
}

async fn finish(
    mut proc: Proc,
    dir: TempDir,
    qmp: PathBuf,
    disks: Vec<(String, PathBuf, Option<String>)>,
    agent: Option<PathBuf>,
) -> Qemu {
    let deadline = std::time::Instant::now() + T;
    while !qmp.exists() {
        assert!(!proc.exited(), "QEMU exited at start:\n{}", proc.log());
        assert!(
            std::time::Instant::now() < deadline,
            "no QMP socket after {T:?}:\n{}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = Client::connect(&qmp, T).await.expect("QMP connect");
    Qemu {
        client,
        disks,
        agent,
        proc,
        dir,
    }
}

/// Run a tool to completion (bounded); panics with its stderr on failure.
pub async fn run(prog: &str, args: &[&str]) -> String {
    require(prog);
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args).kill_on_drop(true).stdin(Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{prog} {args:?} did not finish in 60 s"))
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// HMP `qemu-io` on a guest device (qemu-system only); panics on a failed command or a
/// pattern mismatch.
pub async fn hmp_io(client: &Client, qdev: &str, cmd: &str) {
    let line = format!("qemu-io -d {qdev} \"{cmd}\"");
    let v = client
        .execute("human-monitor-command", json!({ "command-line": line }))
        .await
        .expect("human-monitor-command");
    let text = v.as_str().unwrap_or("");
    let lower = text.to_ascii_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error") && !lower.contains("conflict"),
        "{line}: {text}"
    );
}

/// Whole content of an NBD export, read by `nbdcopy`.
pub async fn read_export(uri: &str, dir: &Path) -> Vec<u8> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = dir.join(format!("read-{n}.raw"));
    let _ = std::fs::remove_file(&out);
    run("nbdcopy", &[uri, out.to_str().expect("utf-8")]).await;
    let data = std::fs::read(&out).expect("read copy");
    let _ = std::fs::remove_file(&out);
    data
}

/// Dirty ranges (offset, length) of `qemu:dirty-bitmap:NAME` by `nbdinfo --map`.
pub async fn dirty_ranges(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let ctx = format!("--map=qemu:dirty-bitmap:{bitmap}");
    let out = run("nbdinfo", &[&ctx, uri]).await;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && f[2] == "1" {
            let (off, len) = (f[0].parse().expect("offset"), f[1].parse().expect("len"));
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => ranges.push((off, len)),
            }
        }
    }
    ranges
}

/// Everything in QEMU a teardown must restore: named nodes, exports, jobs, bitmaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub nodes: Vec<String>,
    pub exports: Vec<String>,
    pub jobs: Vec<String>,
    /// (node, bitmap, recording)
    pub bitmaps: Vec<(String, String, bool)>,
}

pub async fn state(client: &Client) -> State {
    let nodes: Vec<BlockNode> = list_nodes(client).await.expect("nodes");
    let exports = client
        .execute("query-block-exports", Value::Null)
        .await
        .expect("exports");
    let mut s = State {
        nodes: nodes.iter().map(|n| n.node_name.clone()).collect(),
        exports: exports
            .as_array()
            .expect("array")
            .iter()
            .map(|e| e["id"].as_str().unwrap_or("").to_string())
            .collect(),
        jobs: client
            .query_jobs()
            .await
            .expect("jobs")
            .into_iter()
            .map(|j| j.id)
            .collect(),
        bitmaps: nodes
            .iter()
            .flat_map(|n| {
                n.bitmaps
                    .iter()
                    .map(|b| (n.node_name.clone(), b.name.clone(), b.recording))
            })
            .collect(),
    };
    s.nodes.sort();
    s.exports.sort();
    s.bitmaps.sort();
    s
}
