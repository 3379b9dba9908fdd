//! Backups of running VMs through QEMU 10 (qemu-system-x86_64, TCG, no guest OS): read points
//! with changed-block tracking, writes while the backup runs, failures and kills at every step
//! of the cycle, and quiesce without a guest agent.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::qemu::Vm;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const SEG: u64 = 4 << 20;

fn declare(repo: &Repo, vm: &Vm, name: &str) {
    vm.declare(repo, name);
}

/// Seeded regions (offset, len) inside a disk of `size` bytes.
fn regions(seed: u64, n: usize, size: u64) -> Vec<(u64, u64)> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 11
    };
    (0..n)
        .map(|_| {
            let len = (next() % 256 + 1) * 4096;
            let off = (next() % ((size - len) / 4096)) * 4096;
            (off, len)
        })
        .collect()
}

/// The 4 MiB segments [off, off+len) touches.
fn segments(rs: &[(u64, u64)]) -> std::collections::BTreeSet<u64> {
    rs.iter()
        .flat_map(|&(o, l)| o / SEG..=(o + l - 1) / SEG)
        .collect()
}

fn restore_equals(repo: &Repo, spec: &str, disk: &str, expected: &Path) {
    let out = repo.tmp(&format!("restore-{disk}.raw"));
    let _ = std::fs::remove_file(&out);
    repo.run(&[
        "restore",
        spec,
        "--disk",
        disk,
        "--to",
        out.to_str().unwrap(),
    ])
    .ok();
    assert_same(&out, expected);
}

fn disk_entry<'a>(m: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap()
}

