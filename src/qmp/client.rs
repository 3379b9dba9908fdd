//! Async QMP client over a unix socket.
//!
//! Invariants:
//! - Each command gets a fresh numeric `id` and is registered in `pending` before its bytes are
//!   written; one reader task owns the read half and completes commands by `id`, so commands
//!   from many tasks may be in flight at once.
//! - Events get a sequence number, are kept in a bounded ring (`EVENT_RING`) for waiters, and are
//!   broadcast to subscribers (a slow subscriber lags; it never blocks the reader).
//! - A reply with an unknown `id` (its command timed out) is dropped; a reply without `id`, a
//!   line that is not QMP, a line over `proto::MAX_LINE` or EOF ends the connection, fails every
//!   pending command and every later one with `QmpError::Disconnected`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, Mutex, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::proto::{self, Event, Message, QemuVersion};
use super::{QmpError, Result};

/// Events kept for `wait_event` / `events_since`.
const EVENT_RING: usize = 4096;

type Reply = std::result::Result<Value, (String, String)>;

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    closed: Option<String>,
    events: VecDeque<Event>,
    last_seq: u64,
}

struct Shared {
    state: StdMutex<State>,
    writer: Mutex<OwnedWriteHalf>,
    next_id: AtomicU64,
    notify: Notify,
    events_tx: broadcast::Sender<Event>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A negotiated QMP connection. Methods take `&self`; share it in an `Arc` to issue commands from
/// many tasks.
pub struct Client {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    path: PathBuf,
    timeout: Duration,
    version: QemuVersion,
}

impl Client {
    /// Connect to QEMU's `-qmp unix:PATH,server=on` socket, read the greeting and negotiate
    /// `qmp_capabilities`. `timeout` bounds the handshake and is the default for every command.
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Client> {
        let path = path.as_ref().to_path_buf();
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(&path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(QmpError::Connect { path, source }),
            Err(_) => {
                let source = std::io::Error::from(std::io::ErrorKind::TimedOut);
                return Err(QmpError::Connect { path, source });
            }
        };
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let version = read_greeting(&mut rd, &path, timeout).await?;
        let (events_tx, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            state: StdMutex::new(State::default()),
            writer: Mutex::new(wr),
            next_id: AtomicU64::new(1),
            notify: Notify::new(),
            events_tx,
        });
        let reader = tokio::spawn(reader_task(shared.clone(), rd));
        let client = Client {
            shared,
            reader,
            path,
            timeout,
            version,
        };
        client
            .execute("qmp_capabilities", Value::Null)
            .await
            .map_err(|e| QmpError::Handshake {
                path: client.path.clone(),
                reason: format!("qmp_capabilities: {e}"),
            })?;
        Ok(client)
    }

