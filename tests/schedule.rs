//! Policies that run by themselves, against the real service: a `*:*:0/3` backup schedule
//! with 2 rotating slots on a real disk image; webhook deliveries signed, held while the
//! receiver is down and delivered exactly once after it returns (across a service restart);
//! email through a real SMTP server (Debian's aiosmtpd); a SIGKILLed service whose missed
//! runs run once at restart.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::hook::Hook;
use common::service::{self, Service};
use common::Repo;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// A secret file of mode 0600; its path.
fn secret(repo: &Repo) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = repo.tmp("hook.secret");
    std::fs::write(&p, "s3cret-key\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Append to the repository's config.
fn config(repo: &Repo, toml: &str) {
    let p = repo.path().join("vms.toml");
    let mut t = std::fs::read_to_string(&p).unwrap_or_default();
    t.push_str(toml);
    std::fs::write(&p, t).unwrap();
}

/// The scheduled backup tasks of `vm` that ended, oldest first.
fn scheduled(s: &Service, token: &str, vm: &str) -> Vec<Value> {
    let r = s.get(&format!("/api/v1/tasks?vm={vm}&kind=backup"), token);
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut v: Vec<Value> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["user"] == "schedule" && t["state"] != "running" && t["state"] != "queued")
        .cloned()
        .collect();
    v.sort_by_key(|t| t["started_ms"].as_u64().unwrap());
    v
}

