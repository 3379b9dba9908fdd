//! The shared test harness: real tools, real disks, the real binary. Nothing is skipped: a
//! missing tool fails the test with the command that installs it.
#![allow(dead_code)]
// Test harness: a failed setup step is a failed test, and unwrap says where.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod hook;
pub mod qemu;
pub mod s3;
pub mod service;

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// Every file under `dir` (recursively), and every directory under it when `dirs`.
pub fn tree(dir: &Path, dirs: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
                if dirs {
                    out.push(e.path());
                }
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    tree(dir, false)
}

/// Send `sig` to the process `pid`, one this test started.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) takes no pointers; the pid is a child of this test.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Fail (never skip) when a tool is missing.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file();
    assert!(found, "{tool} is missing: install it with `apt-get install -y {package}` (scripts/install-deps does)");
}

/// Fail (never skip) when a tool installed with cargo is missing.
pub fn require_cargo_tool(tool: &str, install: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: install it with `{install}` (scripts/install-deps does)"
    );
}

/// Run `testdata/SCRIPT DIR` once per machine into `DIR` (in the target dir) after checking its
/// tools. Several test binaries may start at once: one builds, the others wait (flock).
fn built_once(script: &str, dir_name: &str, tools: &[(&str, &str)]) -> PathBuf {
    for (t, p) in tools {
        require(t, p);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(dir_name);
    fs::create_dir_all(&dir).unwrap();
    let lock = fs::File::create(dir.join(".lock")).unwrap();
    lock.lock().unwrap();
    let done = dir.join("done");
    if !done.exists() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(script);
        let out = Command::new("bash").arg(path).arg(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "{script} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(&done, b"ok").unwrap();
    }
    dir
}

/// The test disks of testdata/make-disks.sh, built once per machine into the target dir.
pub fn disks() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        built_once(
            "make-disks.sh",
            "disks-v3",
            &[
                ("sgdisk", "gdisk"),
                ("mke2fs", "e2fsprogs"),
                ("mkfs.vfat", "dosfstools"),
                ("mcopy", "mtools"),
            ],
        )
    })
}

/// The disks of testdata/make-fs-disks.sh (GPT, MBR with NTFS and a logical partition, a
/// whole-disk filesystem) and their source trees, built once per machine into the target dir.
pub fn fs_disks() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let tools = [
        ("sgdisk", "gdisk"),
        ("sfdisk", "fdisk"),
        ("mke2fs", "e2fsprogs"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("mkntfs", "ntfs-3g"),
        ("ntfs-3g", "ntfs-3g"),
    ];
    DIR.get_or_init(|| built_once("make-fs-disks.sh", "fsdisks-v2", &tools))
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "command failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
    /// The one-line error of a failed command.
    pub fn err(&self) -> &str {
        assert_ne!(
            self.code, 0,
            "expected a failure, got success: {}",
            self.stdout
        );
        let line = self.stderr.trim();
        assert_eq!(line.lines().count(), 1, "errors are one line: {line:?}");
        line
    }
}

/// The passphrase of `Repo::new_encrypted` stores.
pub const PASSPHRASE: &str = "correct horse battery staple";

/// A repository in a temp dir, and the binary pointed at it.
pub struct Repo {
    pub dir: tempfile::TempDir,
    /// Extra environment for every run (S3 credentials).
    pub env: Vec<(&'static str, String)>,
}

/// How the tests' stores are encrypted: `none`, unless HOLDFAST_TEST_ENCRYPTION=keyfile runs
/// the whole suite on encrypted stores (every reader unchanged on them).
pub fn test_encryption() -> &'static str {
    match std::env::var("HOLDFAST_TEST_ENCRYPTION").as_deref() {
        Ok("keyfile") => "keyfile",
        _ => "none",
    }
}

impl Repo {
    pub fn new() -> Repo {
        let r = Repo {
            dir: tempfile::tempdir().unwrap(),
            env: Vec::new(),
        };
        r.run(&["init", "--encryption", test_encryption()]).ok();
        r.keep_every_backup();
        r
    }

    /// A repository with the built-in policy (2 backup slots, manual backups refused when
    /// full): for the tests of policies.
    pub fn with_default_policy() -> Repo {
        let r = Repo {
            dir: tempfile::tempdir().unwrap(),
            env: Vec::new(),
        };
        r.run(&["init", "--encryption", test_encryption()]).ok();
        r
    }

    /// Tests that are not about retention back a VM up more often than its 2 default slots
    /// allow: give them room.
    fn keep_every_backup(&self) {
        let path = self.path().join("vms.toml");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str("\n[policy]\nbackup.slots = 10000\n");
        std::fs::write(&path, text).unwrap();
    }

    /// A repository encrypted as `mode` (`repokey`: with the passphrase of `PASSPHRASE`, given
    /// to every run through HOLDFAST_PASSPHRASE).
    pub fn new_encrypted(mode: &str) -> Repo {
        let r = Repo {
            dir: tempfile::tempdir().unwrap(),
            env: vec![("HOLDFAST_PASSPHRASE", PASSPHRASE.to_string())],
        };
        r.run(&["init", "--encryption", mode]).ok();
        r.keep_every_backup();
        r
    }

    /// A repository whose store is `s3://bkt/PREFIX` at `endpoint` (a test S3 server or proxy).
    pub fn new_s3(endpoint: &str, prefix: &str, extra: &[&str]) -> Repo {
        let r = Repo {
            dir: tempfile::tempdir().unwrap(),
            env: s3::env(),
        };
        let url = format!("s3://{}/{prefix}", s3::BUCKET);
        let mut args = vec!["init", "--s3", &url, "--endpoint", endpoint, "--path-style"];
        args.extend_from_slice(extra);
        if !extra.contains(&"--encryption") && !extra.contains(&"--existing") {
            args.extend(["--encryption", test_encryption()]);
        }
        r.run(&args).ok();
        r.keep_every_backup();
        r
    }
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--repo")
            .arg(self.path())
            .args(args)
            .env_remove("HOLDFAST_REPO");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.cmd(args).output().unwrap())
    }
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.cmd(args);
        for (k, v) in env {
            c.env(k, v);
        }
        Run::from(c.output().unwrap())
    }
    /// Back up and return the manifest JSON.
    pub fn backup(&self, vm: &str, disks: &[(&str, &Path)]) -> serde_json::Value {
        let mut args = vec!["--json".to_string(), "backup".into(), vm.into()];
        for (n, p) in disks {
            args.push("--disk".into());
            args.push(format!("{n}={}", p.display()));
        }
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        self.run(&a).ok().json()
    }
    /// `holdfast --json backup ARGS...`, returning the manifest.
    pub fn backup_args(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json", "backup"];
        a.extend_from_slice(args);
        self.run(&a).ok().json()
    }
    pub fn tmp(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Assert two files hold the same bytes (compared in 1 MiB blocks, with the first difference).
pub fn assert_same(a: &Path, b: &Path) {
    use std::io::Read;
    let (mut fa, mut fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    assert_eq!(
        fa.metadata().unwrap().len(),
        fb.metadata().unwrap().len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            break;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

/// blake3 of a whole file.
pub fn hash_file(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(p).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

pub fn u(v: &serde_json::Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("no {path} in {v}"))
}
