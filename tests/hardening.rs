//! What a hostile tester found (issue 15, items 5–9 and 12): FIFOs as disks, closed and full
//! stdout, sources that grow while read, exit codes, partial files of killed restores, file
//! modes whatever the umask.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn image(path: &Path, mib: usize, seed: u8) {
    let mut data = vec![0u8; mib << 20];
    let mut h = blake3::Hasher::new();
    h.update(&[seed]);
    h.finalize_xof().fill(&mut data);
    fs::write(path, data).unwrap();
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// `BIN --repo REPO ARGS` through the shell, with `tail` after it (a pipe, a redirection).
fn shell(repo: &Repo, args: &str, tail: &str) -> (i32, String) {
    let script = format!(
        "{BIN} --repo {} {args} {tail}; echo \"rc=${{PIPESTATUS[0]}}\" >&2",
        repo.path().display()
    );
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let rc = err
        .lines()
        .find_map(|l| l.strip_prefix("rc="))
        .unwrap()
        .parse()
        .unwrap();
    (rc, err)
}

#[test]
fn a_fifo_is_refused_before_it_is_opened() {
    let repo = Repo::new();
    let fifo = repo.tmp("disk.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut child = repo
        .cmd(&[
            "--json",
            "backup",
            "vm1",
            "--disk",
            &format!("root={}", fifo.display()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("a backup of a FIFO hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    };
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.json()["error"]["code"], "source");
    assert!(
        r.err().contains("is not a regular file or block device"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_closed_stdout_ends_quietly_and_a_full_one_is_a_one_line_error() {
    let repo = Repo::new();
    let img = repo.tmp("a.img");
    image(&img, 4, 1);
    // A committed backup whose report cannot be written stays committed.
    let (rc, err) = shell(
        &repo,
        &format!("backup vm1 --disk root={}", img.display()),
        "| true",
    );
    assert_eq!(rc, 0, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        repo.run(&["--json", "backups"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    for args in ["backups", "--json backups", "tasks", "stats"] {
        let (rc, err) = shell(&repo, args, "| true");
        assert_eq!(rc, 0, "{args}: {err}");
        assert!(!err.contains("panicked"), "{args}: {err}");
    }
    let (rc, err) = shell(&repo, "backups", "> /dev/full");
    assert_eq!(rc, 1, "{err}");
    let line: Vec<&str> = err.lines().filter(|l| !l.starts_with("rc=")).collect();
    assert_eq!(
        line,
        ["holdfast: error: write to standard output: No space left on device (os error 28)"]
    );
}

#[test]
fn a_source_that_grows_while_read_is_said_and_marked() {
    let repo = Repo::new();
    let img = repo.tmp("grow.img");
    image(&img, 16, 2);
    let child = repo
        .cmd(&[
            "--json",
            "backup",
            "vm1",
            "--disk",
            &format!("root={}", img.display()),
        ])
        .env("HOLDFAST_TEST_SEGMENT_DELAY_MS", "200")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let f = fs::OpenOptions::new().append(true).open(&img).unwrap();
    f.set_len(24 << 20).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["disks"][0]["size"], 16 << 20);
    assert_eq!(m["disks"][0]["grew_to"], 24 << 20, "{m}");
    assert!(
        err.contains("warning: disk root:") && err.contains("grew from 16777216 to 25165824"),
        "{err}"
    );
}

#[test]
fn exit_codes_are_as_documented() {
    let repo = Repo::new();
    let img = repo.tmp("a.img");
    image(&img, 8, 3);
    repo.run(&[
        "backup",
        "vm1",
        "--disk",
        &format!("root={}", img.display()),
    ])
    .ok();
    // Usage errors exit 2, like clap's own.
    assert_eq!(repo.run(&["backups", "a b"]).code, 2);
    assert_eq!(repo.run(&["stats", "--price=-1"]).code, 2);
    assert_eq!(repo.run(&["stats", "--price", "inf"]).code, 2);
    assert_eq!(repo.run(&["stats", "--price", "NaN"]).code, 2);
    // A sample too small for one chunk still checks one.
    let v = repo
        .run(&["--json", "verify", "--sample", "0.0001"])
        .ok()
        .json();
    assert_eq!(v["chunks_checked"], 1, "{v}");
    // A truncated pack at restore is damage: exit 3, like a flipped or missing one.
    let pack = walk(&repo.path().join("packs"))
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = repo.tmp("out.img");
    let r = repo.run(&["--json", "restore", "vm1", "--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.json()["error"]["code"], "damaged");
    assert!(!out.exists());
}

#[test]
fn partial_files_of_killed_restores_are_removed_and_listed() {
    let repo = Repo::new();
    let img = repo.tmp("a.img");
    image(&img, 16, 4);
    repo.run(&[
        "backup",
        "vm1",
        "--disk",
        &format!("root={}", img.display()),
    ])
    .ok();
    let target = repo.tmp("restored.img");
    let kill_restore = || {
        let mut child = repo
            .cmd(&["restore", "vm1", "--to", target.to_str().unwrap()])
            .env("HOLDFAST_TEST_SEGMENT_DELAY_MS", "300")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let partial = loop {
            let p = fs::read_dir(repo.dir.path()).unwrap().flatten().find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".restored.img.holdfast-partial.")
            });
            if let Some(p) = p {
                break p.path();
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no partial file appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(partial.exists());
        partial
    };
    // A later restore to the same target removes what the killed one left.
    let partial = kill_restore();
    repo.run(&["restore", "vm1", "--to", target.to_str().unwrap()])
        .ok();
    assert!(!partial.exists(), "the stale partial file is gone");
    assert_same(&target, &img);
    fs::remove_file(&target).unwrap();
    // doctor lists others (and removes them unless --dry-run).
    let partial = kill_restore();
    let r = repo.run(&["doctor", "--dry-run"]).ok();
    assert!(
        r.stdout.contains(&partial.display().to_string()),
        "{}",
        r.stdout
    );
    assert!(partial.exists());
    let r = repo.run(&["doctor"]).ok();
    assert!(r.stdout.contains("removed partial restore"), "{}", r.stdout);
    assert!(!partial.exists());
    assert!(repo
        .run(&["doctor"])
        .ok()
        .stdout
        .contains("nothing left behind"));
}

#[test]
fn the_repository_is_private_whatever_the_umask() {
    let d = tempfile::tempdir().unwrap();
    let repo_dir = d.path().join("repo");
    let img = d.path().join("a.img");
    image(&img, 4, 5);
    let run = |args: &str| {
        let script = format!("umask 022; exec {BIN} --repo {} {args}", repo_dir.display());
        Command::new("bash").arg("-c").arg(script).output().unwrap()
    };
    assert!(run("init --encryption none").status.success());
    assert!(run(&format!("backup vm1 --disk root={}", img.display()))
        .status
        .success());
    assert_eq!(mode(&repo_dir), 0o700);
    for p in tree(&repo_dir, true) {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&p), want, "{}", p.display());
    }
    // A repository left readable by others is tightened on open, with a notice.
    assert!(Command::new("chmod")
        .args(["-R", "go+rX"])
        .arg(&repo_dir)
        .status()
        .unwrap()
        .success());
    assert_eq!(mode(&repo_dir.join("config")), 0o644);
    let out = run("backups");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("was readable by other users: made"), "{err}");
    for p in tree(&repo_dir, true) {
        assert_eq!(mode(&p) & 0o077, 0, "{}", p.display());
    }
}
