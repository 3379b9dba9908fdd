//! The role matrix of `holdfast serve`, over real HTTP: every endpoint tried as an
//! unauthenticated client, a viewer and an operator (both assigned VM `web` only) and an admin,
//! with the exact status and error code each gets. A VM that is not assigned does not exist for
//! viewers and operators (404, not 403); what a viewer is refused changes nothing.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;

use common::service::{self, Service};
use common::Repo;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

struct Who {
    none: String,
    viewer: String,
    operator: String,
    admin: String,
}

/// Try `method path body` as each of `cases` (token, status, code; "" for a success).
fn expect(
    s: &Service,
    method: &str,
    path: &str,
    body: Option<Value>,
    cases: &[(&str, u16, &str)],
) -> Vec<Value> {
    let mut out = Vec::new();
    for (tok, status, code) in cases {
        let r = s.call(method, path, tok, body.as_ref());
        let who = if tok.is_empty() {
            "no credentials"
        } else {
            tok.split(':').next().unwrap()
        };
        assert_eq!(r.status, *status, "{method} {path} as {who}: {:?}", r.body);
        assert_eq!(r.code(), *code, "{method} {path} as {who}: {:?}", r.body);
        if status / 100 == 4 || status / 100 == 5 {
            let msg = r.body["error"]["message"].as_str().unwrap();
            assert!(
                !msg.is_empty() && !msg.contains('\n'),
                "one-line message: {msg:?}"
            );
        }
        out.push(r.body);
    }
    out
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_endpoint_as_every_role() {
    let repo = Repo::with_default_policy();
    let img = repo.tmp("root.img");
    service::image(&img, 4, 1);
    let img2 = repo.tmp("db.img");
    service::image(&img2, 4, 2);
    let w1 = repo.backup("web", &[("root", &img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let w2 = repo.backup("web", &[("root", &img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d1 = repo.backup("db", &[("root", &img2)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // web is declared (its QEMU is not running: VM operations start, then fail in QEMU).
    let qmp = repo.tmp("no-qemu.sock");
    repo.run(&[
        "vm",
        "add",
        "web",
        "--qmp",
        qmp.to_str().unwrap(),
        "--disk",
        "root=disk0",
        "--no-check",
    ])
    .ok();
    let restores = repo.tmp("restores");
    std::fs::create_dir(&restores).unwrap();
    service::configure(
        &repo,
        &format!("restore_dirs = [{:?}]\n", restores.to_str().unwrap()),
    );
    let who = Who {
        none: String::new(),
        viewer: service::user(&repo, "viewer", "viewer", &["web"]),
        operator: service::user(&repo, "operator", "operator", &["web"]),
        admin: service::user(&repo, "admin", "admin", &[]),
    };
    let s = Service::start(&repo);
    let (n, v, o, a) = (
        who.none.as_str(),
        who.viewer.as_str(),
        who.operator.as_str(),
        who.admin.as_str(),
    );
    let unauth = (n, 401, "unauthenticated");

    // Reads.
    let r = expect(
        &s,
        "GET",
        "/api/v1/whoami",
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    assert_eq!(
        (
            r[1]["role"].as_str(),
            r[2]["role"].as_str(),
            r[3]["role"].as_str()
        ),
        (Some("viewer"), Some("operator"), Some("admin"))
    );
    let r = expect(
        &s,
        "GET",
        "/api/v1/vms",
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    assert_eq!(
        (names(&r[1]), names(&r[3])),
        (
            vec!["web".to_string()],
            vec!["db".to_string(), "web".into()]
        )
    );
    assert_eq!(r[1][0]["backups"], 2);
    // The built-in policy: 2 slots, manual backups refused once both are used.
    assert_eq!(
        r[1][0]["slots"],
        json!({"used": 2, "total": 2, "full": true})
    );
    assert_eq!(r[1][0]["declared"], true);
    expect(
        &s,
        "GET",
        "/api/v1/vms/web",
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    expect(
        &s,
        "GET",
        "/api/v1/vms/db",
        None,
        &[
            unauth,
            (v, 404, "not-found"),
            (o, 404, "not-found"),
            (a, 200, ""),
        ],
    );
    expect(
        &s,
        "GET",
        "/api/v1/vms/nosuch",
        None,
        &[(v, 404, "not-found"), (a, 404, "not-found")],
    );
    expect(
        &s,
        "GET",
        "/api/v1/vms/bad%20name",
        None,
        &[(v, 400, "invalid-name"), (a, 400, "invalid-name")],
    );
    let r = expect(
        &s,
        "GET",
        "/api/v1/vms/web/backups",
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    assert_eq!(r[1].as_array().unwrap().len(), 2);
    assert_eq!(r[1][0]["state"], "committed");
    assert!(r[1][0]["new_stored_bytes"].as_u64().unwrap() > 0);
    expect(
        &s,
        "GET",
        "/api/v1/vms/db/backups",
        None,
        &[
            unauth,
            (v, 404, "not-found"),
            (o, 404, "not-found"),
            (a, 200, ""),
        ],
    );
    expect(
        &s,
        "GET",
        &format!("/api/v1/vms/web/backups/{w1}"),
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    expect(
        &s,
        "GET",
        &format!("/api/v1/vms/db/backups/{d1}"),
        None,
        &[
            unauth,
            (v, 404, "not-found"),
            (o, 404, "not-found"),
            (a, 200, ""),
        ],
    );
    expect(
        &s,
        "GET",
        "/api/v1/vms/web/backups/20990101-000000",
        None,
        &[(v, 404, "not-found")],
    );
    let r = expect(
        &s,
        "GET",
        "/api/v1/vms/web/stats",
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    assert_eq!(r[1]["per_backup"].as_array().unwrap().len(), 2);
    expect(
        &s,
        "GET",
        "/api/v1/vms/db/stats",
        None,
        &[
            unauth,
            (v, 404, "not-found"),
            (o, 404, "not-found"),
            (a, 200, ""),
        ],
    );
    expect(
        &s,
        "GET",
        "/api/v1/vms/web/snapshots",
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    expect(
        &s,
        "GET",
        "/api/v1/vms/db/snapshots",
        None,
        &[unauth, (v, 404, "not-found"), (o, 404, "not-found")],
    );
    let r = expect(
        &s,
        "GET",
        "/api/v1/stats",
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    assert_eq!(
        (r[1]["vms"].as_u64(), r[3]["vms"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(
        r[3]["dedup_ratio"].as_f64().unwrap() >= 1.0
            && r[3]["cost_per_month"].as_f64().unwrap() > 0.0
    );
    expect(
        &s,
        "GET",
        "/api/v1/exports",
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    // Tasks: the CLI's backups are there; a viewer sees web's only.
    let r = expect(
        &s,
        "GET",
        "/api/v1/tasks",
        None,
        &[unauth, (v, 200, ""), (a, 200, "")],
    );
    assert!(
        r[1].as_array()
            .unwrap()
            .iter()
            .all(|t| t["vms"] == json!(["web"])),
        "{:?}",
        r[1]
    );
    let kinds: Vec<&str> = r[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["backup", "backup", "vm-add"]);
    let all = r[2].as_array().unwrap();
    let db_task = all.iter().find(|t| t["vms"] == json!(["db"])).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let web_task = all.iter().find(|t| t["vms"] == json!(["web"])).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(all
        .iter()
        .any(|t| t["kind"] == "backup" && t["user"].as_str().unwrap().starts_with("cli:")));
    expect(
        &s,
        "GET",
        &format!("/api/v1/tasks/{web_task}"),
        None,
        &[unauth, (v, 200, ""), (o, 200, ""), (a, 200, "")],
    );
    expect(
        &s,
        "GET",
        &format!("/api/v1/tasks/{db_task}"),
        None,
        &[
            unauth,
            (v, 404, "not-found"),
            (o, 404, "not-found"),
            (a, 200, ""),
        ],
    );
    expect(
        &s,
        "GET",
        "/api/v1/tasks?state=bogus-and-more",
        None,
        &[(v, 200, "")],
    );
    expect(
        &s,
        "GET",
        "/api/v1/tasks?since=notanumber",
        None,
        &[(v, 400, "usage")],
    );
    expect(&s, "GET", "/api/v1/tasks?vm=db", None, &[(v, 200, "")]);
    expect(
        &s,
        "POST",
        &format!("/api/v1/tasks/{web_task}/cancel"),
        None,
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 409, "conflict"),
            (a, 409, "conflict"),
        ],
    );
    expect(
        &s,
        "POST",
        &format!("/api/v1/tasks/{db_task}/cancel"),
        None,
        &[(o, 404, "not-found")],
    );
    let m = s.get("/metrics", v);
    assert_eq!(m.status, 200);
    let text = m.body.as_str().unwrap();
    assert!(
        text.contains("holdfast_backups_total{vm=\"web\",state=\"ok\"} 2"),
        "{text}"
    );
    assert!(
        !text.contains("vm=\"db\""),
        "a viewer's metrics leak db: {text}"
    );
    assert_eq!(s.get("/metrics", n).status, 401);
    assert!(s
        .get("/metrics", a)
        .body
        .as_str()
        .unwrap()
        .contains("holdfast_stored_bytes "));
    assert_eq!(s.get("/healthz", n).status, 200);
    assert_eq!(s.get("/api/v1/openapi.json", n).status, 200);
    expect(
        &s,
        "GET",
        "/api/v1/no-such-route",
        None,
        &[(a, 404, "not-found")],
    );

    // VM declarations: admins only.
    let decl = json!({"name": "mail", "qmp": qmp.to_str().unwrap(), "disks": {"root": "disk0"}, "check": false});
    expect(
        &s,
        "POST",
        "/api/v1/vms",
        Some(decl.clone()),
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 403, "forbidden"),
            (a, 200, ""),
        ],
    );
    expect(&s, "POST", "/api/v1/vms", Some(decl), &[(a, 409, "exists")]);
    expect(
        &s,
        "DELETE",
        "/api/v1/vms/web",
        None,
        &[unauth, (v, 403, "forbidden"), (o, 403, "forbidden")],
    );
    expect(
        &s,
        "DELETE",
        "/api/v1/vms/mail",
        None,
        &[(v, 404, "not-found"), (a, 200, "")],
    );

    // Backups: operators back up declared VMs; reading paths on the appliance is an admin's.
    let disks = json!({"disks": {"root": img.to_str().unwrap()}});
    expect(
        &s,
        "POST",
        "/api/v1/vms/web/backups",
        Some(disks.clone()),
        &[unauth, (v, 403, "forbidden"), (o, 403, "forbidden")],
    );
    expect(
        &s,
        "POST",
        "/api/v1/vms/db/backups",
        Some(json!({})),
        &[(o, 404, "not-found")],
    );
    let r = expect(
        &s,
        "POST",
        "/api/v1/vms/web/backups",
        Some(json!({})),
        &[(v, 403, "forbidden"), (o, 202, "")],
    );
    // The operator's backup starts; web's 2 slots are full and the built-in policy refuses
    // manual backups then, so the task fails before it touches QEMU.
    let t = s.wait_task(r[1]["task"].as_str().unwrap(), o, WAIT);
    assert_eq!(
        (t["state"].as_str(), t["outcome"]["error"]["code"].as_str()),
        (Some("failed"), Some("slots-full")),
        "{t}"
    );
    assert_eq!(t["user"], "api:operator!main");
    let r = expect(
        &s,
        "POST",
        "/api/v1/vms/scratch/backups",
        Some(disks),
        &[(a, 202, "")],
    );
    let t = s.wait_task(r[0]["task"].as_str().unwrap(), a, WAIT);
    assert_eq!(t["state"], "ok", "{t}");

    // Protect, forget.
    let path = format!("/api/v1/vms/web/backups/{w2}/protected");
    expect(
        &s,
        "PUT",
        &path,
        Some(json!({"protected": true})),
        &[unauth, (v, 403, "forbidden"), (o, 200, "")],
    );
    expect(
        &s,
        "PUT",
        &path,
        Some(json!({"protected": false})),
        &[(o, 403, "forbidden")],
    );
    expect(
        &s,
        "DELETE",
        &format!("/api/v1/vms/web/backups/{w2}"),
        None,
        &[(a, 409, "protected")],
    );
    let r = expect(
        &s,
        "PUT",
        &path,
        Some(json!({"protected": false})),
        &[(a, 200, "")],
    );
    assert_eq!(r[0]["protected"], false);
    expect(
        &s,
        "PUT",
        &format!("/api/v1/vms/db/backups/{d1}/protected"),
        Some(json!({"protected": true})),
        &[(v, 404, "not-found"), (o, 404, "not-found")],
    );
    expect(
        &s,
        "DELETE",
        &format!("/api/v1/vms/web/backups/{w2}"),
        None,
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 403, "forbidden"),
            (a, 200, ""),
        ],
    );
    expect(
        &s,
        "DELETE",
        &format!("/api/v1/vms/web/backups/{w2}"),
        None,
        &[(a, 404, "not-found")],
    );

    // Restore into the restore directory (a task); byte-identical.
    let to = restores.join("web.img");
    let body = json!({"to": to.to_str().unwrap()});
    let path = format!("/api/v1/vms/web/backups/{w1}/restore");
    let r = expect(
        &s,
        "POST",
        &path,
        Some(body.clone()),
        &[unauth, (v, 403, "forbidden"), (o, 202, "")],
    );
    let t = s.wait_task(r[2]["task"].as_str().unwrap(), o, WAIT);
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(common::hash_file(&to), common::hash_file(&img));
    expect(&s, "POST", &path, Some(body), &[(o, 409, "exists")]);
    expect(
        &s,
        "POST",
        &path,
        Some(json!({"to": "/etc/holdfast-evil.img"})),
        &[(a, 403, "forbidden")],
    );
    expect(
        &s,
        "POST",
        &format!("/api/v1/vms/db/backups/{d1}/restore"),
        Some(json!({"to": restores.join("db.img")})),
        &[(v, 404, "not-found"), (o, 404, "not-found")],
    );

    // Export (serves until cancelled), verify.
    let r = expect(
        &s,
        "POST",
        &format!("/api/v1/vms/web/backups/{w1}/export"),
        Some(json!({})),
        &[unauth, (v, 403, "forbidden"), (o, 200, "")],
    );
    let (task, uri) = (
        r[2]["task"].as_str().unwrap().to_string(),
        r[2]["uri"].as_str().unwrap().to_string(),
    );
    assert!(uri.starts_with("nbd+unix:///root?socket="), "{uri}");
    let ex = s.get("/api/v1/exports", v);
    assert_eq!(ex.body[0]["task"], json!(task));
    expect(
        &s,
        "POST",
        &format!("/api/v1/tasks/{task}/cancel"),
        None,
        &[(v, 403, "forbidden"), (o, 202, "")],
    );
    // Stopping is how a server ends: its task is ok, and the socket is gone.
    assert_eq!(s.wait_task(&task, o, WAIT)["state"], "ok");
    let sock = uri.split_once("socket=").unwrap().1;
    assert!(!std::path::Path::new(sock).exists(), "{sock} left behind");
    let r = expect(
        &s,
        "POST",
        "/api/v1/vms/web/verify",
        Some(json!({})),
        &[unauth, (v, 403, "forbidden"), (o, 202, "")],
    );
    assert_eq!(
        s.wait_task(r[2]["task"].as_str().unwrap(), o, WAIT)["state"],
        "ok"
    );

    // Snapshots: operators (QEMU is not running: the tasks fail there, after authorization).
    let snap = |r: &[Value], i: usize| {
        let t = s.wait_task(r[i]["task"].as_str().unwrap(), o, WAIT);
        assert_eq!(t["state"], "failed", "{t}");
    };
    let r = expect(
        &s,
        "POST",
        "/api/v1/vms/web/snapshots",
        Some(json!({"name": "pre-update", "description": "x"})),
        &[unauth, (v, 403, "forbidden"), (o, 202, "")],
    );
    snap(&r, 2);
    expect(
        &s,
        "POST",
        "/api/v1/vms/web/snapshots",
        Some(json!({"name": "bad name"})),
        &[(o, 400, "invalid-name")],
    );
    expect(
        &s,
        "POST",
        "/api/v1/vms/db/snapshots",
        Some(json!({"name": "x"})),
        &[(o, 404, "not-found")],
    );
    let r = expect(
        &s,
        "POST",
        "/api/v1/vms/web/snapshots/pre-update/revert",
        None,
        &[unauth, (v, 403, "forbidden"), (o, 202, "")],
    );
    snap(&r, 2);
    let r = expect(
        &s,
        "POST",
        "/api/v1/vms/web/snapshots/pre-update/rename",
        Some(json!({"name": "other"})),
        &[unauth, (v, 403, "forbidden"), (o, 202, "")],
    );
    snap(&r, 2);
    let r = expect(
        &s,
        "POST",
        "/api/v1/vms/web/snapshots/pre-update/clone",
        Some(json!({"to": restores.join("clone.qcow2")})),
        &[unauth, (v, 403, "forbidden"), (o, 202, "")],
    );
    snap(&r, 2);
    expect(
        &s,
        "POST",
        "/api/v1/vms/web/snapshots/pre-update/clone",
        Some(json!({"to": "/etc/holdfast-evil.img"})),
        &[(o, 403, "forbidden")],
    );
    let r = expect(
        &s,
        "DELETE",
        "/api/v1/vms/web/snapshots/pre-update",
        None,
        &[unauth, (v, 403, "forbidden"), (o, 202, "")],
    );
    snap(&r, 2);

    // gc, users, tokens, audit: admins.
    let r = expect(
        &s,
        "POST",
        "/api/v1/gc",
        None,
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 403, "forbidden"),
            (a, 202, ""),
        ],
    );
    assert_eq!(
        s.wait_task(r[3]["task"].as_str().unwrap(), a, WAIT)["state"],
        "ok"
    );
    let r = expect(
        &s,
        "GET",
        "/api/v1/users",
        None,
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 403, "forbidden"),
            (a, 200, ""),
        ],
    );
    assert_eq!(names(&r[3]), vec!["admin", "operator", "viewer"]);
    assert!(!r[3].to_string().contains("argon2"), "no hashes in replies");
    let newbie =
        json!({"name": "newbie", "role": "viewer", "password": "a long password", "vms": ["web"]});
    expect(
        &s,
        "POST",
        "/api/v1/users",
        Some(newbie.clone()),
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 403, "forbidden"),
            (a, 200, ""),
        ],
    );
    expect(
        &s,
        "POST",
        "/api/v1/users",
        Some(newbie),
        &[(a, 409, "exists")],
    );
    expect(
        &s,
        "POST",
        "/api/v1/users",
        Some(json!({"name": "x", "role": "viewer", "password": "short"})),
        &[(a, 400, "usage")],
    );
    expect(
        &s,
        "GET",
        "/api/v1/users/newbie",
        None,
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 403, "forbidden"),
            (a, 200, ""),
        ],
    );
    let r = expect(
        &s,
        "PATCH",
        "/api/v1/users/newbie",
        Some(json!({"role": "operator"})),
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 403, "forbidden"),
            (a, 200, ""),
        ],
    );
    assert_eq!(r[3]["role"], "operator");
    expect(
        &s,
        "GET",
        "/api/v1/users/newbie/tokens",
        None,
        &[unauth, (v, 403, "forbidden"), (a, 200, "")],
    );
    let r = expect(
        &s,
        "POST",
        "/api/v1/users/newbie/tokens",
        Some(json!({"name": "t"})),
        &[unauth, (o, 403, "forbidden"), (a, 200, "")],
    );
    let bearer = r[2]["bearer"].as_str().unwrap().to_string();
    assert_eq!(s.get("/api/v1/whoami", &bearer).body["name"], "newbie!t");
    expect(
        &s,
        "DELETE",
        "/api/v1/users/newbie/tokens/t",
        None,
        &[unauth, (o, 403, "forbidden"), (a, 200, "")],
    );
    assert_eq!(s.get("/api/v1/whoami", &bearer).status, 401);
    expect(
        &s,
        "DELETE",
        "/api/v1/users/newbie",
        None,
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 403, "forbidden"),
            (a, 200, ""),
        ],
    );
    expect(
        &s,
        "DELETE",
        "/api/v1/users/newbie",
        None,
        &[(a, 404, "not-found")],
    );
    let r = expect(
        &s,
        "GET",
        "/api/v1/audit",
        None,
        &[
            unauth,
            (v, 403, "forbidden"),
            (o, 403, "forbidden"),
            (a, 200, ""),
        ],
    );
    let audit = r[3].as_array().unwrap();
    let denied = audit
        .iter()
        .find(|e| e["who"] == "viewer!main" && e["what"] == "POST /api/v1/vms/web/backups")
        .unwrap();
    assert_eq!(
        (denied["status"].as_u64(), denied["code"].as_str()),
        (Some(403), Some("forbidden"))
    );
    let done = audit
        .iter()
        .find(|e| {
            e["who"] == "operator!main"
                && e["what"] == format!("POST /api/v1/vms/web/backups/{w1}/restore")
                && e["status"] == 202
        })
        .unwrap();
    assert!(done["task"].is_string());
    assert!(audit.iter().any(|e| e["who"] == "admin!main"
        && e["what"] == "DELETE /api/v1/users/newbie"
        && e["status"] == 200));

    // What the viewer was refused changed nothing: db and web@w1 are there, web@w2 went by
    // the admin's hand only, the users are the three.
    let b = repo.run(&["--json", "backups"]).ok().json();
    let ids: Vec<&str> = b
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&w1.as_str()) && ids.contains(&d1.as_str()) && !ids.contains(&w2.as_str())
    );
}