/// QEMU holds nothing of holdfast but one recording checkpoint bitmap per disk, named as the
/// manifest `m` says.
fn clean_with_checkpoint(vm: &Vm, m: &serde_json::Value) {
    let (nodes, exports, jobs, bitmaps) = vm.holdfast_objects();
    assert!(
        nodes.is_empty() && exports.is_empty() && jobs.is_empty(),
        "left in QEMU: nodes {nodes:?} exports {exports:?} jobs {jobs:?}"
    );
    let cp = disk_entry(m, "root")["checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let want: Vec<(String, String, bool)> = vm
        .disks
        .iter()
        .map(|d| (d.node.clone(), cp.clone(), true))
        .collect();
    assert_eq!(
        bitmaps, want,
        "exactly the new checkpoint, recording, on every disk"
    );
}

#[test]
fn incremental_backups_of_a_running_vm_with_writes_during_the_backup() {
    let repo = Repo::new();
    let vm = Vm::start(&[("qcow2", 64), ("qcow2", 32)], false);
    declare(&repo, &vm, "web");
    let (root, data) = (repo.tmp("root.raw"), repo.tmp("data.raw"));

    // First backup: a full read of what is allocated.
    let b1 = repo.backup_args(&["web"]);
    assert!(
        disk_entry(&b1, "root")["checkpoint"]
            .as_str()
            .unwrap()
            .starts_with("holdfast-cp-"),
        "{b1}"
    );
    assert!(disk_entry(&b1, "root")["bitmap"].is_null());
    vm.snapshot_raw(0, &root);
    vm.snapshot_raw(1, &data);
    restore_equals(&repo, "web", "root", &root);
    restore_equals(&repo, "web", "data", &data);
    clean_with_checkpoint(&vm, &b1);

    // N random regions written between backups: only their segments are read.
    let rs = regions(1, 12, 64 << 20);
    for (i, &(o, l)) in rs.iter().enumerate() {
        vm.write(0, 0x80 + i as u8, o, l);
    }
    vm.write(1, 0xee, 5 << 20, 4096);
    let b2 = repo.backup_args(&["web"]);
    let r = disk_entry(&b2, "root");
    assert_eq!(
        r["bitmap"],
        disk_entry(&b1, "root")["checkpoint"],
        "the incremental reads the previous checkpoint"
    );
    assert_eq!(r["since"], b1["id"]);
    let want = (segments(&rs).len() as u64 + 1) * SEG;
    assert_eq!(
        u(&b2, "/stats/read_bytes"),
        want,
        "bytes read are the dirty segments: {b2}"
    );
    vm.snapshot_raw(0, &root);
    vm.snapshot_raw(1, &data);
    restore_equals(&repo, "web", "root", &root);
    restore_equals(&repo, "web", "data", &data);
    clean_with_checkpoint(&vm, &b2);

    // Writes while the backup runs (after its read point): the backup is the disk at the read
    // point, the live disk keeps the writes, and the next incremental picks them up.
    let flag = repo.tmp("go");
    let child = repo
        .cmd(&["--json", "backup", "web"])
        .env(
            "HOLDFAST_TEST_PAUSE_AT",
            format!("after-read-point:{}", flag.display()),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !flag.with_extension("waiting").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the backup did not reach its read point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (at_point, data_at_point) = (repo.tmp("root-at-point.raw"), repo.tmp("data-at-point.raw"));
    vm.snapshot_raw(0, &at_point);
    vm.snapshot_raw(1, &data_at_point);
    let during = regions(2, 6, 64 << 20);
    for &(o, l) in &during {
        vm.write(0, 0x55, o, l);
    }
    std::fs::write(&flag, b"").unwrap();
    // More writes while the backup reads.
    let racing = regions(3, 6, 64 << 20);
    for &(o, l) in &racing {
        vm.write(0, 0x66, o, l);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b3: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    restore_equals(
        &repo,
        &format!("web@{}", b3["id"].as_str().unwrap()),
        "root",
        &at_point,
    );
    restore_equals(
        &repo,
        &format!("web@{}", b3["id"].as_str().unwrap()),
        "data",
        &data_at_point,
    );
    vm.snapshot_raw(0, &root);
    let live = std::fs::read(&root).unwrap();
    for (rs, p) in [(&during, 0x55), (&racing, 0x66)] {
        for &(o, l) in rs
            .iter()
            .filter(|&&(o, l)| p == 0x66 || !racing.iter().any(|&(a, b)| a < o + l && o < a + b))
        {
            assert!(
                live[o as usize..(o + l) as usize].iter().all(|&b| b == p),
                "the live disk keeps the write at {o}"
            );
        }
    }
    clean_with_checkpoint(&vm, &b3);
    let b4 = repo.backup_args(&["web"]);
    let both: Vec<(u64, u64)> = during.iter().chain(&racing).copied().collect();
    assert_eq!(
        u(&b4, "/stats/read_bytes"),
        segments(&both).len() as u64 * SEG,
        "the writes made during b3 are b4's dirty segments"
    );
    restore_equals(&repo, "web", "root", &root);

    // --full reads everything allocated and still commits a checkpoint.
    let b5 = repo.backup_args(&["web", "--full"]);
    assert!(disk_entry(&b5, "root")["bitmap"].is_null());
    assert!(u(&b5, "/stats/read_bytes") > 2 * SEG);
    clean_with_checkpoint(&vm, &b5);
    let v = repo.run(&["--json", "verify"]).ok().json();
    assert_eq!(v["damaged"].as_array().unwrap().len(), 0);
}

#[test]
fn failures_and_kills_at_every_step_leave_qemu_clean_and_the_next_backup_correct() {
    let repo = Repo::new();
    let vm = Vm::start(&[("qcow2", 48)], false);
    declare(&repo, &vm, "db");
    let root = repo.tmp("root.raw");
    let mut last = repo.backup_args(&["db"]);
    let mut seed = 10;
    for (env, value, via_doctor) in [
        ("HOLDFAST_TEST_KILL_AT", "after-read-point", false),
        ("HOLDFAST_TEST_CRASH_AFTER_PACKS", "1", true),
        ("HOLDFAST_TEST_KILL_AT", "before-commit", false),
        ("HOLDFAST_TEST_KILL_AT", "after-commit", true),
        ("HOLDFAST_TEST_FAIL_AT", "before-commit", false),
        ("HOLDFAST_TEST_FAIL_AT", "after-read-point", false),
    ] {
        seed += 1;
        let rs = regions(seed, 10, 48 << 20);
        for &(o, l) in &rs {
            vm.write(0, seed as u8, o, l);
        }
        let r = repo.run_env(&["--json", "backup", "db"], &[(env, value)]);
        assert_ne!(r.code, 0, "{env}={value} must fail the run");
        let committed = repo.run(&["--json", "backups", "db"]).ok().json();
        let n_committed = committed.as_array().unwrap().len();
        if env == "HOLDFAST_TEST_FAIL_AT" {
            // A failure (not a kill) cleans up by itself: nothing left, the old checkpoint kept
            // recording, with the writes made meanwhile merged back.
            assert_eq!(r.code, 1);
            assert!(
                r.err().contains(&format!("HOLDFAST_TEST_FAIL_AT={value}")),
                "{}",
                r.stderr
            );
            clean_with_checkpoint(&vm, &last);
        } else {
            let report = repo
                .run(&["--json", "doctor", "db", "--dry-run"])
                .ok()
                .json();
            assert!(
                !report["leftovers"].as_array().unwrap().is_empty(),
                "{env}={value}: a killed run leaves something: {report}"
            );
            if via_doctor {
                let cleaned = repo.run(&["--json", "doctor", "db"]).ok().json();
                assert_eq!(cleaned["leftovers"], report["leftovers"]);
                let again = repo
                    .run(&["--json", "doctor", "db", "--dry-run"])
                    .ok()
                    .json();
                assert!(again["leftovers"].as_array().unwrap().is_empty(), "{again}");
            }
        }
        // The next backup cleans what is left, reads what changed, and is right.
        let next = repo.run(&["--json", "backup", "db"]);
        assert_eq!(next.code, 0, "{env}={value}: {}", next.stderr);
        if !via_doctor && env != "HOLDFAST_TEST_FAIL_AT" {
            assert!(
                next.stderr
                    .contains("removed a leftover of an interrupted run"),
                "{env}={value}: {}",
                next.stderr
            );
        }
        let m = next.json();
        vm.snapshot_raw(0, &root);
        restore_equals(&repo, "db", "root", &root);
        clean_with_checkpoint(&vm, &m);
        let after = repo
            .run(&["--json", "backups", "db"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len();
        assert_eq!(after, n_committed + 1);
        last = m;
    }
}

#[test]
fn quiesce_without_a_reachable_guest_agent_fails_clearly_and_leaves_the_vm_alone() {
    let repo = Repo::new();
    let vm = Vm::start(&[("qcow2", 16)], true);
    declare(&repo, &vm, "app");
    let b1 = repo.backup_args(&["app"]);
    let t = Instant::now();
    let r = repo.run(&["backup", "app", "--quiesce"]);
    assert_eq!(r.code, 1);
    let e = r.err();
    assert!(
        e.contains("guest agent") && e.contains("retry without --quiesce"),
        "{e}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(45),
        "bounded wait: {:?}",
        t.elapsed()
    );
    assert!(vm.running(), "the VM keeps running");
    clean_with_checkpoint(&vm, &b1);
    repo.backup_args(&["app"]);
    // A VM declared without an agent: refused before anything happens.
    let repo2 = Repo::new();
    let vm2 = Vm::start(&[("qcow2", 16)], false);
    declare(&repo2, &vm2, "app");
    let e = repo2.run(&["backup", "app", "--quiesce"]);
    assert!(
        e.err()
            .contains("--quiesce needs VM app's guest agent socket"),
        "{}",
        e.stderr
    );
}

#[test]
fn vm_declarations_and_bad_input() {
    let repo = Repo::new();
    let vm = Vm::start(&[("qcow2", 16)], false);
    let q = vm.qmp.to_str().unwrap();
    let bad = |args: &[&str], want: &str| {
        let r = repo.run(args);
        assert_ne!(r.code, 0, "{args:?}");
        assert!(r.err().contains(want), "{args:?}: {}", r.stderr);
    };
    bad(
        &["vm", "add", "web", "--qmp", q, "--disk", "root=nosuchnode"],
        "disk root:",
    );
    bad(
        &[
            "vm",
            "add",
            "web",
            "--qmp",
            "/nonexistent.sock",
            "--disk",
            "root=disk0",
        ],
        "cannot connect to QMP socket /nonexistent.sock",
    );
    bad(
        &["vm", "add", "web", "--qmp", q, "--disk", "root"],
        "must be NAME=NODE",
    );
    bad(&["backup", "ghost"], "VM \"ghost\" is not declared");
    repo.run(&["vm", "add", "web", "--qmp", q, "--disk", "root=disk0"])
        .ok();
    bad(
        &["vm", "add", "web", "--qmp", q, "--disk", "root=disk0"],
        "is already declared",
    );
    let l = repo.run(&["vm", "list"]).ok().stdout;
    assert!(l.contains("web") && l.contains("root=disk0"), "{l}");
    // The same VM on the command line, without a declaration.
    let m = repo.backup_args(&["adhoc", "--qmp", q, "--disk", "root=disk0"]);
    assert_eq!(m["vm"], "adhoc");
    repo.run(&["vm", "remove", "web"]).ok();
    bad(&["vm", "remove", "web"], "is not declared");
}

#[test]
fn crashes_swapped_disks_foreign_overlays_and_ctrl_c() {
    let repo = Repo::new();
    let mut vm = Vm::start(&[("qcow2", 32), ("qcow2", 32)], false);
    declare(&repo, &vm, "web");
    let (root, data) = (repo.tmp("root.raw"), repo.tmp("data.raw"));
    let b1 = repo.backup_args(&["web"]);
    clean_with_checkpoint(&vm, &b1);

    // The VM shut down and started again: the checkpoint was saved in the image, and the next
    // backup is still incremental.
    vm.shutdown();
    vm.boot();
    vm.write(0, 0x70, 9 << 20, 64 << 10);
    let b = repo.backup_args(&["web"]);
    assert_eq!(
        disk_entry(&b, "root")["bitmap"],
        disk_entry(&b1, "root")["checkpoint"],
        "{b}"
    );
    assert_eq!(u(&b, "/stats/read_bytes"), SEG);
    vm.snapshot_raw(0, &root);
    restore_equals(&repo, "web", "root", &root);
    // Saved once more, loaded, then QEMU crashes: the bitmaps come back inconsistent. The next
    // backup removes them and reads everything, instead of failing or trusting them.
    vm.shutdown();
    vm.boot();
    vm.write(0, 0x71, 1 << 20, 64 << 10);
    vm.crash();
    vm.boot();
    let b2 = repo.run(&["--json", "backup", "web"]);
    assert_eq!(b2.code, 0, "{}", b2.stderr);
    assert!(b2.stderr.contains("inconsistent bitmap"), "{}", b2.stderr);
    let b2 = b2.json();
    assert!(
        disk_entry(&b2, "root")["bitmap"].is_null(),
        "a full read after a crash: {b2}"
    );
    vm.snapshot_raw(0, &root);
    restore_equals(&repo, "web", "root", &root);
    clean_with_checkpoint(&vm, &b2);

    // The disks swapped in the declaration: a checkpoint is trusted only for the same image.
    repo.run(&["vm", "remove", "web"]).ok();
    let q = vm.qmp.to_str().unwrap().to_string();
    repo.run(&[
        "vm",
        "add",
        "web",
        "--qmp",
        &q,
        "--disk",
        "root=disk1",
        "--disk",
        "data=disk0",
    ])
    .ok();
    let b3 = repo.backup_args(&["web"]);
    for d in ["root", "data"] {
        assert!(
            disk_entry(&b3, d)["bitmap"].is_null(),
            "{d}: read whole after the swap: {b3}"
        );
    }
    vm.snapshot_raw(1, &root);
    vm.snapshot_raw(0, &data);
    restore_equals(&repo, "web", "root", &root);
    restore_equals(&repo, "web", "data", &data);

    // An overlay made outside holdfast on top of a declared node: refused, not backed up stale.
    let ov = vm.dir.path().join("foreign.qcow2");
    vm.qmp("blockdev-snapshot-sync", serde_json::json!({ "node-name": "disk1", "snapshot-file": ov.to_str().unwrap(), "snapshot-node-name": "foreign", "format": "qcow2" }));
    let r = repo.run(&["backup", "web"]);
    assert!(
        r.err().contains("VM web disk root: node disk1")
            && r.err().contains("declare the top node"),
        "{}",
        r.stderr
    );
    vm.qmp(
        "block-commit",
        serde_json::json!({ "job-id": "c1", "device": "foreign" }),
    );
    let t = Instant::now();
    while vm.qmp("query-jobs", serde_json::json!({}))[0]["status"] != "ready" {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.qmp("job-complete", serde_json::json!({ "id": "c1" }));
    let t = Instant::now();
    while !vm
        .qmp("query-jobs", serde_json::json!({}))
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = repo.backup_args(&["web"]);

    // Ctrl-C, or the terminal going away (SIGHUP, as when an SSH session drops), while the
    // backup runs: it stops, commits nothing, takes its read point down (export, job, fleecing
    // node and file, the new bitmap) and records the task as cancelled.
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGHUP, "SIGHUP")] {
        let flag = repo.tmp(&format!("go-{name}"));
        let child = repo
            .cmd(&["backup", "web"])
            .env(
                "HOLDFAST_TEST_PAUSE_AT",
                format!("after-read-point:{}", flag.display()),
            )
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !flag.with_extension("waiting").exists() {
            assert!(t.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(20));
        }
        common::signal(child.id(), sig);
        std::thread::sleep(Duration::from_millis(200));
        std::fs::write(&flag, b"").unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{name}: {err}");
        assert!(
            err.contains(&format!("interrupted ({name})")) && err.contains("nothing was committed"),
            "{err}"
        );
        clean_with_checkpoint(&vm, &last);
        let work = repo.path().join("work/web");
        let fleecing: Vec<_> = std::fs::read_dir(&work)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("holdfast-rp"))
            .collect();
        assert!(
            fleecing.is_empty(),
            "{name}: fleecing files left: {fleecing:?}"
        );
        let tasks = repo.run(&["--json", "tasks", "--vm", "web"]).ok().json();
        let task = tasks.as_array().unwrap().last().unwrap().clone();
        assert_eq!(task["state"], "cancelled", "{name}: {task}");
        assert_eq!(task["outcome"]["error"]["code"], "cancelled");
    }
    assert_eq!(
        repo.run(&["--json", "backups", "web"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        5,
        "the interrupted runs committed nothing"
    );
}

#[test]
fn qemu_storage_daemon_with_its_own_nbd_server() {
    let repo = Repo::new();
    let vm = Vm::start_qsd(&[("qcow2", 32)]);
    let common::qemu::Runner::Qsd(nbd) = vm.runner.clone() else {
        unreachable!()
    };
    let q = vm.qmp.to_str().unwrap().to_string();
    // QEMU runs one NBD server: without its socket, holdfast says what to configure.
    repo.run(&["vm", "add", "other", "--qmp", &q, "--disk", "root=disk0"])
        .ok();
    let e = repo.run(&["backup", "other"]);
    assert!(
        e.err().contains("QEMU already runs an NBD server") && e.err().contains("--nbd-socket"),
        "{}",
        e.stderr
    );
    repo.run(&[
        "vm",
        "add",
        "qsd",
        "--qmp",
        &q,
        "--disk",
        "root=disk0",
        "--nbd-socket",
        nbd.to_str().unwrap(),
    ])
    .ok();

    let root = repo.tmp("root.raw");
    let b1 = repo.backup_args(&["qsd"]);
    vm.snapshot_raw(0, &root);
    restore_equals(&repo, "qsd", "root", &root);
    let rs = regions(7, 8, 32 << 20);
    for &(o, l) in &rs {
        vm.write(0, 0x3c, o, l);
    }
    let b2 = repo.backup_args(&["qsd"]);
    assert_eq!(
        disk_entry(&b2, "root")["bitmap"],
        disk_entry(&b1, "root")["checkpoint"]
    );
    assert_eq!(
        u(&b2, "/stats/read_bytes"),
        segments(&rs).len() as u64 * SEG
    );
    vm.snapshot_raw(0, &root);
    restore_equals(&repo, "qsd", "root", &root);
    let (nodes, exports, jobs, _) = vm.holdfast_objects();
    assert!(
        nodes.is_empty() && jobs.is_empty() && exports == vec!["live0".to_string()],
        "only the daemon's own export stays: {exports:?}"
    );

    // Disk-only snapshots work on the daemon; memory state needs a full VM.
    let made = repo
        .run(&["--json", "snapshot", "create", "qsd", "Before"])
        .ok()
        .json();
    assert_eq!(made[0]["kind"], "Internal");
    let e = repo.run(&["snapshot", "create", "qsd", "Mem", "--memory"]);
    assert!(e.err().contains("already has 1 snapshot"), "{}", e.stderr);
    repo.run(&["snapshot", "delete", "qsd", "Before"]).ok();
    let e = repo.run(&["snapshot", "create", "qsd", "Mem", "--memory"]);
    assert!(
        e.err().contains("--memory needs a full VM (qemu-system)"),
        "{}",
        e.stderr
    );
    assert!(repo
        .run(&["--json", "snapshot", "list"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .is_empty());
}
