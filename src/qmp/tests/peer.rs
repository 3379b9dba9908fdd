//! (h) A fake QMP peer and a fake guest agent (tokio unix listeners): garbage, early close,
//! silence, out-of-order replies, stale agent replies. Plus QMP error replies from real QEMU.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::harness::{qsd, T};
use crate::qmp::{Agent, Client, FreezeStatus, QmpError};

const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\r\n";
const SHORT: Duration = Duration::from_secs(2);

/// A listener on a temp socket; `script` runs on the first accepted connection.
async fn fake<F, Fut>(script: F) -> (tempfile::TempDir, PathBuf)
where
    F: FnOnce(BufReader<UnixStream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        if let Ok((s, _)) = listener.accept().await {
            script(BufReader::new(s)).await;
        }
    });
    (dir, path)
}

async fn line(s: &mut BufReader<UnixStream>) -> Value {
    let mut l = String::new();
    s.read_line(&mut l).await.expect("read");
    serde_json::from_str(&l).unwrap_or(Value::Null)
}

/// Greeting, then answer `qmp_capabilities`.
async fn negotiate(s: &mut BufReader<UnixStream>) {
    s.get_mut().write_all(GREETING).await.expect("greet");
    let caps = line(s).await;
    let reply = json!({"return": {}, "id": caps["id"]}).to_string() + "\r\n";
    s.get_mut().write_all(reply.as_bytes()).await.expect("caps");
}

#[tokio::test]
async fn qmp_garbage_from_peer_is_an_error() {
    let (_d, path) = fake(|mut s| async move {
        negotiate(&mut s).await;
        let _ = line(&mut s).await;
        let _ = s.get_mut().write_all(b"this is not json\r\n").await;
        tokio::time::sleep(SHORT).await;
    })
    .await;
    let c = Client::connect(&path, SHORT).await.expect("connect");
    let e = c.execute("query-status", Value::Null).await.unwrap_err();
    assert!(
        matches!(e, QmpError::Disconnected(ref m) if m.contains("not JSON")),
        "{e}"
    );
    let again = c.execute("query-status", Value::Null).await.unwrap_err();
    assert!(matches!(again, QmpError::Disconnected(_)), "{again}");
}

#[tokio::test]
async fn qmp_peer_closing_mid_reply_is_an_error() {
    let (_d, path) = fake(|mut s| async move {
        negotiate(&mut s).await;
        let _ = line(&mut s).await;
        let _ = s.get_mut().write_all(b"{\"return\": {\"stat").await;
    })
    .await;
    let c = Client::connect(&path, SHORT).await.expect("connect");
    let e = c.execute("query-status", Value::Null).await.unwrap_err();
    assert!(
        matches!(e, QmpError::Disconnected(ref m) if m.contains("middle")),
        "{e}"
    );
}

