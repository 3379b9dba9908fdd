//! `holdfast serve` end to end over real HTTP: a backup through the API with live progress
//! and a resumable event stream, restored byte-identical; the CLI and the API excluding each
//! other on a VM in both orders; the global job limit; tokens narrowed, expired and revoked;
//! sessions with CSRF and login rate limits; the local socket; HTTPS with a kept certificate.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;

use common::service::{self, Service};
use common::Repo;
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

fn wait_for(path: &std::path::Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < WAIT, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn api_backup_live_progress_resumable_events_and_restore() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 64, 7);
    let restores = repo.tmp("restores");
    std::fs::create_dir(&restores).unwrap();
    service::configure(
        &repo,
        &format!("restore_dirs = [{:?}]\n", restores.to_str().unwrap()),
    );
    let admin = service::user(&repo, "admin", "admin", &[]);
    let viewer = service::user(&repo, "viewer", "viewer", &["web"]);
    // 16 segments of 4 MiB, 150 ms each: long enough to watch.
    let s = Service::start_with(&repo, &[], &[("HOLDFAST_TEST_SEGMENT_DELAY_MS", "150")]);
    let r = s.post(
        "/api/v1/vms/web/backups",
        &admin,
        json!({"disks": {"root": img.to_str().unwrap()}}),
    );
    assert_eq!(r.status, 202, "{:?}", r.body);
    let task = r.body["task"].as_str().unwrap().to_string();

    // Another client polls the task: the percent never goes down and reaches 100.
    let poller = {
        let (url, tok, id) = (s.url.clone(), viewer.clone(), task.clone());
        std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build();
            let mut seen = Vec::new();
            let t = Instant::now();
            loop {
                let v: Value = agent
                    .get(&format!("{url}/api/v1/tasks/{id}"))
                    .set("Authorization", &format!("Bearer {tok}"))
                    .call()
                    .unwrap()
                    .into_json()
                    .unwrap();
                if let Some(p) = v["progress"]["percent"].as_f64() {
                    seen.push(p);
                }
                if v["state"] != "running" && v["state"] != "queued" {
                    return (seen, v);
                }
                assert!(t.elapsed() < WAIT);
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };

    // A stream, dropped after a few progress events...
    let mut progress = 0;
    let first = service::sse(
        &s.url,
        &format!("/api/v1/tasks/{task}/events"),
        &viewer,
        None,
        |_, ev, _| {
            progress += (ev == "progress") as u32;
            progress >= 3
        },
    );
    let last_id = first.last().unwrap().0.clone();
    std::thread::sleep(Duration::from_millis(600)); // events go by unseen
                                                    // ... and resumed: every event after that id, to the end.
    let second = service::sse(
        &s.url,
        &format!("/api/v1/tasks/{task}/events"),
        &viewer,
        Some(&last_id),
        |_, ev, _| ev == "end",
    );
    let (seen, record) = poller.join().unwrap();
    assert_eq!(record["state"], "ok", "{record}");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "percent went down: {seen:?}"
    );
    let distinct: BTreeSet<u64> = seen.iter().map(|p| (p * 10.0) as u64).collect();
    assert!(distinct.len() >= 4, "too few steps seen: {seen:?}");
    assert_eq!(
        record["progress"]["percent"].as_f64(),
        Some(100.0),
        "{record}"
    );

    let ids: Vec<u64> = second
        .iter()
        .map(|(id, _, _)| id.parse().unwrap())
        .collect();
    let after: u64 = last_id.parse().unwrap();
    assert!(ids.iter().all(|&i| i > after), "{ids:?} after {after}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let end = second.last().unwrap();
    assert_eq!(
        (end.1.as_str(), end.2["state"].as_str()),
        ("end", Some("ok")),
        "{end:?}"
    );
    // Every log line the record holds after that id came through the resumed stream.
    let got: BTreeSet<u64> = second
        .iter()
        .filter(|(_, e, _)| e == "log")
        .map(|(id, _, _)| id.parse().unwrap())
        .collect();
    let want: BTreeSet<u64> = record["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .filter(|&q| q > after)
        .collect();
    assert!(!want.is_empty(), "the backup logs its end");
    assert_eq!(got, want);
    let pcts: Vec<f64> = first
        .iter()
        .chain(&second)
        .filter(|(_, e, _)| e == "progress")
        .filter_map(|(_, _, d)| d["percent"].as_f64())
        .collect();
    assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{pcts:?}");

    // The backup restores byte-identical, through the API.
    let b = s.get("/api/v1/vms/web/backups", &viewer);
    assert_eq!(b.body.as_array().unwrap().len(), 1);
    let id = b.body[0]["id"].as_str().unwrap();
    let to = restores.join("root.img");
    let r = s.post(
        &format!("/api/v1/vms/web/backups/{id}/restore"),
        &admin,
        json!({"to": to.to_str().unwrap()}),
    );
    assert_eq!(r.status, 202, "{:?}", r.body);
    let t = s.wait_task(r.body["task"].as_str().unwrap(), &admin, WAIT);
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(t["output"].as_str(), Some(to.to_str().unwrap()));
    common::assert_same(&img, &to);
    // The task of the restore, and the CLI sees the API's tasks.
    let cli = repo.run(&["--json", "tasks", "--vm", "web"]).ok().json();
    let users: Vec<&str> = cli
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["api:admin!main", "api:admin!main"]);
}

