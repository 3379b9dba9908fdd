//! The dashboard in a real browser: Debian's Chromium driven by playwright-core
//! (tests/browser/*.mjs) against the real `holdfast serve` on loopback, with a real repository
//! and real QEMU VMs. The scenarios click through the page as people would; this side sets the
//! scene, answers their hand-shakes (`WAIT name`) by changing the VM, and checks the outcomes
//! outside the browser: restored bytes, QEMU's snapshots, the disk after a revert.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;

use common::qemu::Vm;
use common::service::{self, Service};
use common::{assert_same, Repo};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Node, Debian's Chromium and playwright-core, or a failure that says how to install them.
fn require_browser() -> PathBuf {
    common::require("node", "nodejs");
    common::require("chromium", "chromium");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .exists(),
        "playwright-core is missing: run scripts/install-deps (npm ci in tests/browser)"
    );
    dir
}

/// Where the scenarios write their screenshots (docs/screenshots holds the chosen ones).
fn shots() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run a scenario to its end (at most 6 minutes); `answer` is called at each `WAIT name`
/// before the scenario is let go on. Returns the steps it reported.
fn scenario(script: &str, env: &[(&str, String)], mut answer: impl FnMut(&str)) -> Vec<Value> {
    let dir = require_browser();
    let sync = tempfile::tempdir().unwrap();
    let mut c = Command::new("node");
    c.arg(script)
        .current_dir(&dir)
        .env("HF_SYNC", sync.path())
        .env("HF_SHOTS", shots())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let start = Instant::now();
    let mut steps = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(360),
            "{script} ran too long"
        );
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            eprintln!("{script}: {line}");
            continue;
        };
        eprintln!("{script}: {v}");
        if v["step"] == "WAIT" {
            let name = v["name"].as_str().unwrap().to_string();
            answer(&name);
            std::fs::write(sync.path().join(&name), b"").unwrap();
        }
        steps.push(v);
    }
    // The scenario has its own 300 s watchdog; stdout closed means it is ending.
    let status = child.wait().unwrap();
    let err = err.join().unwrap();
    assert!(status.success(), "{script} failed ({status}):\n{err}");
    assert!(
        steps.iter().any(|s| s["step"] == "DONE"),
        "{script} did not finish: {err}"
    );
    steps
}

fn step<'a>(steps: &'a [Value], name: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
}

