//! A webhook receiver on loopback for the notification tests: a small HTTP/1.1 server that
//! records each POST (headers and body) while it is up and answers 503 while it is down.
//! Its thread ends when the receiver is dropped.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Delivery {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

pub struct Hook {
    pub url: String,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    pub got: Arc<Mutex<Vec<Delivery>>>,
    /// Requests answered 503 while down.
    pub refused: Arc<AtomicU64>,
}

impl Hook {
    pub fn start() -> Hook {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let h = Hook {
            url,
            up: Arc::new(AtomicBool::new(true)),
            stop: Arc::new(AtomicBool::new(false)),
            got: Arc::new(Mutex::new(Vec::new())),
            refused: Arc::new(AtomicU64::new(0)),
        };
        let (up, stop, got, refused) = (
            h.up.clone(),
            h.stop.clone(),
            h.got.clone(),
            h.refused.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut headers = Vec::new();
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.trim_end().split_once(':') {
                        headers.push((k.trim().to_string(), v.trim().to_string()));
                    }
                }
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len.min(1 << 20)];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                let mut c = c;
                let status = if up.load(Ordering::Relaxed) {
                    got.lock().unwrap().push(Delivery { headers, body });
                    "200 OK"
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    "503 Service Unavailable"
                };
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        h
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Wait until `pred` holds for what was received (at most `limit`).
    pub fn wait(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&[Delivery]) -> bool,
    ) -> Vec<Delivery> {
        let t = Instant::now();
        loop {
            let d = self.deliveries();
            if pred(&d) {
                return d;
            }
            assert!(
                t.elapsed() < limit,
                "webhook: {what} did not happen within {limit:?}; got {:?}",
                d.iter()
                    .map(|x| x.json()["event"].clone())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