fn wait_runs(s: &Service, token: &str, vm: &str, n: usize, limit: Duration) -> Vec<Value> {
    let t = Instant::now();
    loop {
        let v = scheduled(s, token, vm);
        if v.len() >= n {
            return v;
        }
        assert!(
            t.elapsed() < limit,
            "only {} scheduled runs in {limit:?}: {v:?}",
            v.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_schedule_with_two_rotating_slots_keeps_the_two_newest_and_signs_its_events() {
    let repo = Repo::with_default_policy();
    let img = repo.tmp("root.img");
    service::image(&img, 4, 7);
    let key = secret(&repo);
    let hook = Hook::start();
    config(
        &repo,
        &format!(
            "[policy.vm.web]\nbackup.schedule = \"*:*:0/3\"\nbackup.sources = {{ root = \"{}\" }}\n\
             [notify.target.hook]\nwebhook = \"{}\"\nsecret_file = \"{}\"\nevents = [\"backup\", \"prune\"]\n",
            img.display(),
            hook.url,
            key.display()
        ),
    );
    let admin = service::user(&repo, "admin", "admin", &[]);
    let mut s = Service::start(&repo);
    let runs = wait_runs(&s, &admin, "web", 4, WAIT);
    let runs: Vec<Value> = runs.into_iter().take(4).collect();
    // Each run's event arrives (the service delivers while it runs).
    let want: BTreeSet<String> = runs
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    let got = hook.wait(WAIT, "an event per run", |d| {
        let have: BTreeSet<String> = d
            .iter()
            .map(|x| x.json()["task"].as_str().unwrap_or("").to_string())
            .collect();
        want.is_subset(&have)
    });
    s.stop(WAIT);
    for t in &runs {
        assert_eq!(t["state"], "ok", "{t}");
    }
    // Exactly the two newest backups are left, each byte-identical to the disk.
    let newest: Vec<String> = runs
        .iter()
        .rev()
        .take(2)
        .map(|t| t["outcome"]["backup"].as_str().unwrap().to_string())
        .collect();
    let left: BTreeSet<String> = repo
        .run(&["--json", "backups", "web"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| format!("web@{}", b["id"].as_str().unwrap()))
        .collect();
    let all_runs: BTreeSet<String> = repo
        .run(&["--json", "tasks", "--vm", "web"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "backup" && t["state"] == "ok")
        .map(|t| t["outcome"]["backup"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    let latest_two: BTreeSet<String> = all_runs.iter().rev().take(2).cloned().collect();
    assert_eq!(left, latest_two, "the two newest of {all_runs:?}");
    assert!(newest.iter().all(|b| all_runs.contains(b)));
    for b in &left {
        let out = repo.tmp(&format!("{}.img", b.replace('@', "-")));
        repo.run(&["restore", b, "--to", out.to_str().unwrap()])
            .ok();
        common::assert_same(&img, &out);
    }
    // The rotations are in the task logs: runs 3 and 4 each removed the oldest.
    let logs: Vec<String> = runs
        .iter()
        .flat_map(|t| t["log"].as_array().unwrap().clone())
        .map(|l| l["line"].as_str().unwrap_or("").to_string())
        .filter(|l| l.contains("beyond 2 slots"))
        .collect();
    assert!(logs.len() >= 2, "{logs:?}");
    // Every run's event arrived once, signed with the key.
    let mut ids = BTreeSet::new();
    for d in &got {
        let sig = d.header("X-Holdfast-Signature").unwrap();
        assert_eq!(sig, holdfast::notify::signature(b"s3cret-key", &d.body));
        let e = d.json();
        assert_eq!(d.header("X-Holdfast-Id"), e["id"].as_str());
        assert!(
            ids.insert(e["id"].as_str().unwrap().to_string()),
            "duplicate {e}"
        );
        assert_eq!(
            (e["event"].as_str(), e["title"].as_str()),
            (Some("backup.completed"), Some("Backup Completed"))
        );
        assert_eq!(e["vm"], "web");
        assert!(e["sizes"]["read_bytes"].as_u64().unwrap() > 0, "{e}");
        assert!(e["duration_ms"].is_u64(), "{e}");
    }
    let tasks: BTreeSet<String> = got
        .iter()
        .map(|d| d.json()["task"].as_str().unwrap().to_string())
        .collect();
    for t in &runs {
        assert!(
            tasks.contains(t["id"].as_str().unwrap()),
            "no event for {t}"
        );
    }
}

#[test]
fn events_wait_for_a_receiver_that_is_down_and_arrive_once_across_a_restart() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 2, 9);
    let hook = Hook::start();
    hook.set_up(false);
    config(
        &repo,
        &format!(
            "[notify.target.hook]\nwebhook = \"{}\"\nretry_max = \"1s\"\n\
             [notify.target.errors-only]\nwebhook = \"{}\"\noutcomes = [\"failed\"]\n",
            hook.url, hook.url
        ),
    );
    let admin = service::user(&repo, "admin", "admin", &[]);
    let disks = json!({"disks": {"root": img.to_str().unwrap()}});
    let mut tasks = Vec::new();
    let mut s = Service::start(&repo);
    for _ in 0..2 {
        let r = s.post("/api/v1/vms/web/backups", &admin, disks.clone());
        assert_eq!(r.status, 202, "{:?}", r.body);
        let id = r.body["task"].as_str().unwrap().to_string();
        assert_eq!(s.wait_task(&id, &admin, WAIT)["state"], "ok");
        tasks.push(id);
    }
    // Attempts fail while the receiver is down; the events wait in the outbox.
    let t = Instant::now();
    while hook.refused.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        assert!(t.elapsed() < WAIT, "no attempt reached the receiver");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.stop(WAIT);
    let waiting = std::fs::read_dir(repo.path().join("outbox/hook"))
        .unwrap()
        .count();
    assert_eq!(waiting, 2, "both events wait in the outbox across the stop");
    // A restart, one more backup (a failed one: the disk is gone), then the receiver returns.
    let mut s = Service::start(&repo);
    let gone = json!({"disks": {"root": repo.tmp("no-such.img").to_str().unwrap()}});
    let r = s.post("/api/v1/vms/web/backups", &admin, gone);
    let failed = r.body["task"].as_str().map(str::to_string);
    if let Some(id) = &failed {
        assert_eq!(s.wait_task(id, &admin, WAIT)["state"], "failed");
        tasks.push(id.clone());
    }
    hook.set_up(true);
    // hook: 2 completed + 1 failed (when the failure was a task); errors-only: the failure.
    let want = tasks.len() + usize::from(failed.is_some());
    let got = hook.wait(WAIT, "every event", |d| d.len() >= want);
    std::thread::sleep(Duration::from_millis(1500));
    let got_after = hook.deliveries();
    assert_eq!(got_after.len(), got.len(), "nothing arrives twice");
    // The same event may go to two targets; to one target, once.
    let ids: Vec<String> = got_after
        .iter()
        .map(|d| {
            let target = d.header("X-Holdfast-Target").unwrap();
            format!("{target} {}", d.json()["id"].as_str().unwrap())
        })
        .collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "each event once by id: {ids:?}");
    let for_tasks: BTreeSet<String> = got_after
        .iter()
        .map(|d| d.json()["task"].as_str().unwrap_or("").to_string())
        .collect();
    for t in &tasks {
        assert!(for_tasks.contains(t), "no event for task {t}");
    }
    if let Some(id) = failed {
        let f: Vec<Value> = got_after
            .iter()
            .map(|d| d.json())
            .filter(|e| e["task"] == json!(id))
            .collect();
        assert_eq!(f.len(), 2, "the failure went to both targets: {f:?}");
        assert_eq!(f[0]["title"], "Backup Failed");
        assert!(
            f[0]["error_message"]
                .as_str()
                .unwrap()
                .contains("no-such.img"),
            "{}",
            f[0]
        );
    }
    // The outbox is empty again; a test event reaches the receiver on request.
    let t = s.post("/api/v1/notifications/targets/hook/test", &admin, json!({}));
    assert_eq!(t.status, 202, "{:?}", t.body);
    let id = t.body["event"].as_str().unwrap().to_string();
    hook.wait(WAIT, "the test event", |d| {
        d.iter().any(|x| x.json()["id"] == json!(id))
    });
    let r = s.post(
        "/api/v1/notifications/targets/nosuch/test",
        &admin,
        json!({}),
    );
    assert_eq!((r.status, r.code()), (404, "not-found"));
    s.stop(WAIT);
}

#[test]
fn email_through_a_real_smtp_server() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 2, 11);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = repo.tmp("smtp.out");
    let aiosmtpd = "/usr/bin/aiosmtpd";
    assert!(
        std::path::Path::new(aiosmtpd).exists(),
        "aiosmtpd is missing: apt-get install python3-aiosmtpd (scripts/install-deps does)"
    );
    let mut smtp = std::process::Command::new(aiosmtpd)
        .args(["-n", "-l", &format!("127.0.0.1:{port}")])
        .env("PYTHONUNBUFFERED", "1")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < WAIT, "aiosmtpd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    config(
        &repo,
        &format!(
            "[notify.target.admins.email]\nsmtp = \"127.0.0.1:{port}\"\nfrom = \"holdfast@example.com\"\n\
             to = [\"ops@example.com\"]\n"
        ),
    );
    let admin = service::user(&repo, "admin", "admin", &[]);
    let mut s = Service::start(&repo);
    let ok = s.post(
        "/api/v1/vms/web/backups",
        &admin,
        json!({"disks": {"root": img.to_str().unwrap()}}),
    );
    assert_eq!(
        s.wait_task(ok.body["task"].as_str().unwrap(), &admin, WAIT)["state"],
        "ok"
    );
    let bad = s.post(
        "/api/v1/vms/web/backups",
        &admin,
        json!({"disks": {"root": "/nonexistent/disk.img"}}),
    );
    assert_eq!(
        s.wait_task(bad.body["task"].as_str().unwrap(), &admin, WAIT)["state"],
        "failed"
    );
    let t = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.matches("END MESSAGE").count() >= 2 {
            break text;
        }
        assert!(
            t.elapsed() < WAIT,
            "two mails did not arrive: {text}\nservice: {}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    s.stop(WAIT);
    let _ = smtp.kill();
    let _ = smtp.wait();
    assert!(text.contains("Subject: Backup Completed: web"), "{text}");
    assert!(text.contains("Subject: Backup Failed: web"), "{text}");
    assert!(text.contains("To: ops@example.com"), "{text}");
    // The failure's body says what went wrong, for a person.
    let failed = &text[text.find("Subject: Backup Failed: web").unwrap()..];
    assert!(failed.contains("/nonexistent/disk.img"), "{failed}");
    assert!(failed.contains("Outcome:   failed"), "{failed}");
    assert!(failed.contains("(source)"), "the error code: {failed}");
}

#[test]
fn a_killed_service_runs_its_missed_slot_once_at_restart() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 2, 13);
    let hook = Hook::start();
    hook.set_up(false);
    config(
        &repo,
        &format!(
            "[policy.vm.web]\nbackup.schedule = \"*:*:0/5\"\nbackup.sources = {{ root = \"{}\" }}\n\
             [notify.target.hook]\nwebhook = \"{}\"\nretry_max = \"1s\"\n",
            img.display(),
            hook.url
        ),
    );
    let admin = service::user(&repo, "admin", "admin", &[]);
    let mut s = Service::start(&repo);
    let first = wait_runs(&s, &admin, "web", 1, WAIT)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.kill();
    // Down for more than two slots.
    std::thread::sleep(Duration::from_secs(11));
    // Restart just after a slot boundary, so the next one is ~4.5 s away.
    loop {
        let ms = holdfast::timefmt::now_millis() % 5000;
        if (300..800).contains(&ms) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let restarted = holdfast::timefmt::now_millis();
    let before = repo
        .run(&["--json", "tasks", "--vm", "web"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .len();
    let s = Service::start(&repo);
    std::thread::sleep(Duration::from_millis(3500));
    let tasks = repo.run(&["--json", "tasks", "--vm", "web"]).ok().json();
    let after: Vec<&Value> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["started_ms"].as_u64().unwrap() >= restarted)
        .collect();
    assert_eq!(after.len(), 1, "the missed slots ran once: {after:?}");
    assert_eq!(tasks.as_array().unwrap().len(), before + 1);
    assert_eq!(after[0]["user"], "schedule");
    let st = s.get("/api/v1/schedule", &admin);
    let web = st
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["what"] == "backup web")
        .unwrap()
        .clone();
    assert_eq!(web["state"], "idle", "{web}");
    assert_eq!(web["last_task"], after[0]["id"]);
    // What the killed service had queued is delivered by the new one, once.
    hook.set_up(true);
    let second = after[0]["id"].as_str().unwrap().to_string();
    let got = hook.wait(WAIT, "both runs' events", |d| {
        let tasks: Vec<String> = d
            .iter()
            .map(|x| x.json()["task"].as_str().unwrap_or("").to_string())
            .collect();
        tasks.contains(&first) && tasks.contains(&second)
    });
    let ids: BTreeSet<String> = got
        .iter()
        .map(|d| d.json()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), got.len(), "each once");
}

