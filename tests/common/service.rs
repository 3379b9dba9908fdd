//! `holdfast serve` for the tests: the real binary on a loopback port the kernel picks, a real
//! HTTP client (ureq), users made with the real CLI. Stopped with SIGTERM (then SIGKILL, by
//! PID) when dropped.
#![allow(dead_code)]

use super::Repo;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub struct Service {
    child: Option<Child>,
    pub url: String,
    pub socket: PathBuf,
    pub agent: ureq::Agent,
    /// What it printed when it was ready (url, socket, fingerprint, ...).
    pub ready: Value,
    /// What the service printed on stderr, gathered by a thread.
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

/// A reply: status and body (JSON when it parses, else the text as a JSON string).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    /// The error code of an error reply ("" for none).
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Write `[service]` settings into the repository's config (before starting the service).
pub fn configure(repo: &Repo, toml: &str) {
    let path = repo.path().join("vms.toml");
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    text.push_str("\n[service]\n");
    text.push_str(toml);
    std::fs::write(&path, text).unwrap();
}

/// Add a user with the CLI; returns a bearer token of theirs.
pub fn user(repo: &Repo, name: &str, role: &str, vms: &[&str]) -> String {
    let mut args = vec!["user", "add", name, "--role", role];
    for v in vms {
        args.extend(["--vm", v]);
    }
    let mut c = repo.cmd(&args);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    writeln!(child.stdin.take().unwrap(), "password-of-{name}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    token(repo, name, "main", &[])
}

/// A token of `user` made with the CLI (`extra`: --role, --vm, --expires).
pub fn token(repo: &Repo, user: &str, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "add", user, name];
    args.extend_from_slice(extra);
    repo.run(&args).ok().stdout.trim().to_string()
}

impl Service {
    pub fn start(repo: &Repo) -> Service {
        Service::start_with(repo, &[], &[])
    }

    /// Start `holdfast serve` with extra arguments and environment; wait until it listens.
    pub fn start_with(repo: &Repo, args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut a = vec!["--json", "serve", "--listen", "127.0.0.1:0"];
        a.extend_from_slice(args);
        let mut c = repo.cmd(&a);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        {
            let mut e = child.stderr.take().unwrap();
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = e.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = out.read_to_string(&mut rest);
        });
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "serve did not start ({e}): {line} {}",
                stderr.lock().unwrap()
            )
        });
        Service {
            child: Some(child),
            url: ready["url"].as_str().unwrap().to_string(),
            socket: PathBuf::from(ready["socket"].as_str().unwrap()),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
            stderr,
            ready,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// `METHOD PATH` (under the service's URL) as `token` (empty: none), with a JSON body.
    pub fn call(&self, method: &str, path: &str, token: &str, body: Option<&Value>) -> Reply {
        let text = body.map(|b| b.to_string());
        self.raw(method, path, token, text.as_deref(), &[])
    }

    pub fn get(&self, path: &str, token: &str) -> Reply {
        self.call("GET", path, token, None)
    }

    pub fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.call("POST", path, token, Some(&body))
    }

    /// A request with a raw body and extra headers.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut r = self.agent.request(method, &format!("{}{path}", self.url));
        if !token.is_empty() {
            r = r.set("Authorization", &format!("Bearer {token}"));
        }
        for (k, v) in headers {
            r = r.set(k, v);
        }
        let res = match body {
            Some(b) => r.set("Content-Type", "application/json").send_string(b),
            None => r.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .filter_map(|h| resp.header(&h).map(|v| (h.clone(), v.to_string())))
            .collect();
        let text = resp.into_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            body,
            headers,
        }
    }

    /// Wait until task `id` ends (at most `limit`); its record.
    pub fn wait_task(&self, id: &str, token: &str, limit: Duration) -> Value {
        let t = Instant::now();
        loop {
            let r = self.get(&format!("/api/v1/tasks/{id}"), token);
            assert_eq!(r.status, 200, "{:?}", r.body);
            let st = r.body["state"].as_str().unwrap_or("").to_string();
            if st != "running" && st != "queued" {
                return r.body;
            }
            assert!(t.elapsed() < limit, "task {id} still {st} after {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait for the exit (at most `limit`); the exit code.
    pub fn stop(&mut self, limit: Duration) -> Option<i32> {
        super::signal(self.child.as_ref()?.id(), libc::SIGTERM);
        self.wait_exit(limit)
    }

    /// SIGKILL: the service dies with no chance to clean up (as in a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait for the service to exit (at most `limit`, then kill it and fail); the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve did not stop within {limit:?}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::signal(child.id(), libc::SIGTERM);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(20) {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 request over a unix socket, `Connection: close`; (status, body).
pub fn unix_request(socket: &Path, method: &str, path: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Read server-sent events from `GET path` until `until` says stop or the stream ends;
/// (id, event, data) each.
pub fn sse(
    url: &str,
    path: &str,
    token: &str,
    last_event_id: Option<&str>,
    mut until: impl FnMut(&str, &str, &Value) -> bool,
) -> Vec<(String, String, Value)> {
    let agent = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(60))
        .build();
    let mut r = agent
        .get(&format!("{url}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .set("Accept", "text/event-stream");
    if let Some(id) = last_event_id {
        r = r.set("Last-Event-ID", id);
    }
    let resp = r.call().unwrap();
    assert_eq!(resp.content_type(), "text/event-stream");
    let mut reader = BufReader::new(resp.into_reader());
    let mut out = Vec::new();
    let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return out;
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if !data.is_empty() || !event.is_empty() {
                let v: Value = serde_json::from_str(&data).unwrap_or(Value::String(data.clone()));
                let stop = until(&id, &event, &v);
                out.push((id.clone(), event.clone(), v));
                if stop {
                    return out;
                }
            }
            id.clear();
            event.clear();
            data.clear();
        } else if let Some(v) = l.strip_prefix("id:") {
            id = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
}

/// A raw disk image of `mib` MiB of pseudo-random bytes (from `seed`): it neither compresses
/// nor dedups, so backups of it do real work.
pub fn image(path: &Path, mib: usize, seed: u64) {
    let mut x = seed | 1;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}
