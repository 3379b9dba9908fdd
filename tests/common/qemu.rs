//! Real QEMU for the tests: qemu-system-x86_64 (TCG, no guest OS) with qcow2 or raw disks on
//! IDE devices, a QMP socket for holdfast and a second one for the test, and optionally a
//! guest-agent port that nothing in the guest answers. Killed (by PID) when dropped.
#![allow(dead_code)]

use holdfast::qmp::Client;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BACKPORTS: &str = "add the bookworm-backports apt suite (scripts/install-deps does), then apt-get install -y -t bookworm-backports --no-install-recommends qemu-system-x86";

pub fn require_qemu() {
    super::require("qemu-img", "qemu-utils");
    super::require("qemu-io", "qemu-utils");
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    assert!(found, "qemu-system-x86_64 is missing: {BACKPORTS}");
}

pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Disk {
    pub node: String,
    pub file: PathBuf,
    pub format: String,
    pub qdev: String,
}

/// What runs the disks.
#[derive(Clone)]
pub enum Runner {
    /// qemu-system-x86_64 with IDE devices (writes through HMP qemu-io).
    System,
    /// qemu-storage-daemon with an NBD server on this socket and a writable export `liveN` of
    /// each disk (writes through it).
    Qsd(PathBuf),
}

pub struct Vm {
    pub runner: Runner,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// For holdfast.
    pub qmp: PathBuf,
    /// For the test (a QMP monitor serves one client at a time).
    pub qmp2: PathBuf,
    pub agent: Option<PathBuf>,
    pub disks: Vec<Disk>,
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
}

impl Vm {
    /// Declare it in `repo` as VM `name` (`vm add`): its disks as root, data; its agent.
    pub fn declare(&self, repo: &super::Repo, name: &str) {
        let mut args = vec![
            "vm".to_string(),
            "add".into(),
            name.into(),
            "--qmp".into(),
            self.qmp.display().to_string(),
        ];
        for (i, d) in self.disks.iter().enumerate() {
            args.push("--disk".into());
            args.push(format!("{}={}", ["root", "data"][i], d.node));
        }
        if let Some(a) = &self.agent {
            args.push("--agent".into());
            args.push(a.display().to_string());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        repo.run(&a).ok();
    }

    /// Internal snapshot tags QEMU has on node `node`.
    pub fn snapshot_tags(&self, node: &str) -> Vec<String> {
        let nodes = self.qmp("query-named-block-nodes", json!({ "flat": true }));
        let n = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == node)
            .unwrap()
            .clone();
        n["image"]["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// A VM with disks of (format, MiB), each filled with a pattern per 4 MiB (so restores
    /// have something to compare), on nodes disk0, disk1, …
    pub fn start(disks: &[(&str, u64)], agent: bool) -> Vm {
        Vm::start_with(Runner::System, disks, agent)
    }

    /// qemu-storage-daemon serving `disks`, with its own NBD server (`nbd.sock` in the dir).
    pub fn start_qsd(disks: &[(&str, u64)]) -> Vm {
        Vm::start_with(Runner::Qsd(PathBuf::new()), disks, false)
    }

    fn start_with(runner: Runner, disks: &[(&str, u64)], agent: bool) -> Vm {
        require_qemu();
        super::require("qemu-storage-daemon", "qemu-utils");
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        for (i, (format, mib)) in disks.iter().enumerate() {
            let file = dir.path().join(format!("disk{i}.{format}"));
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    format,
                    file.to_str().unwrap(),
                    &format!("{mib}M"),
                ],
            );
            let mut args = vec!["-f".to_string(), format.to_string()];
            for k in 0..(mib / 8) {
                args.push("-c".into());
                args.push(format!(
                    "write -P {} {}M 1M",
                    0x10 + (k as u8 % 200) + i as u8,
                    k * 8
                ));
            }
            args.push(file.to_str().unwrap().into());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run("qemu-io", &a);
            out.push(Disk {
                node: format!("disk{i}"),
                file,
                format: format.to_string(),
                qdev: format!("ide{i}"),
            });
        }
        let runner = match runner {
            Runner::Qsd(_) => Runner::Qsd(dir.path().join("nbd.sock")),
            r => r,
        };
        let mut vm = Vm {
            runner,
            child: None,
            qmp: dir.path().join("qmp.sock"),
            qmp2: dir.path().join("qmp2.sock"),
            agent: agent.then(|| dir.path().join("qga.sock")),
            disks: out,
            dir,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: None,
        };
        vm.boot();
        vm
    }