    pub fn version(&self) -> &QemuVersion {
        &self.version
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The default bound for one command.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// Why the connection ended, if it did.
    pub fn closed(&self) -> Option<String> {
        self.shared.lock().closed.clone()
    }

    /// Run `command` with `args` (`Value::Null` for none, else an object) within the default
    /// timeout; returns QMP's `return` value.
    pub async fn execute(&self, command: &str, args: Value) -> Result<Value> {
        self.execute_timeout(command, args, self.timeout).await
    }

    /// As [`Client::execute`], with its own bound.
    pub async fn execute_timeout(
        &self,
        command: &str,
        args: Value,
        limit: Duration,
    ) -> Result<Value> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let line = proto::encode_command(command, &args, Some(id)).map_err(QmpError::Invalid)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if let Some(why) = &st.closed {
                return Err(QmpError::Disconnected(why.clone()));
            }
            st.pending.insert(id, tx);
        }
        tracing::debug!(command, id, "qmp execute");
        let deadline = Instant::now() + limit;
        let sent = tokio::time::timeout_at(deadline, async {
            let mut w = self.shared.writer.lock().await;
            w.write_all(&line).await?;
            w.flush().await
        })
        .await;
        let outcome = match sent {
            Ok(Ok(())) => tokio::time::timeout_at(deadline, rx).await,
            Ok(Err(e)) => {
                self.shared.lock().pending.remove(&id);
                return Err(QmpError::Disconnected(format!("writing {command}: {e}")));
            }
            Err(_) => {
                self.shared.lock().pending.remove(&id);
                return Err(timeout_err(command, limit));
            }
        };
        match outcome {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(_)) => Err(QmpError::Disconnected(
                self.closed().unwrap_or_else(|| "reader ended".into()),
            )),
            Err(_) => {
                self.shared.lock().pending.remove(&id);
                Err(timeout_err(command, limit))
            }
        }
    }

    /// A receiver of every event that arrives from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events_tx.subscribe()
    }

    /// The sequence number of the latest event received; pass it to [`Client::wait_event`] to
    /// wait only for later ones.
    pub fn event_mark(&self) -> u64 {
        self.shared.lock().last_seq
    }

    /// Kept events with `seq > since` (at most the last `EVENT_RING`).
    pub fn events_since(&self, since: u64) -> Vec<Event> {
        let st = self.shared.lock();
        st.events
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect()
    }

    /// Wait for the first kept or future event with `seq > since` that `pred` accepts.
    pub async fn wait_event<F>(&self, since: u64, limit: Duration, pred: F) -> Result<Event>
    where
        F: Fn(&Event) -> bool,
    {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.shared.lock();
                if let Some(e) = st.events.iter().find(|e| e.seq > since && pred(e)) {
                    return Ok(e.clone());
                }
                if let Some(why) = &st.closed {
                    return Err(QmpError::Disconnected(why.clone()));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(QmpError::Timeout {
                    what: "a QMP event".into(),
                    timeout: limit,
                });
            }
        }
    }

    /// Close the connection (QEMU's monitor then serves its next client).
    pub async fn close(mut self) {
        self.reader.abort();
        let _ = (&mut self.reader).await;
        let _ = self.shared.writer.lock().await.shutdown().await;
    }

    /// Sleep until a new event arrives, the connection ends, or `limit` passes.
    pub(crate) async fn wait_any_event(&self, since: u64, limit: Duration) {
        let _ = self.wait_event(since, limit, |_| true).await;
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn timeout_err(command: &str, timeout: Duration) -> QmpError {
    QmpError::Timeout {
        what: format!("QMP command {command}"),
        timeout,
    }
}

async fn read_greeting(
    rd: &mut BufReader<OwnedReadHalf>,
    path: &Path,
    limit: Duration,
) -> Result<QemuVersion> {
    let fail = |reason: String| QmpError::Handshake {
        path: path.to_path_buf(),
        reason,
    };
    let deadline = Instant::now() + limit;
    let mut line = Vec::new();
    // QEMU can send an event (seen: RESUME of a VM starting up) on a connection before its
    // greeting; events before the greeting are skipped, a bounded number of them.
    for _ in 0..MAX_EVENTS_BEFORE_GREETING {
        let got =
            tokio::time::timeout_at(deadline, read_line_capped(rd, &mut line, proto::MAX_LINE))
                .await
                .map_err(|_| fail(format!("no greeting within {limit:?}")))?
                .map_err(|e| fail(format!("reading greeting: {e}")))?;
        if !got {
            return Err(fail("peer closed before the greeting".into()));
        }
        match proto::parse_message(proto::trim_line(&line)) {
            Ok(Message::Greeting(v)) => return Ok(v),
            Ok(Message::Event(e)) => {
                tracing::debug!("QMP event {} before the greeting, skipped", e.name)
            }
            Ok(other) => return Err(fail(format!("first message is not a greeting: {other:?}"))),
            Err(e) => return Err(fail(e)),
        }
    }
    Err(fail(format!(
        "more than {MAX_EVENTS_BEFORE_GREETING} events and no greeting"
    )))
}

/// Events tolerated on a new connection before QEMU's greeting.
const MAX_EVENTS_BEFORE_GREETING: usize = 16;

/// Read one `\n`-terminated line into `buf` (terminator included). `Ok(false)` on EOF before
/// any byte; an error on EOF mid-line or a line longer than `max`.
pub(crate) async fn read_line_capped<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    buf.clear();
    loop {
        let avail = rd.fill_buf().await?;
        if avail.is_empty() {
            if buf.is_empty() {
                return Ok(false);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "peer closed in the middle of a message",
            ));
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if buf.len().saturating_add(take) > max.saturating_add(2) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("message longer than {max} bytes"),
            ));
        }
        buf.extend_from_slice(&avail[..take]);
        rd.consume(take);
        if done {
            return Ok(true);
        }
    }
}

async fn reader_task(shared: Arc<Shared>, mut rd: BufReader<OwnedReadHalf>) {
    let why = match read_messages(&shared, &mut rd).await {
        Ok(()) => "QEMU closed the QMP connection".to_string(),
        Err(e) => e,
    };
    tracing::debug!(%why, "qmp reader ended");
    let pending: Vec<_> = {
        let mut st = shared.lock();
        st.closed = Some(why);
        st.pending.drain().map(|(_, tx)| tx).collect()
    };
    drop(pending); // receivers see a closed channel and report `closed`
    shared.notify.notify_waiters();
}

async fn read_messages(
    shared: &Shared,
    rd: &mut BufReader<OwnedReadHalf>,
) -> std::result::Result<(), String> {
    let mut line = Vec::new();
    loop {
        match read_line_capped(rd, &mut line, proto::MAX_LINE).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return Err(format!("reading from QEMU: {e}")),
        }
        let text = proto::trim_line(&line);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match proto::parse_message(text)? {
            Message::Return { id, value } => complete(shared, id, Ok(value))?,
            Message::Error { id, class, desc } => complete(shared, id, Err((class, desc)))?,
            Message::Event(ev) => on_event(shared, ev),
            Message::Greeting(_) => return Err("unexpected second greeting".into()),
        }
    }
}

fn complete(shared: &Shared, id: Option<Value>, reply: Reply) -> std::result::Result<(), String> {
    let Some(id) = id.as_ref().and_then(Value::as_u64) else {
        return Err(format!("reply without a valid id: {reply:?}"));
    };
    let tx = shared.lock().pending.remove(&id);
    match tx {
        Some(tx) => {
            let _ = tx.send(reply);
        }
        None => tracing::debug!(id, "qmp reply for a command that timed out"),
    }
    Ok(())
}

fn on_event(shared: &Shared, mut ev: Event) {
    {
        let mut st = shared.lock();
        st.last_seq += 1;
        ev.seq = st.last_seq;
        if st.events.len() >= EVENT_RING {
            st.events.pop_front();
        }
        st.events.push_back(ev.clone());
    }
    tracing::debug!(event = %ev.name, data = %ev.data, "qmp event");
    let _ = shared.events_tx.send(ev);
    shared.notify.notify_waiters();
}
