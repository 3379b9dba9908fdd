//! Load on `holdfast serve` while backups run, for `scripts/bench-service` (a benchmark, not a
//! test): start one backup per `--disk VM=PATH` through the API, then — with `--clients N` —
//! N clients poll the tasks (each one request every `--interval-ms`, answered or not) and one
//! client follows the first task's event stream, until every backup has ended. Prints one JSON
//! line: the backups' own durations (from their task records) and the pollers' latencies.
//!
//!   api_load --url http://127.0.0.1:PORT --token-file F --disk a=/a.img --disk b=/b.img \
//!            [--clients 50] [--interval-ms 100]
#![allow(clippy::unwrap_used)] // a benchmark tool: a failed step should stop it loudly

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    url: String,
    token: String,
    disks: Vec<(String, String)>,
    clients: usize,
    interval: Duration,
}

fn args() -> Args {
    let mut a = Args {
        url: String::new(),
        token: String::new(),
        disks: Vec::new(),
        clients: 0,
        interval: Duration::from_millis(100),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| fail(&format!("{k} needs a value")));
        match k.as_str() {
            "--url" => a.url = v,
            "--token-file" => {
                a.token = std::fs::read_to_string(&v)
                    .unwrap_or_else(|e| fail(&format!("{v}: {e}")))
                    .trim()
                    .to_string()
            }
            "--disk" => {
                let (vm, path) = v
                    .split_once('=')
                    .unwrap_or_else(|| fail("--disk wants VM=PATH"));
                a.disks.push((vm.to_string(), path.to_string()));
            }
            "--clients" => a.clients = v.parse().unwrap_or_else(|_| fail("--clients: a number")),
            "--interval-ms" => {
                a.interval =
                    Duration::from_millis(v.parse().unwrap_or_else(|_| fail("--interval-ms")))
            }
            _ => fail(&format!("unknown argument {k}")),
        }
    }
    if a.url.is_empty() || a.token.is_empty() || a.disks.is_empty() {
        fail("usage: api_load --url URL --token-file FILE --disk VM=PATH... [--clients N]");
    }
    a
}

fn fail(msg: &str) -> ! {
    eprintln!("api_load: {msg}");
    std::process::exit(2)
}

fn new_agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

fn get(agent: &ureq::Agent, a: &Args, path: &str) -> Result<serde_json::Value, String> {
    agent
        .get(&format!("{}/api/v1{path}", a.url))
        .set("Authorization", &format!("Bearer {}", a.token))
        .call()
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())
}

fn ended(task: &serde_json::Value) -> bool {
    !matches!(task["state"].as_str(), Some("queued" | "running"))
}

fn main() {
    let a = Arc::new(args());
    let agent = new_agent();
    let mut tasks = Vec::new();
    for (vm, path) in &a.disks {
        let reply: serde_json::Value = agent
            .post(&format!("{}/api/v1/vms/{vm}/backups", a.url))
            .set("Authorization", &format!("Bearer {}", a.token))
            .send_json(serde_json::json!({ "disks": { "root": path } }))
            .unwrap_or_else(|e| fail(&format!("backup of {vm}: {e}")))
            .into_json()
            .unwrap_or_else(|e| fail(&format!("backup of {vm}: {e}")));
        let id = reply["task"].as_str().unwrap_or_else(|| fail("no task id"));
        tasks.push(id.to_string());
    }
    let tasks = Arc::new(tasks);
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for n in 0..a.clients {
        let (a, tasks, stop, latencies, errors) = (
            a.clone(),
            tasks.clone(),
            stop.clone(),
            latencies.clone(),
            errors.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let agent = new_agent();
            let mut mine = Vec::new();
            // Spread the clients over the interval, as independent pollers would be.
            std::thread::sleep(a.interval * n as u32 / a.clients as u32);
            let mut next = Instant::now();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                match get(
                    &agent,
                    &a,
                    &format!("/tasks/{}", tasks[(n + i) % tasks.len()]),
                ) {
                    Ok(_) => mine.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                next += a.interval;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            latencies.lock().unwrap().extend(mine);
        }));
    }
    let events = Arc::new(AtomicU64::new(0));
    if a.clients > 0 {
        let (a, tasks, events) = (a.clone(), tasks.clone(), events.clone());
        threads.push(std::thread::spawn(move || {
            let r = new_agent()
                .get(&format!("{}/api/v1/tasks/{}/events", a.url, tasks[0]))
                .set("Authorization", &format!("Bearer {}", a.token))
                .call();
            if let Ok(r) = r {
                for line in BufReader::new(r.into_reader()).lines() {
                    let Ok(line) = line else { break };
                    if line.starts_with("event:") {
                        events.fetch_add(1, Ordering::Relaxed);
                    }
                    if line == "event: end" {
                        break;
                    }
                }
            }
        }));
    }
    // Wait for the backups (bounded: an hour), polling once a second on a connection of its own.
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut records = Vec::new();
    for id in tasks.iter() {
        loop {
            match get(&agent, &a, &format!("/tasks/{id}")) {
                Ok(t) if ended(&t) => {
                    records.push(t);
                    break;
                }
                _ if Instant::now() > deadline => fail("backups did not end within an hour"),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let mut l = latencies.lock().unwrap().clone();
    l.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() - 1) as f64 * p).round() as usize]
        }
    };
    let backups: Vec<_> = records
        .iter()
        .map(|t| {
            let secs = (t["ended_ms"].as_u64().unwrap_or(0) - t["started_ms"].as_u64().unwrap_or(0))
                as f64
                / 1e3;
            serde_json::json!({"vm": t["vms"][0], "state": t["state"], "seconds": secs})
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "clients": a.clients,
            "requests": l.len(),
            "errors": errors.load(Ordering::Relaxed),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": l.last().copied().unwrap_or(0.0),
            "sse_events": events.load(Ordering::Relaxed),
            "backups": backups,
        })
    );
}