#[test]
fn a_scheduled_run_whose_vm_is_busy_waits_queued_and_then_runs() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 2, 17);
    config(
        &repo,
        &format!(
            "[policy.vm.web]\nbackup.schedule = \"*:*:0/2\"\nbackup.sources = {{ root = \"{}\" }}\n",
            img.display()
        ),
    );
    let admin = service::user(&repo, "admin", "admin", &[]);
    // A CLI backup holds the VM (paused before its commit) while the schedule comes due.
    let flag = repo.tmp("go");
    let mut cli = repo
        .cmd(&[
            "backup",
            "web",
            "--disk",
            &format!("root={}", img.display()),
        ])
        .env("HOLDFAST_TEST_PAUSE_BEFORE_COMMIT", &flag)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !flag.with_extension("waiting").exists() {
        assert!(t.elapsed() < WAIT, "the CLI backup never paused");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = Service::start(&repo);
    let t = Instant::now();
    let queued = loop {
        let st = s.get("/api/v1/schedule", &admin).body;
        let web = st
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["what"] == "backup web")
            .cloned()
            .unwrap();
        if web["state"] == "queued" {
            break web;
        }
        assert!(t.elapsed() < WAIT, "never queued: {web}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        queued["why"].as_str().unwrap().contains("busy")
            || queued["why"].as_str().unwrap().contains("backup"),
        "{queued}"
    );
    assert!(
        scheduled(&s, &admin, "web").is_empty(),
        "nothing ran beside the CLI's backup"
    );
    std::fs::write(&flag, b"").unwrap();
    assert!(cli.wait().unwrap().success());
    let runs = wait_runs(&s, &admin, "web", 1, WAIT);
    assert_eq!(runs[0]["state"], "ok", "{}", runs[0]);
}