/// Take a disk away from a running qemu-storage-daemon: its export, its nodes, its file.
fn remove_disk(vm: &Vm) {
    vm.qmp("block-export-del", json!({ "id": "live0" }));
    let t = Instant::now();
    for node in ["disk0", "disk0-file"] {
        // The export lets go of its node once its clients are gone.
        while let Err(e) = vm.qmp_try("blockdev-del", json!({ "node-name": node })) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "blockdev-del {node}: {e}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::fs::remove_file(&vm.disks[0].file).unwrap();
}

#[test]
fn an_operator_backs_up_and_restores_through_the_page_and_a_viewer_only_looks() {
    let repo = Repo::with_default_policy();
    let web = Vm::start(&[("raw", 128)], false);
    let broken = Vm::start_qsd(&[("raw", 16)]);
    web.declare(&repo, "web-01");
    broken.declare(&repo, "app-02");
    remove_disk(&broken);
    let restores = repo.tmp("restores");
    std::fs::create_dir_all(&restores).unwrap();
    service::configure(&repo, &format!("restore_dirs = [{:?}]\n", restores));
    service::user(&repo, "oper", "operator", &["web-01", "app-02"]);
    service::user(&repo, "view", "viewer", &["web-01"]);
    // A slow disk (250 ms a 4 MiB segment: about 8 s for the first backup) so the percentage can be watched rising.
    let s = Service::start_with(&repo, &[], &[("HOLDFAST_TEST_SEGMENT_DELAY_MS", "250")]);
    let steps = scenario(
        "backups.mjs",
        &[
            ("HF_URL", s.url.clone()),
            ("HF_VM", "web-01".into()),
            ("HF_BROKEN_VM", "app-02".into()),
            ("HF_OPERATOR", "oper".into()),
            ("HF_OPERATOR_PASSWORD", "password-of-oper".into()),
            ("HF_VIEWER", "view".into()),
            ("HF_VIEWER_PASSWORD", "password-of-view".into()),
            ("HF_RESTORE_DIR", restores.display().to_string()),
        ],
        |_| {},
    );
    // What the page did, checked outside it: the restored image is the VM's disk, byte for
    // byte; two backups hold the two slots; the failed one said why.
    assert_same(&restores.join("restored.img"), &web.disks[0].file);
    let list = repo.run(&["--json", "backups", "web-01"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let seen = step(&steps, "percent")["seen"].as_array().unwrap().len();
    assert!(seen >= 3, "{steps:?}");
    let failed = step(&steps, "failed")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(failed.contains("disk0"), "{failed}");
    let tasks = repo.run(&["--json", "tasks", "--vm", "app-02"]).ok().json();
    let backup = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "backup")
        .unwrap_or_else(|| panic!("{tasks}"));
    assert_eq!(backup["state"], "failed", "{tasks}");
}

#[test]
fn snapshots_are_taken_renamed_reverted_and_deleted_through_the_page() {
    let repo = Repo::new();
    let vm = Vm::start(&[("qcow2", 32)], false);
    vm.declare(&repo, "db-01");
    service::user(&repo, "oper", "operator", &["db-01"]);
    let s = Service::start(&repo);
    let mut tags = Vec::new();
    scenario(
        "snapshots.mjs",
        &[
            ("HF_URL", s.url.clone()),
            ("HF_VM", "db-01".into()),
            ("HF_OPERATOR", "oper".into()),
            ("HF_OPERATOR_PASSWORD", "password-of-oper".into()),
        ],
        |name| match name {
            "taken" => {
                // QEMU holds it; then the guest's disk changes after it.
                tags = vm.snapshot_tags("disk0");
                assert_eq!(tags.len(), 1, "{tags:?}");
                vm.io(0, "read -P 0x10 0 1M");
                vm.write(0, 0xee, 0, 1 << 20);
            }
            "reverted" => {
                // The disk is back as it was, and the snapshot is kept.
                vm.io(0, "read -P 0x10 0 1M");
                assert_eq!(vm.snapshot_tags("disk0"), tags);
            }
            other => panic!("unexpected WAIT {other}"),
        },
    );
    assert!(vm.snapshot_tags("disk0").is_empty());
    assert!(vm.running());
}

#[test]
fn the_page_is_served_with_a_strict_policy_and_restores_say_where() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 2, 9);
    let id = repo.backup("web", &[("root", &img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let restores = repo.tmp("restores");
    std::fs::create_dir_all(&restores).unwrap();
    service::configure(&repo, &format!("restore_dirs = [{:?}]\n", restores));
    let admin = service::user(&repo, "admin", "admin", &[]);
    let viewer = service::user(&repo, "eve", "viewer", &["web"]);
    let s = Service::start(&repo);
    for (path, kind) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/icon.svg", "image/svg+xml"),
    ] {
        let r = s.get(path, "");
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        let csp = r.header("content-security-policy").unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }
    assert!(s.get("/", "").body.as_str().unwrap().contains("/ui/app.js"));
    // whoami tells operators and admins where restores may go, viewers nothing.
    let who = s.get("/api/v1/whoami", &admin);
    assert_eq!(who.body["restore_dirs"][0], restores.display().to_string());
    assert!(s
        .get("/api/v1/whoami", &viewer)
        .body
        .get("restore_dirs")
        .is_none());
    // A restore names a file or asks for the VM's own disks: not both, not neither.
    let path = format!("/api/v1/vms/web/backups/{id}/restore");
    let to = restores.join("x.img").display().to_string();
    for body in [json!({}), json!({"to": to, "in_place": true})] {
        let r = s.post(&path, &admin, body.clone());
        assert_eq!(
            (r.status, r.code()),
            (422, "invalid-body"),
            "{body}: {:?}",
            r.body
        );
    }
    // In place needs a declared VM (this one is known only by its backups).
    let r = s.post(&path, &admin, json!({"in_place": true}));
    assert_eq!((r.status, r.code()), (404, "not-found"), "{:?}", r.body);
    // The VM list carries what the panel shows: stored bytes and their cost.
    let vms = s.get("/api/v1/vms", &admin);
    assert!(
        vms.body[0]["stored_bytes"].as_u64().unwrap() > 0,
        "{:?}",
        vms.body
    );
    assert!(vms.body[0]["cost_per_month"].as_f64().unwrap() > 0.0);
}

#[test]
fn an_admin_protects_deletes_and_sends_a_test_notification_through_the_page() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 4, 3);
    let first = repo.backup("web", &[("root", &img)])["id"].clone();
    service::image(&img, 4, 4);
    let second = repo.backup("web", &[("root", &img)])["id"].clone();
    let hook = common::hook::Hook::start();
    let cfg = repo.path().join("vms.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap_or_default();
    text.push_str(&format!(
        "\n[notify.target.hook]\nwebhook = \"{}\"\nevents = [\"backup\", \"restore\"]\n",
        hook.url
    ));
    std::fs::write(&cfg, text).unwrap();
    service::user(&repo, "admin", "admin", &[]);
    let s = Service::start(&repo);
    let steps = scenario(
        "admin.mjs",
        &[
            ("HF_URL", s.url.clone()),
            ("HF_VM", "web".into()),
            ("HF_ADMIN_PASSWORD", "password-of-admin".into()),
        ],
        |_| {},
    );
    // The newer backup is gone, the older one kept; the webhook got the page's test event.
    let b = step(&steps, "backups");
    assert_eq!((&b["deleted"], &b["kept"]), (&second, &first), "{b}");
    let left = repo.run(&["--json", "backups", "web"]).ok().json();
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["id"], first);
    let id = step(&steps, "test-sent")["event"].clone();
    hook.wait(Duration::from_secs(30), "the test event", |d| {
        d.iter().any(|x| x.json()["id"] == id)
    });
}