    /// Start QEMU on the current disk files.
    pub fn boot(&mut self) {
        assert!(self.child.is_none());
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.qmp2);
        if let Runner::Qsd(nbd) = &self.runner {
            let _ = std::fs::remove_file(nbd);
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", nbd.display()));
            for (i, d) in self.disks.iter().enumerate() {
                cmd.arg("--blockdev").arg(format!(
                    "driver=file,filename={},node-name={}-file",
                    d.file.display(),
                    d.node
                ));
                cmd.arg("--blockdev").arg(format!(
                    "driver={},file={}-file,node-name={}",
                    d.format, d.node, d.node
                ));
                cmd.arg("--export").arg(format!(
                    "type=nbd,id=live{i},node-name={},name=live{i},writable=on",
                    d.node
                ));
            }
            cmd.arg("--chardev")
                .arg(format!(
                    "socket,path={},server=on,wait=off,id=mon1",
                    self.qmp.display()
                ))
                .args(["--monitor", "chardev=mon1"]);
            cmd.arg("--chardev")
                .arg(format!(
                    "socket,path={},server=on,wait=off,id=mon2",
                    self.qmp2.display()
                ))
                .args(["--monitor", "chardev=mon2"]);
            return self.spawn(cmd);
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35,accel=tcg",
            "-m",
            "64",
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
        ]);
        cmd.arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=mon1",
                self.qmp.display()
            ))
            .args(["-mon", "chardev=mon1,mode=control"]);
        cmd.arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=mon2",
                self.qmp2.display()
            ))
            .args(["-mon", "chardev=mon2,mode=control"]);
        for (i, d) in self.disks.iter().enumerate() {
            cmd.arg("-blockdev").arg(format!(
                "driver=file,filename={},node-name={}-file",
                d.file.display(),
                d.node
            ));
            cmd.arg("-blockdev").arg(format!(
                "driver={},file={}-file,node-name={}",
                d.format, d.node, d.node
            ));
            cmd.arg("-device")
                .arg(format!("ide-hd,drive={},bus=ide.{i},id={}", d.node, d.qdev));
        }
        if let Some(a) = &self.agent {
            cmd.arg("-chardev").arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                a.display()
            ));
            cmd.args([
                "-device",
                "virtio-serial",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]);
        }
        self.spawn(cmd);
    }

    fn spawn(&mut self, mut cmd: Command) {
        let log = std::fs::File::create(self.dir.path().join("qemu.log")).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap());
        let t = Instant::now();
        while !(self.qmp.exists() && self.qmp2.exists()) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "QEMU did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        loop {
            match self
                .rt
                .block_on(Client::connect(&self.qmp2, Duration::from_secs(20)))
            {
                Ok(c) => break self.client = Some(c),
                Err(e) => {
                    assert!(
                        t.elapsed() < Duration::from_secs(20),
                        "QMP: {e}: {}",
                        self.log()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Quit QEMU (cleanly: persistent bitmaps are written) and wait for it.
    pub fn shutdown(&mut self) {
        let _ = self.qmp_try("quit", json!({}));
        self.client = None;
        let mut c = self.child.take().unwrap();
        let t = Instant::now();
        while c.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.wait();
    }

    /// Kill QEMU as a crash would (SIGKILL): persistent bitmaps are not saved cleanly.
    pub fn crash(&mut self) {
        self.client = None;
        let mut c = self.child.take().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    pub fn qmp_try(&self, cmd: &str, args: Value) -> Result<Value, holdfast::qmp::QmpError> {
        let c = self.client.as_ref().expect("QEMU is not running");
        self.rt.block_on(c.execute(cmd, args))
    }

    pub fn qmp(&self, cmd: &str, args: Value) -> Value {
        self.qmp_try(cmd, args)
            .unwrap_or_else(|e| panic!("{cmd}: {e}"))
    }

    /// HMP `qemu-io` on a disk's guest device; panics if it reports a failure.
    pub fn io(&self, disk: usize, cmd: &str) -> String {
        let line = format!("qemu-io -d {} \"{cmd}\"", self.disks[disk].qdev);
        let v = self.qmp("human-monitor-command", json!({ "command-line": line }));
        let text = v.as_str().unwrap_or("").to_string();
        let lower = text.to_ascii_lowercase();
        assert!(
            !lower.contains("fail")
                && !lower.contains("error")
                && !lower.contains("conflict")
                && !lower.contains("pattern"),
            "{line}: {text}"
        );
        text
    }

    /// Write `pattern` at [offset, offset + len) of a disk, through the guest's device, and
    /// flush (so the image file shows it).
    pub fn write(&self, disk: usize, pattern: u8, offset: u64, len: u64) {
        match &self.runner {
            Runner::System => {
                self.io(disk, &format!("write -P {pattern} {offset} {len}"));
                self.io(disk, "flush");
            }
            Runner::Qsd(nbd) => {
                let uri = format!("nbd+unix:///live{disk}?socket={}", nbd.display());
                run(
                    "qemu-io",
                    &[
                        "-f",
                        "raw",
                        "-c",
                        &format!("write -P {pattern} {offset} {len}"),
                        "-c",
                        "flush",
                        &uri,
                    ],
                );
            }
        }
    }

    /// The disk's current bytes as a raw file (read beside the running QEMU).
    pub fn snapshot_raw(&self, disk: usize, to: &Path) {
        let d = &self.disks[disk];
        let _ = std::fs::remove_file(to);
        run(
            "qemu-img",
            &[
                "convert",
                "-U",
                "-f",
                &d.format,
                "-O",
                "raw",
                d.file.to_str().unwrap(),
                to.to_str().unwrap(),
            ],
        );
    }

    /// Everything holdfast may have created: (nodes, exports, jobs, holdfast bitmaps per node).
    #[allow(clippy::type_complexity)]
    pub fn holdfast_objects(
        &self,
    ) -> (
        Vec<String>,
        Vec<String>,
        Vec<String>,
        Vec<(String, String, bool)>,
    ) {
        let nodes = self.qmp("query-named-block-nodes", json!({ "flat": true }));
        let mut names = Vec::new();
        let mut bitmaps = Vec::new();
        for n in nodes.as_array().unwrap() {
            let name = n["node-name"].as_str().unwrap_or("").to_string();
            if name.starts_with("holdfast-") {
                names.push(name.clone());
            }
            for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                let bn = b["name"].as_str().unwrap_or("").to_string();
                if bn.starts_with("holdfast-") {
                    bitmaps.push((name.clone(), bn, b["recording"].as_bool().unwrap_or(false)));
                }
            }
        }
        let exports = self
            .qmp("query-block-exports", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or("").to_string())
            .collect();
        let jobs = self
            .qmp("query-jobs", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap_or("").to_string())
            .collect();
        names.sort();
        bitmaps.sort();
        (names, exports, jobs, bitmaps)
    }

    pub fn running(&self) -> bool {
        self.qmp("query-status", json!({}))["running"]
            .as_bool()
            .unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.client = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
