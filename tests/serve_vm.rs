//! `holdfast serve` with a running VM (qemu-system-x86_64 over QMP): declared, backed up and
//! snapshotted through the API; then SIGTERM while a backup holds a read point in QEMU. The
//! service exits 0 in bounded time, QEMU holds no holdfast nodes, exports, jobs or stray
//! bitmaps, and the task says `cancelled`.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;

use common::qemu::Vm;
use common::service::{self, Service};
use common::Repo;
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

#[test]
fn sigterm_during_a_vm_backup_tears_its_read_point_down() {
    let repo = Repo::new();
    let vm = Vm::start(&[("qcow2", 32)], false);
    let admin = service::user(&repo, "admin", "admin", &[]);
    let op = service::user(&repo, "op", "operator", &["web"]);
    let flag = repo.tmp("go");
    std::fs::write(&flag, b"").unwrap(); // the first backup passes the pause point
    let pause = format!("after-read-point:{}", flag.display());
    let mut s = Service::start_with(&repo, &[], &[("HOLDFAST_TEST_PAUSE_AT", &pause)]);

    let r = s.post(
        "/api/v1/vms",
        &admin,
        json!({"name": "web", "qmp": vm.qmp.to_str().unwrap(), "disks": {"root": "disk0"}}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["declared"], true);
    let r = s.post(
        "/api/v1/vms",
        &admin,
        json!({"name": "ghost", "qmp": "/nonexistent.sock", "disks": {"root": "disk0"}}),
    );
    assert_eq!((r.status, r.code()), (422, "invalid-body"), "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot connect to QMP socket"),
        "{:?}",
        r.body
    );

    // A full backup by an operator, then a snapshot, through the API.
    let r = s.post("/api/v1/vms/web/backups", &op, json!({}));
    assert_eq!(r.status, 202, "{:?}", r.body);
    let t = s.wait_task(r.body["task"].as_str().unwrap(), &op, WAIT);
    assert_eq!(t["state"], "ok", "{t}");
    let backup = t["outcome"]["backup"].as_str().unwrap().to_string();
    let id = backup.split('@').nth(1).unwrap();
    let m = s.get(&format!("/api/v1/vms/web/backups/{id}"), &op).body;
    assert_eq!(m["disks"][0]["size"], 32 << 20);
    let r = s.post(
        "/api/v1/vms/web/snapshots",
        &op,
        json!({"name": "PreUpdate", "memory": true, "description": "before", "ttl": "2d"}),
    );
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(
        s.wait_task(r.body["task"].as_str().unwrap(), &op, WAIT)["state"],
        "ok"
    );
    let list = s.get("/api/v1/vms/web/snapshots", &op).body;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        (list[0]["name"].as_str(), list[0]["stateful"].as_bool()),
        (Some("PreUpdate"), Some(true)),
        "{list}"
    );
    let cli = repo.run(&["--json", "snapshot", "list", "web"]).ok().json();
    assert_eq!(cli[0]["name"], "PreUpdate");
    let r = s.post("/api/v1/vms/web/snapshots", &op, json!({"name": "Second"}));
    let t = s.wait_task(r.body["task"].as_str().unwrap(), &op, WAIT);
    assert_eq!(
        t["outcome"]["error"]["code"], "limit-reached",
        "the CLI's rule: {t}"
    );
    let r = s.call("DELETE", "/api/v1/vms/web/snapshots/PreUpdate", &op, None);
    assert_eq!(
        s.wait_task(r.body["task"].as_str().unwrap(), &op, WAIT)["state"],
        "ok"
    );

    // The second backup stops at its read point; SIGTERM reaches the service there.
    std::fs::remove_file(&flag).unwrap();
    let _ = std::fs::remove_file(flag.with_extension("waiting"));
    let r = s.post("/api/v1/vms/web/backups", &op, json!({}));
    assert_eq!(r.status, 202, "{:?}", r.body);
    let task = r.body["task"].as_str().unwrap().to_string();
    let t = Instant::now();
    while !flag.with_extension("waiting").exists() {
        assert!(t.elapsed() < WAIT);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (nodes, exports, _, _) = vm.holdfast_objects();
    assert!(
        !nodes.is_empty() && !exports.is_empty(),
        "the read point is up: {nodes:?} {exports:?}"
    );
    common::signal(s.pid(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&flag, b"").unwrap();
    let t = Instant::now();
    let code = s.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", s.stderr());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "stopped in {:?}",
        t.elapsed()
    );
    assert!(
        s.stderr().contains("interrupted (SIGTERM)"),
        "{}",
        s.stderr()
    );

    // QEMU: nothing of holdfast's but the first backup's checkpoint, recording.
    let (nodes, exports, jobs, bitmaps) = vm.holdfast_objects();
    assert!(
        nodes.is_empty() && exports.is_empty() && jobs.is_empty(),
        "left in QEMU: {nodes:?} {exports:?} {jobs:?}"
    );
    let cp = m["disks"][0]["checkpoint"].as_str().unwrap().to_string();
    assert_eq!(bitmaps, vec![("disk0".to_string(), cp, true)]);
    assert!(vm.running());
    let rec = repo.run(&["--json", "task", &task]).ok().json();
    assert_eq!(
        (
            rec["state"].as_str(),
            rec["outcome"]["error"]["code"].as_str()
        ),
        (Some("cancelled"), Some("cancelled")),
        "{rec}"
    );
    assert_eq!(
        repo.run(&["--json", "backups", "web"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "nothing committed"
    );
    assert!(!repo.path().join("holdfast.sock").exists());
    // The VM is free again: the CLI backs it up.
    repo.run(&["backup", "web"]).ok();
}

#[test]
fn a_snapshot_past_its_lifespan_is_removed_by_the_service_and_an_event_says_so() {
    let repo = Repo::new();
    let vm = Vm::start(&[("qcow2", 16)], false);
    let hook = common::hook::Hook::start();
    let p = repo.path().join("vms.toml");
    let mut cfg = std::fs::read_to_string(&p).unwrap();
    cfg.push_str(&format!(
        "[notify.target.hook]\nwebhook = \"{}\"\nevents = [\"snapshot\", \"schedule\"]\n",
        hook.url
    ));
    std::fs::write(&p, cfg).unwrap();
    repo.run(&[
        "vm",
        "add",
        "web",
        "--qmp",
        vm.qmp.to_str().unwrap(),
        "--disk",
        "root=disk0",
    ])
    .ok();
    let admin = service::user(&repo, "admin", "admin", &[]);
    let s = Service::start(&repo);
    // A lifespan beyond the policy's most (10 days) is refused.
    let r = s.post(
        "/api/v1/vms/web/snapshots",
        &admin,
        json!({"name": "long", "ttl": "30d"}),
    );
    assert_eq!((r.status, r.code()), (400, "usage"), "{:?}", r.body);
    let r = s.post(
        "/api/v1/vms/web/snapshots",
        &admin,
        json!({"name": "brief", "ttl": "5s"}),
    );
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(
        s.wait_task(r.body["task"].as_str().unwrap(), &admin, WAIT)["state"],
        "ok"
    );
    let made = Instant::now();
    assert_eq!(vm.snapshot_tags("disk0").len(), 1);
    // Gone within a minute of its expiry (the sweep runs every 10 s).
    loop {
        let list = s.get("/api/v1/vms/web/snapshots", &admin).body;
        if list.as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            made.elapsed() < Duration::from_secs(65),
            "still there: {list}\n{}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        made.elapsed() >= Duration::from_secs(5),
        "not before its time"
    );
    assert!(
        vm.snapshot_tags("disk0").is_empty(),
        "QEMU no longer has it"
    );
    let got = hook.wait(WAIT, "the expired event", |d| {
        d.iter().any(|x| x.json()["event"] == "snapshot.expired")
    });
    let e = got
        .iter()
        .map(|d| d.json())
        .find(|e| e["event"] == "snapshot.expired")
        .unwrap();
    assert_eq!(
        (e["vm"].as_str(), e["title"].as_str()),
        (Some("web"), Some("Snapshot Expired"))
    );
    assert!(e["summary"].as_str().unwrap().contains("brief"), "{e}");
    // The creation was an event too.
    assert!(got
        .iter()
        .any(|d| d.json()["event"] == "snapshot.completed"));

    // A snapshot schedule set through the API: the first run takes one; the next finds the
    // VM at its limit (1) and is skipped, with an event that says why.
    let r = s.call(
        "PUT",
        "/api/v1/vms/web/policy",
        &admin,
        Some(&json!({"snapshot": {"schedule": "*:*:0/2", "name": "auto-%H%M%S"}})),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["snapshot_schedule"], "*:*:0/2");
    let t = Instant::now();
    let auto = loop {
        let list = s.get("/api/v1/vms/web/snapshots", &admin).body;
        if let Some(x) = list.as_array().unwrap().first() {
            break x.clone();
        }
        assert!(t.elapsed() < WAIT, "no scheduled snapshot");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        auto["name"].as_str().unwrap().starts_with("auto-"),
        "{auto}"
    );
    let got = hook.wait(WAIT, "a skipped run", |d| {
        d.iter().any(|x| x.json()["event"] == "schedule.skipped")
    });
    let e = got
        .iter()
        .map(|d| d.json())
        .find(|e| e["event"] == "schedule.skipped")
        .unwrap();
    assert_eq!(e["error_code"], "limit-reached", "{e}");
    assert!(
        e["error_message"].as_str().unwrap().contains("its limit"),
        "{e}"
    );
    let r = s.call("DELETE", "/api/v1/vms/web/policy", &admin, None);
    assert_eq!(r.status, 200, "{:?}", r.body);
}
