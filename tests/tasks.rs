//! Every operation is a task with a durable record: two operations in two processes, one
//! killed with SIGKILL; `holdfast tasks --json` shows the live one's progress rising and the
//! killed one as failed (process ended); the VM lock names the running task; `task --follow`
//! follows to the end with the task's exit code.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A 64 MiB image of incompressible data (16 segments).
fn image(path: &Path, seed: u8) {
    let mut h = blake3::Hasher::new();
    h.update(&[seed]);
    let mut data = vec![0u8; 64 << 20];
    h.finalize_xof().fill(&mut data);
    std::fs::write(path, data).unwrap();
}

fn spawn(repo: &Repo, args: &[&str], env: &[(&str, String)]) -> Child {
    let mut c = repo.cmd(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kill (if still running) and reap a child this test started.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tasks(repo: &Repo) -> Vec<serde_json::Value> {
    repo.run(&["--json", "tasks"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .clone()
}

fn task_of<'a>(list: &'a [serde_json::Value], vm: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|t| t["vms"][0] == vm)
}

/// Poll until `ok` holds (at most `secs` seconds, every 50 ms).
fn wait_until(secs: u64, what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_operation_reads_as_failed_while_a_live_one_reports_rising_progress() {
    let repo = Repo::new();
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    image(&a, 1);
    image(&b, 2);
    // B pauses before its commit; A reads slowly (150 ms a segment: about 2.4 s).
    let flag = d.path().join("go");
    let pause = [(
        "HOLDFAST_TEST_PAUSE_AT",
        format!("before-commit:{}", flag.display()),
    )];
    let disk_b = format!("root={}", b.display());
    let mut killed = Reap(spawn(&repo, &["backup", "vm-b", "--disk", &disk_b], &pause));
    wait_until(60, "B to pause", || flag.with_extension("waiting").exists());
    let slow = [("HOLDFAST_TEST_SEGMENT_DELAY_MS", "150".to_string())];
    let disk_a = format!("root={}", a.display());
    let mut live = Reap(spawn(&repo, &["backup", "vm-a", "--disk", &disk_a], &slow));
    wait_until(30, "A's record", || {
        task_of(&tasks(&repo), "vm-a").is_some()
    });
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();

    // The killed one reads as failed at once; A's progress rises while it runs.
    let mut seen = Vec::new();
    let t = Instant::now();
    loop {
        let list = tasks(&repo);
        let b = task_of(&list, "vm-b").unwrap();
        assert_eq!(b["state"], "failed", "{b}");
        assert_eq!(b["outcome"]["error"]["code"], "process-ended", "{b}");
        assert_eq!(b["kind"], "backup");
        assert!(b["user"].as_str().unwrap().starts_with("cli:"), "{b}");
        let a = task_of(&list, "vm-a").unwrap();
        if a["state"] != "running" {
            break;
        }
        if a["progress"]["phase"] == "backup" {
            assert_eq!(a["progress"]["total"], 64 << 20, "{a}");
            let done = a["progress"]["done"].as_u64().unwrap();
            if seen.last() != Some(&done) {
                seen.push(done);
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "A never ended: {a}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(live.0.wait().unwrap().success());
    assert!(seen.len() >= 3, "progress seen rising: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "progress only rises: {seen:?}"
    );
    let list = tasks(&repo);
    let a = task_of(&list, "vm-a").unwrap();
    assert_eq!(a["state"], "ok", "{a}");
    assert_eq!(a["progress"]["done"], 64 << 20);
    assert_eq!(a["progress"]["percent"], 100.0);
    let backup = a["outcome"]["backup"].as_str().unwrap();
    assert!(backup.starts_with("vm-a@"), "{a}");
    // The record's backup is the committed one.
    let shown = repo.run(&["--json", "show", backup]).ok().json();
    assert_eq!(format!("vm-a@{}", shown["id"].as_str().unwrap()), backup);
    // `tasks --running` is empty now; `--vm` filters.
    assert!(repo
        .run(&["--json", "tasks", "--running"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    let only_b = repo.run(&["--json", "tasks", "--vm", "vm-b"]).ok().json();
    assert_eq!(only_b.as_array().unwrap().len(), 1);
    // The killed backup committed nothing; its VM is free again (the kernel released the lock).
    assert!(repo.run(&["backups", "vm-b"]).code != 0);
    repo.run(&["backup", "vm-b", "--disk", &disk_b]).ok();
    // A task shown by id (a prefix works) and in text.
    let id = a["id"].as_str().unwrap();
    let one = repo
        .run(&["--json", "task", &id[..id.len() - 2]])
        .ok()
        .json();
    assert_eq!(one["id"], id);
    let text = repo.run(&["task", id]).ok().stdout;
    assert!(
        text.contains("state     ok") && text.contains(backup),
        "{text}"
    );
    let b_id = task_of(&list, "vm-b").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let text = repo.run(&["task", &b_id]).ok().stdout;
    assert!(text.contains("failed: process ended"), "{text}");
}

#[test]
fn the_lock_names_the_running_task_and_follow_ends_with_its_exit_code() {
    let repo = Repo::new();
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    image(&a, 3);
    let flag = d.path().join("go");
    let pause = [(
        "HOLDFAST_TEST_PAUSE_AT",
        format!("before-commit:{}", flag.display()),
    )];
    let disk = format!("root={}", a.display());
    let mut child = Reap(spawn(&repo, &["backup", "web", "--disk", &disk], &pause));
    wait_until(60, "the backup to pause", || {
        flag.with_extension("waiting").exists()
    });
    let running = repo.run(&["--json", "tasks", "--running"]).ok().json();
    let id = running[0]["id"].as_str().unwrap().to_string();
    assert_eq!(running[0]["progress"]["phase"], "backup");

    // A second operation on the VM is refused at once, naming the task, and leaves no record.
    let r = repo.run(&["--json", "backup", "web", "--disk", &disk]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "busy");
    assert_eq!(e["details"]["task"], id.as_str());
    assert_eq!(e["details"]["operation"], "backup");
    assert!(
        r.stderr.contains(&format!("holdfast task {id} --follow")),
        "{}",
        r.stderr
    );
    assert_eq!(
        tasks(&repo).len(),
        1,
        "a refused operation leaves no record"
    );

    // Follow it to the end: lines while it runs, the record at the end, exit code 0.
    let mut follow = repo.cmd(&["task", &id, "--follow"]);
    let follower = follow
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&flag, b"").unwrap();
    assert!(child.0.wait().unwrap().success());
    let out = follower.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{id} running backup")), "{text}");
    assert!(text.contains("state     ok"), "{text}");

    // A cancelled task: SIGINT while paused; follow then exits 130 like the command did.
    let flag2 = d.path().join("go2");
    let pause = [(
        "HOLDFAST_TEST_PAUSE_AT",
        format!("before-commit:{}", flag2.display()),
    )];
    let mut child = Reap(spawn(&repo, &["backup", "web", "--disk", &disk], &pause));
    wait_until(60, "the second backup to pause", || {
        flag2.with_extension("waiting").exists()
    });
    signal(child.0.id(), libc::SIGINT);
    std::fs::write(&flag2, b"").unwrap();
    assert_eq!(child.0.wait().unwrap().code(), Some(130));
    let last = tasks(&repo).into_iter().last().unwrap();
    assert_eq!(last["state"], "cancelled", "{last}");
    assert_eq!(last["outcome"]["error"]["code"], "cancelled");
    let r = repo.run(&["task", last["id"].as_str().unwrap(), "--follow"]);
    assert_eq!(r.code, 130, "{}", r.stdout);
    assert_eq!(
        repo.run(&["--json", "backups", "web"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn old_records_are_pruned_per_vm_as_configured() {
    let repo = Repo::new();
    std::fs::write(
        repo.path().join("vms.toml"),
        "[tasks]\nkeep = 2\n[policy]\nbackup.slots = 10\n",
    )
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    std::fs::write(&a, vec![1u8; 1 << 20]).unwrap();
    let disk = format!("root={}", a.display());
    for _ in 0..4 {
        repo.run(&["backup", "a", "--disk", &disk]).ok();
    }
    repo.run(&["backup", "b", "--disk", &disk]).ok();
    let list = tasks(&repo);
    let count = |vm: &str| list.iter().filter(|t| t["vms"][0] == vm).count();
    assert_eq!((count("a"), count("b")), (2, 1), "{list:?}");
    // The newest two of `a` are kept.
    let ids = repo.run(&["--json", "backups", "a"]).ok().json();
    let newest = ids.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(list
        .iter()
        .any(|t| t["outcome"]["backup"] == format!("a@{newest}")));
    // A malformed id is a usage error, an unknown one is not found.
    assert_eq!(
        repo.run(&["--json", "task", "../x"]).json()["error"]["code"],
        "usage"
    );
    assert_eq!(
        repo.run(&["--json", "task", "20001122"]).json()["error"]["code"],
        "not-found"
    );
}
