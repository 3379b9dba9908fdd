//! A real S3 server for tests (s3s-fs on 127.0.0.1, file-backed), and a fault-injecting HTTP
//! proxy that sits between holdfast and it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const KEY: &str = "holdfast-test";
pub const SECRET: &str = "holdfast-test-secret";
pub const BUCKET: &str = "bkt";

/// Environment for every holdfast run against the test server: its credentials, and nothing
/// that could reach beyond loopback (no instance-metadata probe, no profile files).
pub fn env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", "/nonexistent/holdfast-test".into()),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/holdfast-test".into(),
        ),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

/// Put the test credentials into this process's environment (for in-process S3 clients).
pub fn set_env() {
    for (k, v) in env() {
        // SAFETY: set before any client exists; tests that call this set the same values.
        unsafe { std::env::set_var(k, v) };
    }
}

/// s3s-fs serving `dir` on 127.0.0.1:port, with bucket `bkt`.
pub struct S3Server {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl S3Server {
    pub fn start() -> S3Server {
        super::require_cargo_tool(
            "s3s-fs",
            "cargo install --locked s3s-fs@0.14.1 --features binary",
        );
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let mut s = S3Server {
                dir,
                port: free_port(),
                child: None,
            };
            std::fs::create_dir_all(s.data().join(BUCKET)).unwrap();
            if s.spawn() {
                return s;
            }
        }
        panic!("s3s-fs did not start on a free port in 5 tries");
    }

    /// Start (again) on the same port and directory; false if it did not come up.
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.path().join("s3s-fs.log")).unwrap();
        let child = Command::new("s3s-fs")
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                KEY,
                "--secret-key",
                SECRET,
            ])
            .arg(self.data())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after stop");
        assert!(
            self.spawn(),
            "s3s-fs did not come back on port {}",
            self.port
        );
    }

    /// Stop the server (by its PID) and wait until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The directory s3s-fs serves; the bucket is `data()/bkt`.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Object keys under `prefix` in the bucket (walking s3s-fs's files).
    pub fn objects(&self, prefix: &str) -> Vec<String> {
        let root = self.data().join(BUCKET);
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let k = p.strip_prefix(&root).unwrap().to_string_lossy().to_string();
                    if k.starts_with(prefix) {
                        out.push(k);
                    }
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the proxy does to a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Forward it, then answer 503 SlowDown instead of the real answer (the write landed).
    Error,
    /// Never answer (the client's attempt timeout fires).
    Hang,
    /// Forward it and send only half of the response body, then close.
    Truncate,
}

/// An HTTP proxy on 127.0.0.1 in front of an S3 server that spoils every third request, cycling
/// through errors, hangs and truncated bodies; never two attempts of one request in a row
/// while requests come one at a time.
pub struct FaultProxy {
    pub port: u16,
    pub faults: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    hang: Duration,
}

impl FaultProxy {
    /// `hang`: how long a hung request is held (longer than the client's attempt timeout).
    pub fn start(upstream: u16, hang: Duration) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (faults, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let seq = Arc::new(AtomicU64::new(0));
        {
            let (faults, stop) = (faults.clone(), stop.clone());
            l.set_nonblocking(true).unwrap();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((c, _)) => {
                            c.set_nonblocking(false).unwrap();
                            let (faults, seq, stop) = (faults.clone(), seq.clone(), stop.clone());
                            std::thread::spawn(move || {
                                serve(c, upstream, &seq, &faults, &stop, hang)
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        FaultProxy {
            port,
            faults,
            stop,
            hang,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pick(n: u64) -> Option<Fault> {
    (n % 3 == 1).then(|| [Fault::Error, Fault::Hang, Fault::Truncate][(n / 3 % 3) as usize])
}

/// One client connection: one request (answered with "Connection: close"), on a fresh
/// upstream connection.
fn serve(
    c: TcpStream,
    upstream: u16,
    seq: &AtomicU64,
    faults: &AtomicU64,
    stop: &AtomicBool,
    hang: Duration,
) {
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut w = c;
    {
        let Some((head, body)) = read_request(&mut r, &mut w) else {
            return;
        };
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let first = head.lines().next().unwrap_or("").to_string();
        let mut fault = pick(n);
        if fault == Some(Fault::Truncate)
            && !(first.starts_with("GET ") && first.contains("x-id=GetObject"))
        {
            fault = Some(Fault::Error); // only object bodies are cut; other requests get a 503
        }
        if fault == Some(Fault::Hang) {
            faults.fetch_add(1, Ordering::Relaxed);
            let until = Instant::now() + hang;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = w.shutdown(Shutdown::Both);
            return;
        }
        let Some(resp) = forward(upstream, &head, &body) else {
            return;
        };
        match fault {
            Some(Fault::Error) => {
                faults.fetch_add(1, Ordering::Relaxed);
                let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>injected by the test proxy</Message></Error>";
                let _ = write!(w, "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}", xml.len());
                let _ = w.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::Truncate) => {
                let split = find(&resp, b"\r\n\r\n")
                    .map(|i| i + 4)
                    .unwrap_or(resp.len());
                let body_len = resp.len() - split;
                if body_len >= 2 {
                    faults.fetch_add(1, Ordering::Relaxed);
                    let _ = w.write_all(&resp[..split + body_len / 2]);
                    let _ = w.shutdown(Shutdown::Both);
                    return;
                }
                let _ = w.write_all(&resp);
            }
            _ => {
                if w.write_all(&resp).is_err() {
                    return;
                }
            }
        }
        // Upstream answered "Connection: close"; so do we.
        let _ = w.shutdown(Shutdown::Both);
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Read one request head and its Content-Length body (answering `Expect: 100-continue`).
fn read_request(r: &mut BufReader<TcpStream>, w: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let mut len = 0usize;
    let mut expect = false;
    for l in head.lines() {
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        if lower.starts_with("transfer-encoding:") {
            panic!("the test proxy does not handle chunked request bodies: {head}");
        }
        if lower.starts_with("expect:") && lower.contains("100-continue") {
            expect = true;
        }
    }
    if expect {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").ok()?;
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// Send the request upstream on its own connection and return the whole final response.
fn forward(upstream: u16, head: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut u = TcpStream::connect(("127.0.0.1", upstream)).ok()?;
    let mut out = String::new();
    for l in head.lines() {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("expect:") {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    u.write_all(out.as_bytes()).ok()?;
    u.write_all(body).ok()?;
    let mut resp = Vec::new();
    u.read_to_end(&mut resp).ok()?;
    // Drop interim 1xx responses.
    while resp.starts_with(b"HTTP/1.1 1") {
        let end = find(&resp, b"\r\n\r\n")? + 4;
        resp.drain(..end);
    }
    Some(resp)
}

/// A path inside `dir` as a string.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
