//! Hostile clients against `holdfast serve`: malformed, oversize and ill-fitting bodies, path
//! traversal in restore targets, header floods, clients that trickle bytes or never speak.
//! Each gets its status; the service keeps serving everyone else meanwhile, and nothing is
//! half-written. Every client here is bounded in count and time, on loopback.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;

use common::service::{self, Service};
use common::Repo;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn addr(s: &Service) -> String {
    s.url.trim_start_matches("http://").to_string()
}

/// A raw request; the status line's code (0 when the server closed without one).
fn raw_status(s: &Service, request: &[u8]) -> u16 {
    let mut c = TcpStream::connect(addr(s)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(request);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn hostile_requests_get_their_status_and_the_service_keeps_serving() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    service::image(&img, 2, 11);
    let id = repo.backup("web", &[("root", &img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let restores = repo.tmp("restores");
    std::fs::create_dir(&restores).unwrap();
    let outside = repo.tmp("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, restores.join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.join("x.img"), restores.join("link.img")).unwrap();
    service::configure(
        &repo,
        &format!("restore_dirs = [{:?}]\n", restores.to_str().unwrap()),
    );
    let admin = service::user(&repo, "admin", "admin", &[]);
    let s = Service::start(&repo);
    let users_before = std::fs::read(repo.path().join("users.toml")).unwrap();

    // Clients that hold connections open: 40 that never send a byte, 20 that trickle a
    // header line forever (slowloris). They must not stop anyone else.
    let start = Instant::now();
    let mut idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(addr(&s)).unwrap())
        .collect();
    let slow: Vec<_> = (0..20)
        .map(|i| {
            let a = addr(&s);
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(a).unwrap();
                c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                let _ = c.write_all(b"GET /api/v1/vms HTTP/1.1\r\nHost: x\r\n");
                let t = Instant::now();
                // One header byte every 300 ms until the server hangs up (at most 30 s).
                while t.elapsed() < Duration::from_secs(30) {
                    if c.write_all(format!("X-{i}: a\r\n").as_bytes()).is_err() {
                        return t.elapsed();
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                panic!("a slowloris client was held for 30 s");
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let path = format!("/api/v1/vms/web/backups/{id}/restore");
    let post = |body: &str| s.raw("POST", &path, &admin, Some(body), &[]);
    // Malformed JSON: 400 usage; a wrong type or unknown field: 422 invalid-body.
    for bad in ["{", "not json", "{\"to\": }", "[1,2"] {
        let r = post(bad);
        assert_eq!(
            (r.status, r.code()),
            (400, "usage"),
            "{bad:?}: {:?}",
            r.body
        );
    }
    for bad in [
        r#"{"to": 5}"#,
        r#"{"to": "/x", "evil": true}"#,
        r#"{"disk": "root"}"#,
        "[]",
    ] {
        let r = post(bad);
        assert_eq!(
            (r.status, r.code()),
            (422, "invalid-body"),
            "{bad:?}: {:?}",
            r.body
        );
    }
    // Bodies over 1 MiB: 413, with or without a Content-Length that says so.
    let big = format!("{{\"to\": \"{}\"}}", "a".repeat(2 << 20));
    let r = post(&big);
    assert_eq!((r.status, r.code()), (413, "too-large"), "{:?}", r.body);
    let r = s.raw(
        "POST",
        "/api/v1/users",
        &admin,
        Some(&format!(
            "{{\"name\":\"x\",\"role\":\"viewer\",\"password\":\"{}\"}}",
            "p".repeat(1_100_000)
        )),
        &[],
    );
    assert_eq!(r.status, 413);
    // Restore targets outside the restore directories, by any road: refused, nothing written.
    let cases = [
        (
            format!("{}/../outside/x.img", restores.display()),
            403,
            "forbidden",
        ),
        (
            format!("{}/escape/x.img", restores.display()),
            403,
            "forbidden",
        ),
        (format!("{}/link.img", restores.display()), 403, "forbidden"),
        ("/etc/passwd".to_string(), 403, "forbidden"),
        ("../../etc/passwd".to_string(), 400, "usage"),
        (format!("{}/..", restores.display()), 400, "usage"),
        (format!("{}/.hidden", restores.display()), 400, "usage"),
        (
            format!("{}/nodir/x.img", restores.display()),
            404,
            "not-found",
        ),
        (format!("{}/a\u{0}b", restores.display()), 400, "usage"),
    ];
    for (to, status, code) in &cases {
        let r = s.post(&path, &admin, json!({"to": to}));
        assert_eq!(
            (r.status, r.code()),
            (*status, *code),
            "{to:?}: {:?}",
            r.body
        );
    }
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
    assert!(std::fs::read("/etc/passwd").unwrap().starts_with(b"root:"));
    // Invalid names in paths: the CLI's one-line message.
    let r = s.get("/api/v1/vms/..%2Fetc/backups", &admin);
    assert_eq!((r.status, r.code()), (400, "invalid-name"), "{:?}", r.body);
    let cli = repo.run(&["backups", "../etc"]);
    assert_eq!(
        r.body["error"]["message"].as_str().unwrap(),
        cli.err().trim_start_matches("holdfast: error: ")
    );
    // Header floods: 431, the connection closed.
    let mut flood = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        flood.extend_from_slice(format!("X-Flood-{i}: {}\r\n", "v".repeat(64)).as_bytes());
    }
    flood.extend_from_slice(b"\r\n");
    assert_eq!(raw_status(&s, &flood), 431);
    let mut many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(raw_status(&s, &many), 431);
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
    assert_eq!(raw_status(&s, long_line.as_bytes()), 414);
    assert_eq!(raw_status(&s, b"BLAH\r\n\r\n"), 400);

    // Meanwhile everyone else is served, quickly.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(s.get("/api/v1/vms", &admin).status, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    // The slow and the silent are cut off by the header timeout (10 s), not kept.
    for h in slow {
        let held = h.join().unwrap();
        assert!(held < Duration::from_secs(15), "held {held:?}");
    }
    for c in &mut idle {
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 64];
        // Closed by the server: EOF (maybe after a 408 reply), not a read timeout.
        let r = c.read(&mut b);
        assert!(
            r.is_ok() || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(25));
    assert_eq!(s.get("/healthz", "").status, 200);
    assert_eq!(
        std::fs::read(repo.path().join("users.toml")).unwrap(),
        users_before,
        "no user was half-added"
    );
    assert_eq!(
        s.get("/api/v1/users", &admin)
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