#[test]
fn cli_and_api_exclude_each_other_in_both_orders_and_jobs_queue() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 8, 3);
    let admin = service::user(&repo, "admin", "admin", &[]);
    let api_flag = repo.tmp("api-go");
    let pause = api_flag.to_str().unwrap().to_string();
    let s = Service::start_with(
        &repo,
        &["--jobs", "1"],
        &[("HOLDFAST_TEST_PAUSE_BEFORE_COMMIT", &pause)],
    );
    let disks = json!({"disks": {"root": img.to_str().unwrap()}});
    let disk_arg = format!("root={}", img.display());

    // CLI first: the API's backup of the same VM is refused, naming the CLI's task.
    let cli_flag = repo.tmp("cli-go");
    let mut cli = repo
        .cmd(&["backup", "web", "--disk", &disk_arg])
        .env("HOLDFAST_TEST_PAUSE_BEFORE_COMMIT", &cli_flag)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&cli_flag.with_extension("waiting"));
    let cli_task = repo.run(&["--json", "tasks", "--running"]).ok().json()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s.post("/api/v1/vms/web/backups", &admin, disks.clone());
    assert_eq!((r.status, r.code()), (409, "busy"), "{:?}", r.body);
    assert_eq!(r.body["error"]["details"]["task"], json!(cli_task));
    assert_eq!(r.body["error"]["details"]["pid"], json!(cli.id()));
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&cli_task));
    std::fs::write(&cli_flag, b"").unwrap();
    assert!(cli.wait().unwrap().success());

    // API first: the CLI's backup is refused (exit 4), naming the API's task.
    let r = s.post("/api/v1/vms/web/backups", &admin, disks.clone());
    assert_eq!(r.status, 202, "{:?}", r.body);
    let api_task = r.body["task"].as_str().unwrap().to_string();
    wait_for(&api_flag.with_extension("waiting"));
    let out = repo.run(&["--json", "backup", "web", "--disk", &disk_arg]);
    assert_eq!(out.code, 4, "{}", out.stderr);
    let err = out.json();
    assert_eq!(err["error"]["code"], "busy");
    assert_eq!(err["error"]["details"]["task"], json!(api_task));
    assert!(out.stderr.contains(&api_task), "{}", out.stderr);

    // One job at a time (--jobs 1): a backup of another VM waits, queued.
    let r = s.post("/api/v1/vms/mail/backups", &admin, disks.clone());
    assert_eq!(r.status, 202, "{:?}", r.body);
    let queued = r.body["task"].as_str().unwrap().to_string();
    let t = s.get(&format!("/api/v1/tasks/{queued}"), &admin);
    assert_eq!(t.body["state"], "queued", "{:?}", t.body);
    let list = s.get("/api/v1/tasks?state=queued", &admin);
    assert_eq!(list.body.as_array().unwrap().len(), 1);
    let vms = s.get("/api/v1/vms", &admin).body;
    let mail = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mail")
        .cloned();
    assert!(
        mail.is_none(),
        "a VM with only a queued backup has no backups yet: {vms}"
    );
    std::fs::write(&api_flag, b"").unwrap();
    assert_eq!(s.wait_task(&api_task, &admin, WAIT)["state"], "ok");
    assert_eq!(s.wait_task(&queued, &admin, WAIT)["state"], "ok");
    // A queued task can be cancelled before it runs.
    let _ = std::fs::remove_file(&api_flag);
    let _ = std::fs::remove_file(api_flag.with_extension("waiting"));
    let a = s
        .post("/api/v1/vms/web/backups", &admin, disks.clone())
        .body["task"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(&api_flag.with_extension("waiting"));
    let b = s.post("/api/v1/vms/mail/backups", &admin, disks).body["task"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        s.get(&format!("/api/v1/tasks/{b}"), &admin).body["state"],
        "queued"
    );
    let c = s.post(&format!("/api/v1/tasks/{b}/cancel"), &admin, json!({}));
    assert_eq!(c.status, 202, "{:?}", c.body);
    let t = s.wait_task(&b, &admin, WAIT);
    assert_eq!(
        (t["state"].as_str(), t["outcome"]["error"]["code"].as_str()),
        (Some("cancelled"), Some("cancelled")),
        "{t}"
    );
    std::fs::write(&api_flag, b"").unwrap();
    assert_eq!(s.wait_task(&a, &admin, WAIT)["state"], "ok");
}

