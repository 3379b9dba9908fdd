//! Every stable error code through `--json`: the JSON error on stdout (`{"error": {"code",
//! "message", "details"}}`), the one-line error on stderr, and the exit code. Codes that need a
//! running QEMU (`qemu`, `conflict`, `limit-reached`, `unsupported` of snapshots) are checked in
//! tests/vm_snapshot.rs, `busy` and `process-ended` in tests/tasks.rs, guest filesystems in
//! tests/fuse.rs, `store-full` in tests/bad_input.rs; `tool` in the unit tests.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Run `args` with `--json`: the exit code must be `exit`, the JSON error's code `code`, and
/// its message (also the one line on stderr) contain `want`. Returns the JSON error.
fn check(repo: &Repo, args: &[&str], exit: i32, code: &str, want: &str) -> serde_json::Value {
    check_env(repo, args, &[], exit, code, want)
}

/// [`check`] with extra environment.
fn check_env(
    repo: &Repo,
    args: &[&str],
    env: &[(&str, &str)],
    exit: i32,
    code: &str,
    want: &str,
) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let r = repo.run_env(&all, env);
    assert_eq!(r.code, exit, "{args:?}: {}", r.stderr);
    let line = r.err().to_string();
    let e = r.json()["error"].clone();
    assert_eq!(e["code"], code, "{args:?}: {e}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(want), "{args:?}: {msg}");
    assert_eq!(
        line,
        format!("holdfast: error: {msg}"),
        "stderr says the same"
    );
    e
}

fn small_image(path: &Path) {
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(path, data).unwrap();
}

#[test]
fn request_errors_have_their_codes() {
    let repo = Repo::new();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.img");
    small_image(&img);
    let disk = format!("root={}", img.display());
    repo.run(&["backup", "vm1", "--disk", &disk]).ok();

    check(
        &repo,
        &["verify", "--sample", "0"],
        2,
        "usage",
        "--sample 0 must be a percentage",
    );
    check(
        &repo,
        &["backup", "vm1", "--disk", "root"],
        2,
        "usage",
        "must be NAME=PATH",
    );
    check(
        &repo,
        &["backups", "a b"],
        2,
        "invalid-name",
        "invalid VM name \"a b\"",
    );
    let e = check(
        &repo,
        &["show", "vm1@20001122"],
        1,
        "not-found",
        "VM vm1 has no backup",
    );
    assert_eq!(e["details"]["what"], "backup");
    let e = check(
        &repo,
        &["restore", "vm1", "--to", img.to_str().unwrap()],
        1,
        "exists",
        "pass --force",
    );
    assert_eq!(e["details"]["what"], "file");
    check(
        &repo,
        &["init"],
        2,
        "usage",
        "choose how the store is encrypted: --encryption repokey",
    );
    check(
        &repo,
        &["init", "--encryption", "none"],
        1,
        "exists",
        "already holds a holdfast repository",
    );
    check(
        &repo,
        &["task", "20001122"],
        1,
        "not-found",
        "no task \"20001122\"",
    );
    check(
        &repo,
        &["backup", "vm1", "--disk", "root=/dev/null"],
        1,
        "source",
        "is not a regular file or block device",
    );
    check(
        &repo,
        &["restore", "vm1", "--to", "/proc/holdfast-test.img"],
        1,
        "io",
        "/proc/",
    );
    check_env(
        &repo,
        &["backup", "vm2", "--disk", &disk],
        &[("HOLDFAST_TEST_FAIL_AT", "before-commit")],
        1,
        "internal",
        "HOLDFAST_TEST_FAIL_AT=before-commit",
    );
}

