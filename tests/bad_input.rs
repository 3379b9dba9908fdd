//! Bad input gets a one-line error that says what is wrong and what to do, a non-zero exit,
//! and nothing half-written.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use std::fs;

#[test]
fn clear_errors_for_bad_input() {
    let d = disks();
    let repo = Repo::new();
    let base = d.join("base.img");
    let disk = format!("root={}", base.display());

    // No silent default for encryption: `init` asks for a choice and writes nothing.
    let fresh = Repo {
        dir: tempfile::tempdir().unwrap(),
        env: Vec::new(),
    };
    let r = fresh.run(&["init"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.err().contains("--encryption repokey") && r.err().contains("keyfile"),
        "{}",
        r.stderr
    );
    assert!(!fresh.path().exists(), "a refused init writes nothing");

    let r = repo.run(&["backup", "vm1", "--disk", "root=/nonexistent/disk.img"]);
    assert!(
        r.err()
            .contains("cannot open disk image /nonexistent/disk.img")
            && r.err().contains("check the path"),
        "{}",
        r.stderr
    );
    let r = repo.run(&["backup", "vm1", "--disk", &format!("root={}", d.display())]);
    assert!(
        r.err().contains("is not a regular file or block device"),
        "{}",
        r.stderr
    );
    let r = repo.run(&["backup", "bad name", "--disk", &disk]);
    assert!(
        r.err().contains("invalid VM name \"bad name\""),
        "{}",
        r.stderr
    );
    let r = repo.run(&[
        "backup",
        "vm1",
        "--disk",
        &format!("a/b={}", base.display()),
    ]);
    assert!(
        r.err().contains("invalid disk name \"a/b\""),
        "{}",
        r.stderr
    );
    let r = repo.run(&["backup", "vm1", "--disk", base.to_str().unwrap()]);
    assert!(r.err().contains("must be NAME=PATH"), "{}", r.stderr);
    let r = repo.run(&["backup", "vm1", "--disk", &disk, "--disk", &disk]);
    assert!(r.err().contains("disk root is given twice"), "{}", r.stderr);
    let r = repo.run(&["restore", "ghost", "--to", "/tmp/x.img"]);
    assert!(
        r.err().contains("no backups of VM \"ghost\""),
        "{}",
        r.stderr
    );
    repo.backup("vm1", &[("root", &base)]);
    let r = repo.run(&["show", "vm1@20001122"]);
    assert!(
        r.err().contains("VM vm1 has no backup \"20001122\""),
        "{}",
        r.stderr
    );
    let r = repo.run(&["restore", "vm1", "--disk", "nope", "--to", "/tmp/x.img"]);
    assert!(
        r.err().contains("has no disk \"nope\"; it has: root"),
        "{}",
        r.stderr
    );
    let r = repo.run(&["restore", "vm1", "--to", "/nonexistent-dir/x.img"]);
    assert!(
        r.err()
            .contains("directory /nonexistent-dir does not exist"),
        "{}",
        r.stderr
    );
    let r = repo.run(&["verify", "--sample", "0"]);
    assert!(
        r.err().contains("--sample 0 must be a percentage"),
        "{}",
        r.stderr
    );
    assert_eq!(
        repo.run(&["--json", "backups"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "failed backups leave nothing visible"
    );

    // Not a repository, and a damaged config.
    let empty = tempfile::tempdir().unwrap();
    let r = Repo {
        dir: tempfile::tempdir().unwrap(),
        env: Vec::new(),
    };
    let out = std::process::Command::new(BIN)
        .args(["--repo", empty.path().to_str().unwrap(), "backups"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("is not a holdfast repository (no config); create one with `holdfast init"),
        "{err}"
    );
    drop(r);
    let cfg = repo.path().join("config");
    let good = fs::read(&cfg).unwrap();
    fs::write(&cfg, &good[..good.len() / 2]).unwrap();
    let r = repo.run(&["backups"]);
    assert!(
        r.err().contains("config is damaged: not valid JSON")
            && r.err().contains("restore it from a copy"),
        "{}",
        r.stderr
    );
    fs::write(&cfg, &good).unwrap();
    let r = repo.run(&["init", "--encryption", "none"]);
    assert!(
        r.err().contains("already holds a holdfast repository"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_second_operation_on_the_same_vm_fails_at_once_naming_the_first() {
    let d = disks();
    let repo = Repo::new();
    let flag = repo.tmp("release");
    let mut first = repo
        .cmd(&[
            "backup",
            "vm1",
            "--disk",
            &format!("root={}", d.join("base.img").display()),
        ])
        .env("HOLDFAST_TEST_PAUSE_BEFORE_COMMIT", &flag)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let waiting = flag.with_extension("waiting");
    for _ in 0..600 {
        if waiting.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        waiting.exists(),
        "the first backup never reached its pause point"
    );
    let t = std::time::Instant::now();
    let r = repo.run(&[
        "backup",
        "vm1",
        "--disk",
        &format!("root={}", d.join("second.img").display()),
    ]);
    assert!(t.elapsed().as_secs() < 10, "must fail at once");
    assert_eq!(r.code, 4);
    let e = r.err();
    assert!(
        e.contains("VM vm1 is busy: a backup (pid")
            && e.contains("% done")
            && e.contains("wait for it to finish"),
        "{e}"
    );
    let r = repo.run(&[
        "restore",
        "vm1",
        "--to",
        repo.tmp("x.img").to_str().unwrap(),
    ]);
    assert!(r.code != 0);
    // Another VM is not blocked.
    repo.backup("vm2", &[("root", &d.join("second.img"))]);
    fs::write(&flag, b"go").unwrap();
    assert!(first.wait().unwrap().success());
}

#[test]
fn disk_full_commits_nothing_and_says_so() {
    require("mount", "mount");
    let d = disks();
    let mnt = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs failed (the tests run as root)"
    );
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(mnt.path());
    let repo_dir = mnt.path().join("repo");
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .arg("--repo")
            .arg(&repo_dir)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(run(&["init", "--encryption", "none"]).status.success());
    let out = run(&[
        "--json",
        "backup",
        "vm1",
        "--disk",
        &format!("root={}", d.join("base.img").display()),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["error"]["code"], "store-full", "{json}");
    assert!(
        err.contains("disk full while writing") && err.contains("nothing was committed"),
        "{err}"
    );
    let list = run(&["--json", "backups"]);
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
    let leftovers: Vec<_> = walk(&repo_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}
