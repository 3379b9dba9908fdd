//! Policies from the command line: calendar expressions, backup slots refusing a manual
//! backup (nothing written), keep rules applied by `prune` with their reasons, snapshot
//! lifespans refused beyond the policy's most, and bad policies refused with the field named.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::Repo;
use std::path::Path;

fn append(repo: &Repo, toml: &str) {
    let p = repo.path().join("vms.toml");
    let mut t = std::fs::read_to_string(&p).unwrap_or_default();
    t.push_str(toml);
    std::fs::write(&p, t).unwrap();
}

/// Every file under `dir`, with its size.
fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), e.metadata().unwrap().len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn calendar_prints_the_next_times_and_refuses_bad_expressions() {
    let repo = Repo::new();
    let r = repo.run(&[
        "--json",
        "calendar",
        "mon..fri 02:30",
        "--count",
        "3",
        "--after",
        "2026-12-04T12:00:00Z",
    ]);
    let v = r.ok().json();
    assert_eq!(v["normalized"], "Mon..Fri *-*-* 02:30:00");
    assert_eq!(
        v["next"],
        serde_json::json!([
            "2026-12-07T02:30:00Z",
            "2026-12-08T02:30:00Z",
            "2026-12-09T02:30:00Z"
        ])
    );
    // DST in a named zone: 02:30 does not exist in Berlin on 2027-03-28.
    let v = repo
        .run(&[
            "--json",
            "calendar",
            "02:30",
            "--count",
            "2",
            "--after",
            "2027-03-27T12:00:00Z",
            "--timezone",
            "Europe/Berlin",
        ])
        .ok()
        .json();
    assert_eq!(
        v["next"],
        serde_json::json!(["2027-03-28T01:30:00Z", "2027-03-29T00:30:00Z"])
    );
    let text = repo
        .run(&["calendar", "daily", "--after", "2026-12-01T10:00:00Z"])
        .ok()
        .stdout;
    assert!(
        text.contains("Next elapse: Wed 2026-12-02 00:00:00 UTC"),
        "{text}"
    );
    for (expr, says) in [("dayly", "not a weekday"), ("25:00", "hour 25")] {
        let r = repo.run(&["--json", "calendar", expr]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        let e = r.json();
        assert_eq!(e["error"]["code"], "usage");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{e}"
        );
    }
}