#[test]
fn environment_errors_have_their_codes() {
    // A config file that does not parse.
    let repo = Repo::new();
    std::fs::write(repo.path().join("vms.toml"), "[vm.x]\nqmp = 3\n").unwrap();
    let e = check(&repo, &["vm", "list"], 1, "config", "is not valid");
    assert!(
        e["details"]["path"].as_str().unwrap().ends_with("vms.toml"),
        "{e}"
    );
    // A VM whose QMP socket nobody serves: QEMU's step is named.
    std::fs::remove_file(repo.path().join("vms.toml")).unwrap();
    let e = check(
        &repo,
        &[
            "vm",
            "add",
            "x",
            "--qmp",
            "/nonexistent/qmp.sock",
            "--disk",
            "root=n",
        ],
        1,
        "qemu",
        "cannot connect to QMP socket /nonexistent/qmp.sock",
    );
    assert_eq!(e["details"]["vm"], "x");
    assert_eq!(e["details"]["step"], "connecting to QMP");
    // A catalog RocksDB cannot open.
    std::fs::write(repo.path().join("catalog/CURRENT"), b"MANIFEST-garbage\n").unwrap();
    check(&repo, &["backups"], 1, "catalog", "catalog rebuild");
    // An S3 store that does not answer.
    let dead = Repo {
        dir: tempfile::tempdir().unwrap(),
        env: s3::env()
            .into_iter()
            .chain([("HOLDFAST_S3_ATTEMPTS", "1".to_string())])
            .collect(),
    };
    std::fs::create_dir_all(dead.path()).unwrap();
    std::fs::write(
        dead.path().join("store.json"),
        r#"{"s3":{"bucket":"bkt","prefix":"x","endpoint":"http://127.0.0.1:9","path_style":true},"cache_bytes":0}"#,
    )
    .unwrap();
    check(&dead, &["backups"], 1, "store-unavailable", "127.0.0.1:9");
}

#[test]
fn damage_and_interruption_have_their_codes() {
    let repo = Repo::new();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.img");
    small_image(&img);
    let disk = format!("root={}", img.display());
    repo.run(&["backup", "vm1", "--disk", &disk]).ok();
    // Cancelled: SIGINT while the backup waits before its commit.
    let flag = d.path().join("go");
    let mut child = repo
        .cmd(&["--json", "backup", "vm2", "--disk", &disk])
        .env(
            "HOLDFAST_TEST_PAUSE_AT",
            format!("before-commit:{}", flag.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !flag.with_extension("waiting").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the backup never paused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(child.id(), libc::SIGINT);
    std::fs::write(&flag, b"").unwrap();
    let status = child.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(status.code(), Some(130));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["error"]["code"], "cancelled", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("interrupted (SIGINT)"));
    // Damaged: a pack's bytes flipped, then a restore (exit 3, nothing written).
    let packs = repo.path().join("packs");
    let pack = std::fs::read_dir(&packs)
        .unwrap()
        .flatten()
        .flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten())
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&pack).unwrap();
    for b in &mut bytes[100..4196] {
        *b ^= 0x5a;
    }
    std::fs::write(&pack, &bytes).unwrap();
    let to = d.path().join("out.img");
    check(
        &repo,
        &["restore", "vm1", "--to", to.to_str().unwrap()],
        3,
        "damaged",
        "damaged",
    );
    assert!(!to.exists(), "nothing half-written");
    // A pack gone from the store is damage too.
    std::fs::remove_file(&pack).unwrap();
    check(
        &repo,
        &["restore", "vm1", "--to", to.to_str().unwrap()],
        3,
        "damaged",
        "",
    );
}

#[test]
fn every_code_is_documented() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/errors.md"))
        .unwrap();
    for (code, _) in holdfast::error::CODES {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{code}` |")))
            .unwrap_or_else(|| panic!("docs/errors.md lacks a row for {code}"));
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let (exit, http) = (cells[2], cells[4]);
        assert_eq!(
            exit,
            holdfast::error::exit_code_of(code).to_string(),
            "exit code of {code}"
        );
        if http != "—" {
            let want = holdfast::error::http_status_of(code).to_string();
            assert_eq!(http, want, "HTTP status of {code} in docs/errors.md");
        }
    }
}
