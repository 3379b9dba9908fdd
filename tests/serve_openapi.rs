//! The OpenAPI document against the running server: every documented operation exists (no
//! fallback 404, no 405), and schemathesis (PyPI, installed by scripts/install-deps) fuzzes
//! every operation as an admin on a repository with real data: no 5xx, and every status,
//! content type, header and body matches the document.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;

use common::service::{self, Service};
use common::Repo;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

fn schemathesis() -> PathBuf {
    let venv = std::env::var_os("HOLDFAST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/holdfast/venv")
        });
    let bin = venv.join("bin/schemathesis");
    assert!(
        bin.is_file(),
        "{} is missing: python3 -m venv {} && {}/bin/pip install 'schemathesis==4.32.5' (scripts/install-deps does)",
        bin.display(),
        venv.display(),
        venv.display()
    );
    bin
}

/// A repository with something in it: a declared VM with backups, a VM known by its backups,
/// restore directories, tasks.
fn populated() -> (Repo, String, String) {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 4, 21);
    repo.backup("web", &[("root", &img)]);
    repo.backup("web", &[("root", &img)]);
    repo.backup("db", &[("root", &img)]);
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
    let admin = service::user(&repo, "admin", "admin", &[]);
    service::user(&repo, "viewer", "viewer", &["web"]);
    let task = repo.run(&["--json", "tasks", "--vm", "db"]).ok().json()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    (repo, admin, task)
}

#[test]
fn every_documented_operation_exists() {
    let (repo, admin, task) = populated();
    let s = Service::start(&repo);
    let doc = s.get("/api/v1/openapi.json", "").body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 39, "{:?}", paths.keys().collect::<Vec<_>>());
    let mut ops = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            ops += 1;
            let url = path
                .replace("{vm}", "web")
                .replace(
                    "{id}",
                    if path.starts_with("/api/v1/tasks") {
                        &task
                    } else {
                        "latest"
                    },
                )
                .replace("{name}", "nosuch")
                .replace("{user}", "viewer")
                .replace("{token}", "nosuch")
                .replace("{target}", "nosuch");
            // Bodies that do nothing: wrong on purpose where a body is needed.
            let body = op.get("requestBody").map(|_| json!({"not-a-field": 1}));
            let r = s.call(&method.to_uppercase(), &url, &admin, body.as_ref());
            let msg = r.body["error"]["message"].as_str().unwrap_or("");
            assert!(
                !msg.contains("no such route"),
                "{method} {path}: the server has no such route"
            );
            assert_ne!(r.status, 405, "{method} {path}");
            let documented: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
            assert!(
                documented.contains(&&r.status.to_string()),
                "{method} {path}: {} is not documented ({documented:?}): {:?}",
                r.status,
                r.body
            );
        }
    }
    assert_eq!(ops, 52);
    // Errors have one shape, documented once.
    let err = &doc["components"]["schemas"]["ErrorReply"];
    assert_eq!(err["required"], json!(["error"]), "{err}");
}

#[test]
fn schemathesis_finds_nothing() {
    let bin = schemathesis();
    let (repo, admin, task) = populated();
    let s = Service::start(&repo);
    let config = repo.tmp("schemathesis.toml");
    // Real names where paths take them, so requests reach the code behind the 404s. User
    // changes go to the viewer: the fuzzer may demote, delete or rename at will, never the
    // admin whose token it uses. Notification targets are not fuzzed: a valid one would send
    // events to whatever host the fuzzer made up (tests talk to loopback only).
    std::fs::write(
        &config,
        format!(
            "[parameters]\n\"path.vm\" = \"web\"\n\n\
             [[operations]]\ninclude-path-regex = \"^/api/v1/tasks/\"\nparameters = {{ \"path.id\" = \"{task}\" }}\n\n\
             [[operations]]\ninclude-path-regex = \"^/api/v1/vms/\\\\{{vm\\\\}}/backups/\"\nparameters = {{ \"path.id\" = \"latest\" }}\n\n\
             [[operations]]\ninclude-path-regex = \"^/api/v1/users/\"\nparameters = {{ \"path.user\" = \"viewer\" }}\n\n\
             [[operations]]\ninclude-name = \"PUT /api/v1/notifications/targets/{{target}}\"\nenabled = false\n"
        ),
    )
    .unwrap();
    // One worker: CPython 3.11's ast.parse is not thread-safe ("AST constructor recursion
    // depth mismatch"), which hypothesis hits when two workers describe strategies at once.
    let out = std::process::Command::new(&bin)
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{}/api/v1/openapi.json", s.url)])
        .args(["-H", &format!("Authorization: Bearer {admin}")])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance"])
        .args(["--phases", "coverage,fuzzing", "--max-examples", "25", "--seed", "1", "--workers", "1"])
        .args(["--request-timeout", "30"])
        .env("NO_COLOR", "1")
        .current_dir(repo.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every operation was tested (schemathesis counts the document's own route in or out).
    let tested: usize = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count: {text}"));
    assert!(tested >= 49, "{text}");
    // It really ran the operations: many requests reached the server and the repository.
    let metrics = s.get("/metrics", &admin).body;
    let total: u64 = metrics
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("holdfast_http_requests_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(total > 500, "only {total} requests");
    // The service is well after it.
    assert_eq!(s.get("/healthz", "").status, 200);
    let who: Value = s.get("/api/v1/whoami", &admin).body;
    assert_eq!(who["role"], "admin");
    std::thread::sleep(Duration::from_millis(10));
}