#[test]
fn tokens_are_narrowed_expire_and_are_revoked() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 2, 5);
    repo.backup("web", &[("root", &img)]);
    repo.backup("db", &[("root", &img)]);
    let admin = service::user(&repo, "admin", "admin", &[]);
    let op = service::user(&repo, "op", "operator", &["web", "db"]);
    let s = Service::start(&repo);
    assert_eq!(s.get("/api/v1/vms/db", &op).status, 200);

    // Narrowed to a role: reads work, changes are refused.
    let r = s.post(
        "/api/v1/users/op/tokens",
        &admin,
        json!({"name": "ro", "role": "viewer"}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ro = r.body["bearer"].as_str().unwrap().to_string();
    assert!(ro.starts_with("op!ro:") && r.body["secret"].as_str().unwrap().len() == 64);
    let who = s.get("/api/v1/whoami", &ro);
    assert_eq!(
        (who.body["name"].as_str(), who.body["role"].as_str()),
        (Some("op!ro"), Some("viewer"))
    );
    assert_eq!(s.get("/api/v1/vms/web/backups", &ro).status, 200);
    let id = s.get("/api/v1/vms/web/backups", &ro).body[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let p = s.call(
        "PUT",
        &format!("/api/v1/vms/web/backups/{id}/protected"),
        &ro,
        Some(&json!({"protected": true})),
    );
    assert_eq!((p.status, p.code()), (403, "forbidden"));
    // A token never rises above its user.
    let up = s
        .post(
            "/api/v1/users/op/tokens",
            &admin,
            json!({"name": "up", "role": "admin"}),
        )
        .body["bearer"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s.get("/api/v1/whoami", &up).body["role"], "operator");
    assert_eq!(s.get("/api/v1/users", &up).status, 403);
    // Narrowed to VMs: the others do not exist for it.
    let web_only = s
        .post(
            "/api/v1/users/op/tokens",
            &admin,
            json!({"name": "web", "vms": ["web"]}),
        )
        .body["bearer"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s.get("/api/v1/vms/web", &web_only).status, 200);
    let r = s.get("/api/v1/vms/db", &web_only);
    assert_eq!((r.status, r.code()), (404, "not-found"));
    let vms = s.get("/api/v1/vms", &web_only).body;
    let names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web"]);

    // Expiry.
    let short = s
        .post(
            "/api/v1/users/op/tokens",
            &admin,
            json!({"name": "short", "expires_in": 1}),
        )
        .body["bearer"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s.get("/api/v1/whoami", &short).status, 200);
    std::thread::sleep(Duration::from_millis(1100));
    let r = s.get("/api/v1/whoami", &short);
    assert_eq!((r.status, r.code()), (401, "unauthenticated"));

    // Revocation, through the API and the CLI.
    assert_eq!(
        s.call("DELETE", "/api/v1/users/op/tokens/ro", &admin, None)
            .status,
        200
    );
    let r = s.get("/api/v1/whoami", &ro);
    assert_eq!((r.status, r.code()), (401, "unauthenticated"));
    let cli = service::token(&repo, "op", "cli", &["--expires", "30d", "--vm", "db"]);
    assert_eq!(s.get("/api/v1/vms/db", &cli).status, 200);
    let listed = repo.run(&["--json", "token", "list", "op"]).ok().json();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["op!cli", "op!main", "op!short", "op!up", "op!web"]);
    assert_eq!(listed[2]["expired"], true);
    repo.run(&["token", "remove", "op!cli"]).ok();
    assert_eq!(s.get("/api/v1/vms/db", &cli).status, 401);
    let text = std::fs::read_to_string(repo.path().join("users.toml")).unwrap();
    assert!(
        !text.contains(cli.split(':').nth(1).unwrap()),
        "secrets are stored hashed"
    );

    // Assignments change at once for live credentials.
    repo.run(&["user", "assign", "op", "--vm", "db"]).ok();
    assert_eq!(s.get("/api/v1/vms/web", &op).status, 404);
    // A removed user's tokens stop working.
    repo.run(&["user", "remove", "op"]).ok();
    assert_eq!(s.get("/api/v1/whoami", &op).status, 401);
    // Garbage.
    for bad in [
        "",
        "nonsense",
        "admin!main:",
        "admin!main:00",
        &format!("{admin}x"),
    ] {
        let r = s.raw(
            "GET",
            "/api/v1/whoami",
            "",
            None,
            &[("Authorization", &format!("Bearer {bad}"))],
        );
        assert_eq!((r.status, r.code()), (401, "unauthenticated"), "{bad:?}");
    }
    let r = s.raw(
        "GET",
        "/api/v1/whoami",
        "",
        None,
        &[("Authorization", "Basic YWRtaW46eA==")],
    );
    assert_eq!(r.status, 401);
}

fn login(s: &Service, user: &str, password: &str) -> service::Reply {
    s.post(
        "/api/v1/login",
        "",
        json!({"user": user, "password": password}),
    )
}

#[test]
fn sessions_need_csrf_tokens_and_logins_are_rate_limited() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 2, 9);
    let id = repo.backup("web", &[("root", &img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    service::user(&repo, "alice", "operator", &["web"]);
    service::user(&repo, "bob", "viewer", &["web"]);
    let s = Service::start(&repo);

    let r = login(&s, "alice", "password-of-alice");
    assert_eq!(r.status, 200, "{:?}", r.body);
    let set = r.header("set-cookie").unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/"),
        "{set}"
    );
    assert!(!set.contains("Secure"), "plain HTTP on loopback: {set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let csrf = r.body["csrf"].as_str().unwrap().to_string();
    assert_eq!(r.body["role"], "operator");
    let get = s.raw("GET", "/api/v1/vms", "", None, &[("Cookie", &cookie)]);
    assert_eq!(get.status, 200);
    // A reloaded page gets its session's CSRF token back; a bearer token has none.
    let who = s.raw("GET", "/api/v1/whoami", "", None, &[("Cookie", &cookie)]);
    assert_eq!(who.body["csrf"], csrf.as_str(), "{:?}", who.body);
    let bearer = service::token(&repo, "alice", "t", &[]);
    let who = s.raw(
        "GET",
        "/api/v1/whoami",
        &bearer,
        None,
        &[("Cookie", &cookie)],
    );
    assert_eq!(who.status, 200);
    assert!(who.body.get("csrf").is_none(), "{:?}", who.body);
    let path = format!("/api/v1/vms/web/backups/{id}/protected");
    let body = r#"{"protected": true}"#;
    let r = s.raw("PUT", &path, "", Some(body), &[("Cookie", &cookie)]);
    assert_eq!((r.status, r.code()), (403, "forbidden"), "no CSRF token");
    let r = s.raw(
        "PUT",
        &path,
        "",
        Some(body),
        &[("Cookie", &cookie), ("X-CSRF-Token", "wrong")],
    );
    assert_eq!(
        (r.status, r.code()),
        (403, "forbidden"),
        "a wrong CSRF token"
    );
    let r = s.raw(
        "PUT",
        &path,
        "",
        Some(body),
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["protected"], true);
    // The user manages their own tokens through a session (not through a token).
    let r = s.raw(
        "POST",
        "/api/v1/users/alice/tokens",
        "",
        Some(r#"{"name":"mine"}"#),
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = s.raw("GET", "/api/v1/users/bob", "", None, &[("Cookie", &cookie)]);
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    // Logout ends it.
    let r = s.raw(
        "POST",
        "/api/v1/logout",
        "",
        None,
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
    );
    assert_eq!(r.status, 200);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    let r = s.raw("GET", "/api/v1/vms", "", None, &[("Cookie", &cookie)]);
    assert_eq!((r.status, r.code()), (401, "unauthenticated"));

    // Failed logins: 5 per user per minute, then 429 even with the right password.
    for _ in 0..5 {
        let r = login(&s, "bob", "wrong password");
        assert_eq!((r.status, r.code()), (401, "unauthenticated"));
    }
    let r = login(&s, "bob", "password-of-bob");
    assert_eq!((r.status, r.code()), (429, "rate-limited"), "{:?}", r.body);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("wait"));
    // The address is limited too: other users from it wait as well.
    let r = login(&s, "alice", "password-of-alice");
    assert_eq!((r.status, r.code()), (429, "rate-limited"));
    // Unknown users fail like wrong passwords (no user enumeration).
    let audit = repo.run(&["--json", "audit"]).ok().json();
    let logins: Vec<(String, u64)> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "POST /api/v1/login")
        .map(|e| {
            (
                e["who"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        logins
            .iter()
            .filter(|(w, st)| w == "bob" && *st == 401)
            .count(),
        5
    );
    assert!(logins.iter().all(|(w, _)| w == "bob" || w == "alice"));
    let bad = login(&s, "nobody", "x");
    assert_eq!(bad.status, 429, "the address is still limited");
    let r = s.raw("POST", "/api/v1/login", "", Some(r#"{"user":"bob"}"#), &[]);
    assert_eq!((r.status, r.code()), (422, "invalid-body"));
}

#[test]
fn the_local_socket_tls_and_a_second_service() {
    let repo = Repo::new();
    let s = Service::start(&repo);
    // The local socket: root is an admin without credentials; only its owner may connect.
    let (status, body) = service::unix_request(&s.socket, "GET", "/api/v1/whoami");
    assert_eq!(status, 200, "{body}");
    let who: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (who["role"].as_str(), who["name"].as_str()),
        (Some("admin"), Some("local:root"))
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // One service per repository.
    let second = repo.run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(second.code, 4, "{}", second.stderr);
    assert!(
        second
            .err()
            .contains("another holdfast serve runs on this repository"),
        "{}",
        second.stderr
    );
    // Bad options: one line, exit 2.
    let bad = repo.run(&["serve", "--listen", "localhost"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.err().contains("--listen \"localhost\""),
        "{}",
        bad.stderr
    );
    let bad = repo.run(&["serve", "--jobs", "0"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    drop(s);
    assert!(
        !repo.path().join("holdfast.sock").exists(),
        "the socket is removed at exit"
    );

    // HTTPS on loopback with --tls: a self-signed certificate made once and kept, its
    // fingerprint printed.
    let s = Service::start_with(&repo, &["--tls"], &[]);
    assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);
    assert_eq!(s.ready["made_certificate"], true);
    let cert = std::fs::read(repo.path().join("tls/cert.pem")).unwrap();
    let key_mode = std::fs::metadata(repo.path().join("tls/key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let der = rustls_pemfile::certs(&mut &cert[..])
        .next()
        .unwrap()
        .unwrap();
    let want: String = sha2::Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(s.ready["fingerprint"].as_str(), Some(want.as_str()));
    let agent = tls_agent(&cert);
    let r = agent.get(&format!("{}/healthz", s.url)).call().unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP to it gets nowhere.
    let plain = ureq::get(&s.url.replace("https://", "http://"))
        .timeout(Duration::from_secs(5))
        .call();
    assert!(plain.is_err());
    // Cookies are Secure under TLS.
    drop(s);
    let s = Service::start_with(&repo, &["--tls"], &[]);
    assert_eq!(
        std::fs::read(repo.path().join("tls/cert.pem")).unwrap(),
        cert,
        "kept across restarts"
    );
    assert_eq!(
        (
            s.ready["made_certificate"].as_bool(),
            s.ready["fingerprint"].as_str()
        ),
        (Some(false), Some(want.as_str()))
    );
    service::user(&repo, "carol", "viewer", &[]);
    let r = tls_agent(&cert)
        .post(&format!("{}/api/v1/login", s.url))
        .send_json(json!({"user": "carol", "password": "password-of-carol"}))
        .unwrap();
    assert!(r.header("set-cookie").unwrap().contains("; Secure"));
}

/// A client that trusts exactly `cert_pem`.
fn tls_agent(cert_pem: &[u8]) -> ureq::Agent {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &cert_pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ureq::AgentBuilder::new()
        .tls_config(std::sync::Arc::new(config))
        .timeout(Duration::from_secs(30))
        .build()
}