#[tokio::test]
async fn qmp_silent_peer_times_out() {
    // No greeting at all.
    let (_d, path) =
        fake(|_s| async move { tokio::time::sleep(Duration::from_secs(5)).await }).await;
    let t0 = Instant::now();
    let e = Client::connect(&path, Duration::from_millis(500))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(e, QmpError::Handshake { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    // Greeting, then no reply to a command.
    let (_d2, path) = fake(|mut s| async move {
        negotiate(&mut s).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let c = Client::connect(&path, SHORT).await.expect("connect");
    let t0 = Instant::now();
    let e = c
        .execute_timeout("query-status", Value::Null, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("query-status"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn qmp_wrong_peers_and_missing_socket() {
    let e = Client::connect("/nonexistent/holdfast-qmp.sock", SHORT)
        .await
        .err()
        .expect("fails");
    let msg = e.to_string();
    assert!(
        msg.contains("/nonexistent/holdfast-qmp.sock") && msg.contains("is the VM running"),
        "{msg}"
    );
    // A peer whose first line is not a greeting (e.g. a guest-agent socket answering junk).
    let (_d, path) = fake(|mut s| async move {
        let _ = s.get_mut().write_all(b"{\"return\": 5}\n").await;
    })
    .await;
    let e = Client::connect(&path, SHORT).await.err().expect("fails");
    assert!(matches!(e, QmpError::Handshake { .. }), "{e}");
    // A reply without an id ends the connection.
    let (_d, path) = fake(|mut s| async move {
        negotiate(&mut s).await;
        let _ = line(&mut s).await;
        let _ = s.get_mut().write_all(b"{\"return\": {}}\r\n").await;
        tokio::time::sleep(SHORT).await;
    })
    .await;
    let c = Client::connect(&path, SHORT).await.expect("connect");
    let e = c.execute("x", Value::Null).await.unwrap_err();
    assert!(
        matches!(e, QmpError::Disconnected(ref m) if m.contains("without a valid id")),
        "{e}"
    );
}

#[tokio::test]
async fn qmp_events_before_the_greeting_are_skipped_but_bounded() {
    // QEMU 10 has been seen sending RESUME on a fresh connection before its greeting.
    const RESUME: &[u8] =
        b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"RESUME\"}\r\n";
    let (_d, path) = fake(|mut s| async move {
        let _ = s.get_mut().write_all(RESUME).await;
        negotiate(&mut s).await;
        let q = line(&mut s).await;
        let reply = json!({"return": {"running": true}, "id": q["id"]}).to_string() + "\r\n";
        let _ = s.get_mut().write_all(reply.as_bytes()).await;
        tokio::time::sleep(SHORT).await;
    })
    .await;
    let c = Client::connect(&path, SHORT)
        .await
        .expect("an event before the greeting is skipped");
    let r = c
        .execute("query-status", Value::Null)
        .await
        .expect("usable");
    assert_eq!(r["running"], true);
    // Events without end and no greeting: refused, not read forever.
    let (_d, path) = fake(|mut s| async move {
        for _ in 0..100 {
            if s.get_mut().write_all(RESUME).await.is_err() {
                break;
            }
        }
        tokio::time::sleep(SHORT).await;
    })
    .await;
    let e = Client::connect(&path, SHORT).await.err().expect("fails");
    assert!(
        matches!(e, QmpError::Handshake { ref reason, .. } if reason.contains("no greeting")),
        "{e}"
    );
}

#[tokio::test]
async fn qmp_concurrent_commands_get_their_own_replies() {
    let (_d, path) = fake(|mut s| async move {
        negotiate(&mut s).await;
        let a = line(&mut s).await;
        let b = line(&mut s).await;
        // Reply in reverse order, with an event in between.
        let ev = "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n";
        let out = format!(
            "{}\r\n{ev}{}\r\n",
            json!({"return": b["execute"], "id": b["id"]}),
            json!({"error": {"class": "GenericError", "desc": "nope"}, "id": a["id"]})
        );
        let _ = s.get_mut().write_all(out.as_bytes()).await;
        tokio::time::sleep(SHORT).await;
    })
    .await;
    let c = Client::connect(&path, SHORT).await.expect("connect");
    let mark = c.event_mark();
    let mut sub = c.subscribe();
    let (ra, rb) = tokio::join!(c.execute("cmd-a", Value::Null), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.execute("cmd-b", Value::Null).await
    });
    assert_eq!(rb.expect("b"), json!("cmd-b"));
    let e = ra.unwrap_err();
    assert_eq!(e.class(), Some("GenericError"));
    assert!(
        e.to_string().contains("cmd-a") && e.to_string().contains("nope"),
        "{e}"
    );
    let ev = c
        .wait_event(mark, SHORT, |e| e.name == "STOP")
        .await
        .expect("event kept");
    assert_eq!(ev.timestamp, (1, 2));
    let got = tokio::time::timeout(SHORT, sub.recv())
        .await
        .expect("in time")
        .expect("event");
    assert_eq!((got.name.as_str(), got.seq), ("STOP", ev.seq));
}

#[tokio::test]
async fn qmp_error_replies_from_real_qemu() {
    let q = qsd(1, 16).await;
    let e = q
        .client
        .execute("no-such-command", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(e.class(), Some("CommandNotFound"), "{e}");
    let e = q
        .client
        .execute("blockdev-del", json!({"node-name": "nope"}))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("blockdev-del") && e.class().is_some(),
        "{e}"
    );
    let e = q
        .client
        .wait_job("holdfast-nojob", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::NotFound(_)), "{e}");
    // Still usable afterwards, and the version came from the greeting.
    q.client
        .execute("query-jobs", Value::Null)
        .await
        .expect("usable");
    assert!(q.client.version().major >= 10, "{}", q.client.version());
    let t = q
        .client
        .execute_timeout("query-version", Value::Null, T)
        .await
        .expect("version");
    assert!(t["qemu"]["major"].as_u64().is_some());
}

/// A fake guest agent on a temp socket: answers `guest-sync-delimited` after stale replies,
/// ping and fsfreeze; logs every other command it receives.
pub(super) async fn fake_agent() -> (tempfile::TempDir, PathBuf, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    let (dir, path) = fake(|mut s| async move {
        let mut frozen = false;
        loop {
            let mut l = Vec::new();
            if s.read_until(b'\n', &mut l).await.unwrap_or(0) == 0 {
                return;
            }
            let text: Vec<u8> = l.into_iter().filter(|&b| b != 0xff).collect();
            let v: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
            let cmd = v["execute"].as_str().unwrap_or("").to_string();
            if cmd != "guest-sync-delimited" {
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(cmd.clone());
            }
            let reply = match cmd.as_str() {
                "guest-sync-delimited" => {
                    // A stale reply of an old command, then the delimited answer.
                    let mut out = vec![0xff];
                    out.extend_from_slice(b"{\"return\": 12345}\n{\"return\": {}}\n");
                    out.push(0xff);
                    out.extend_from_slice(
                        format!("{}\n", json!({"return": v["arguments"]["id"]})).as_bytes(),
                    );
                    out
                }
                "guest-ping" => b"{\"return\": {}}\n".to_vec(),
                "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => {
                    frozen = cmd == "guest-fsfreeze-freeze";
                    b"{\"return\": 2}\n".to_vec()
                }
                "guest-fsfreeze-status" => format!(
                    "{{\"return\": \"{}\"}}\n",
                    if frozen { "frozen" } else { "thawed" }
                )
                .into_bytes(),
                _ => b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no\"}}\n".to_vec(),
            };
            if s.get_mut().write_all(&reply).await.is_err() {
                return;
            }
        }
    })
    .await;
    (dir, path, log)
}

#[tokio::test]
async fn agent_resyncs_past_stale_replies() {
    let (_d, path, _log) = fake_agent().await;
    let a = Agent::new(&path, SHORT);
    a.ping().await.expect("ping");
    assert_eq!(a.fsfreeze_freeze().await.expect("freeze"), 2);
    assert_eq!(
        a.fsfreeze_status().await.expect("status"),
        FreezeStatus::Frozen
    );
    assert_eq!(a.fsfreeze_thaw().await.expect("thaw"), 2);
    assert_eq!(
        a.fsfreeze_status().await.expect("status"),
        FreezeStatus::Thawed
    );
    let e = a.execute("guest-bogus", Value::Null).await.unwrap_err();
    assert!(
        matches!(e, QmpError::AgentCommand { ref class, .. } if class == "CommandNotFound"),
        "{e}"
    );
    let e = Agent::new("/nonexistent/qga.sock", SHORT)
        .ping()
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::AgentConnect { .. }), "{e}");
}