#[test]
fn full_slots_refuse_a_manual_backup_and_nothing_is_written() {
    let repo = Repo::with_default_policy();
    let img = repo.tmp("root.img");
    common::service::image(&img, 4, 1);
    repo.backup("web", &[("root", &img)]);
    repo.backup("web", &[("root", &img)]);
    let before = files(&repo.path().join("store"));
    let r = repo.run(&[
        "--json",
        "backup",
        "web",
        "--disk",
        &format!("root={}", img.display()),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let e = r.json();
    assert_eq!(e["error"]["code"], "slots-full", "{e}");
    assert_eq!(e["error"]["details"]["slots"], 2);
    assert_eq!(e["error"]["details"]["used"].as_array().unwrap().len(), 2);
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("all 2 backup slots in use"), "{msg}");
    assert_eq!(files(&repo.path().join("store")), before, "nothing written");
    let list = repo.run(&["--json", "backups", "web"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    // Another VM has slots of its own.
    repo.backup("db", &[("root", &img)]);
    // `rotate`: the new backup commits, then the oldest goes.
    append(&repo, "\n[policy]\nbackup.on_full = \"rotate\"\n");
    let oldest = list[0]["id"].as_str().unwrap().to_string();
    let m = repo.backup("web", &[("root", &img)]);
    let ids: Vec<String> = repo
        .run(&["--json", "backups", "web"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&oldest) && ids.contains(&m["id"].as_str().unwrap().to_string()));
}

#[test]
fn prune_applies_keep_rules_and_says_why() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    common::service::image(&img, 2, 2);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            repo.backup("web", &[("root", &img)])["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Keep rules instead of slots: the two newest.
    append(&repo, "\n[policy.vm.web]\nbackup.keep = { last = 2 }\n");
    let show = repo.run(&["--json", "policy", "show", "web"]).ok().json();
    assert_eq!(
        show["vm"]["retention"],
        serde_json::json!({"keep": {"last": 2}})
    );
    let dry = repo.run(&["--json", "prune", "--dry-run"]).ok().json();
    assert_eq!(dry["dry_run"], true);
    let web = &dry["vms"][0];
    assert_eq!(web["vm"], "web");
    let why: Vec<(String, bool, String)> = web["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_string(),
                d["keep"].as_bool().unwrap(),
                d["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        why,
        [
            (ids[3].clone(), true, "keep-last".to_string()),
            (ids[2].clone(), true, "keep-last".to_string()),
            (ids[1].clone(), false, "no rule keeps it".to_string()),
            (ids[0].clone(), false, "no rule keeps it".to_string()),
        ]
    );
    assert_eq!(
        repo.run(&["--json", "backups", "web"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        4,
        "a dry run removes nothing"
    );
    let text = repo.run(&["prune", "web"]).ok().stdout;
    assert!(
        text.contains(&format!("removed web@{}  (no rule keeps it)", ids[0])),
        "{text}"
    );
    let left: Vec<String> = repo
        .run(&["--json", "backups", "web"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, [ids[2].clone(), ids[3].clone()]);
    // What is left restores byte-identical; the task says what it did.
    let out = repo.tmp("out.img");
    repo.run(&[
        "restore",
        &format!("web@{}", ids[2]),
        "--to",
        out.to_str().unwrap(),
    ])
    .ok();
    common::assert_same(&img, &out);
    let tasks = repo.run(&["--json", "tasks"]).ok().json();
    let prune = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "prune")
        .unwrap();
    assert_eq!(prune["state"], "ok");
    assert_eq!(prune["outcome"]["summary"], "pruned 2 backup(s) of 1 VM(s)");
    let r = repo.run(&["--json", "prune", "nosuch"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["error"]["code"], "not-found");
}

#[test]
fn bad_policies_name_the_field_and_long_lifespans_are_refused() {
    let repo = Repo::new();
    for (toml, says) in [
        (
            "[policy]\nbackup.schedule = \"dayly\"\n",
            "policy.backup.schedule",
        ),
        ("[policy]\nbackup.slots = 0\n", "at least 1"),
        ("[policy]\nsnapshot.max_lifespan = \"30d\"\n", "10 days"),
        ("[policy]\ntimezone = \"Mars/Olympus\"\n", "time zone"),
        (
            "[policy.vm.web]\nbackup.keep = { last = 0 }\n",
            "at least one rule",
        ),
        ("[notify.target.x]\nwebhook = \"ftp://x\"\n", "http(s)"),
    ] {
        std::fs::write(repo.path().join("vms.toml"), toml).unwrap();
        let r = repo.run(&["--json", "policy", "show"]);
        assert_eq!(r.code, 1, "{toml}: {}", r.stderr);
        let e = r.json();
        assert_eq!(e["error"]["code"], "config", "{toml}");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(m.contains(says), "{toml}: {m}");
    }
    // A snapshot's --ttl beyond the policy's most is refused before anything is touched.
    std::fs::write(
        repo.path().join("vms.toml"),
        "[policy]\nsnapshot.max_lifespan = \"2d\"\n",
    )
    .unwrap();
    repo.run(&[
        "vm",
        "add",
        "web",
        "--qmp",
        "/nonexistent.qmp",
        "--disk",
        "root=disk0",
        "--no-check",
    ])
    .ok();
    for ttl in ["3d", "30d"] {
        let r = repo.run(&[
            "--json",
            "snapshot",
            "create",
            "web",
            "before-upgrade",
            "--ttl",
            ttl,
        ]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(
            r.stderr
                .contains("longer than a snapshot of web may live (2d"),
            "{}",
            r.stderr
        );
    }
    let show = repo.run(&["policy", "show", "web"]).ok().stdout;
    assert!(show.contains("snapshot.max_lifespan 2d"), "{show}");
    assert!(
        show.contains("2 slots (when full: scheduled rotate, manual refuse)"),
        "{show}"
    );
}
