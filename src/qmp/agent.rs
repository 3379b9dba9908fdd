//! QEMU guest agent (qemu-ga) over the host side of its virtio-serial port: a unix socket
//! chardev (`-chardev socket,path=P,server=on,wait=off,id=qga0 -device virtio-serial
//! -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`).
//!
//! The agent protocol has no ids and no greeting: replies come in order. Invariants:
//! - Every command is preceded by a resynchronisation: `0xFF` (resets the agent's JSON parser),
//!   then `guest-sync-delimited {id: random}`; bytes up to the agent's `0xFF` sentinel and replies
//!   with another id are discarded (stale replies of earlier, timed-out commands). Agents without
//!   `guest-sync-delimited` get `guest-sync`.
//! - Each call is bounded by its timeout. After a timeout or an I/O error the connection is
//!   dropped and the next call reconnects, so one lost reply cannot shift later ones.
//! - With no agent running in the guest, QEMU accepts the connection and holds what we write;
//!   the call fails with `QmpError::AgentTimeout` and the VM is not affected.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::client::read_line_capped;
use super::proto::{self, Message};
use super::{QmpError, Result};

/// Bound for freeze: the agent syncs every filesystem, which can take long on a busy guest.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// Thaw attempts before giving up (the guest stays frozen until its agent's own timeout).
pub const THAW_TRIES: usize = 3;

/// How [`Agent::frozen`] went.
#[derive(Debug)]
pub enum Frozen<T, E> {
    /// The agent did not answer its ping: nothing was frozen, the step did not run.
    NoAgent(QmpError),
    /// The freeze failed: the step did not run; a thaw was sent anyway (`thaw` says how it went).
    FreezeFailed { error: QmpError, thaw: Result<()> },
    /// The step ran frozen; `thaw` failing means the guest may still be frozen.
    Ran {
        result: std::result::Result<T, E>,
        thaw: Result<()>,
    },
}

pub struct Agent {
    path: PathBuf,
    timeout: Duration,
    conn: Mutex<Option<BufReader<UnixStream>>>,
}

impl Agent {
    /// Prepare a client for the agent socket at `path`; `timeout` bounds each call (connect,
    /// sync and command together). Connects lazily, so this never waits.
    pub fn new(path: impl AsRef<Path>, timeout: Duration) -> Agent {
        Agent {
            path: path.as_ref().to_path_buf(),
            timeout,
            conn: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resynchronise only (`guest-sync-delimited`).
    pub async fn sync(&self) -> Result<()> {
        self.call("guest-sync-delimited", Value::Null, self.timeout, true)
            .await
            .map(drop)
    }

    /// `guest-ping`: fails with `AgentTimeout` when no agent answers within the timeout.
    pub async fn ping(&self) -> Result<()> {
        self.execute("guest-ping", Value::Null).await.map(drop)
    }

    /// `guest-fsfreeze-freeze`: returns the number of filesystems frozen. Always pair with
    /// [`Agent::fsfreeze_thaw`] (the agent thaws by itself only after its own timeout).
    pub async fn fsfreeze_freeze(&self) -> Result<u64> {
        let v = self
            .call("guest-fsfreeze-freeze", Value::Null, FREEZE_TIMEOUT, false)
            .await?;
        as_count("guest-fsfreeze-freeze", &v)
    }

    /// `guest-fsfreeze-thaw`: returns the number of filesystems thawed.
    pub async fn fsfreeze_thaw(&self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-thaw", Value::Null).await?;
        as_count("guest-fsfreeze-thaw", &v)
    }

    /// Run `step` with the guest's filesystems frozen — the one freeze/thaw policy for every
    /// caller: `guest-ping` first (no agent: nothing is frozen and `step` does not run); then
    /// `guest-fsfreeze-freeze`; `step` runs only if the freeze succeeded; a thaw is sent
    /// whenever a freeze was (a freeze that failed or timed out may still happen late) and
    /// retried up to [`THAW_TRIES`] times, since a guest left frozen cannot write.
    pub async fn frozen<T, E, F>(&self, step: F) -> Frozen<T, E>
    where
        F: std::future::Future<Output = std::result::Result<T, E>>,
    {
        if let Err(e) = self.ping().await {
            return Frozen::NoAgent(e);
        }
        if let Err(error) = self.fsfreeze_freeze().await {
            let thaw = self.thaw_hard().await;
            return Frozen::FreezeFailed { error, thaw };
        }
        let result = step.await;
        let thaw = self.thaw_hard().await;
        Frozen::Ran { result, thaw }
    }

    /// Thaw, retrying up to [`THAW_TRIES`] times.
    async fn thaw_hard(&self) -> Result<()> {
        let mut last = None;
        for _ in 0..THAW_TRIES {
            match self.fsfreeze_thaw().await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| QmpError::Invalid("thaw".into())))
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&self) -> Result<FreezeStatus> {
        let v = self.execute("guest-fsfreeze-status", Value::Null).await?;
        match v.as_str() {
            Some("thawed") => Ok(FreezeStatus::Thawed),
            Some("frozen") => Ok(FreezeStatus::Frozen),
            _ => Err(QmpError::BadReply {
                command: "guest-fsfreeze-status".into(),
                detail: format!("unknown status {v}"),
            }),
        }
    }

    /// Any agent command, after a resync, within the default timeout.
    pub async fn execute(&self, command: &str, args: Value) -> Result<Value> {
        self.call(command, args, self.timeout, false).await
    }

    async fn call(
        &self,
        command: &str,
        args: Value,
        limit: Duration,
        sync_only: bool,
    ) -> Result<Value> {
        let mut conn = self.conn.lock().await;
        let deadline = Instant::now() + limit;
        let work = async {
            if conn.is_none() {
                let s = UnixStream::connect(&self.path).await.map_err(|source| {
                    QmpError::AgentConnect {
                        path: self.path.clone(),
                        source,
                    }
                })?;
                *conn = Some(BufReader::new(s));
            }
            let Some(stream) = conn.as_mut() else {
                return Err(self.err("connection missing".into()));
            };
            resync(stream, &self.path).await?;
            if sync_only {
                return Ok(Value::Null);
            }
            send(stream, command, &args, &self.path).await?;
            read_reply(stream, command, &self.path).await
        };
        let out = match tokio::time::timeout_at(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(QmpError::AgentTimeout {
                path: self.path.clone(),
                command: command.to_string(),
                timeout: limit,
            }),
        };
        if matches!(&out, Err(e) if !matches!(e, QmpError::AgentCommand { .. })) {
            *conn = None; // unknown stream state: start afresh next time
        }
        out
    }

    fn err(&self, detail: String) -> QmpError {
        QmpError::Agent {
            path: self.path.clone(),
            detail,
        }
    }
}

async fn send(
    stream: &mut BufReader<UnixStream>,
    command: &str,
    args: &Value,
    path: &Path,
) -> Result<()> {
    let line = proto::encode_command(command, args, None).map_err(QmpError::Invalid)?;
    let w = stream.get_mut();
    w.write_all(&line).await.map_err(|e| io_err(path, e))?;
    w.flush().await.map_err(|e| io_err(path, e))
}

/// `0xFF` + `guest-sync-delimited`, then skip to the agent's `0xFF` and to the reply carrying our
/// id. Falls back to `guest-sync` for agents without the delimited variant.
async fn resync(stream: &mut BufReader<UnixStream>, path: &Path) -> Result<()> {
    let id = getrandom::u64().unwrap_or(0x5eed) & 0x7fff_ffff_ffff;
    stream
        .get_mut()
        .write_all(&[0xff])
        .await
        .map_err(|e| io_err(path, e))?;
    send(stream, "guest-sync-delimited", &json!({ "id": id }), path).await?;
    let mut line = Vec::new();
    let mut delimited = true;
    loop {
        if delimited {
            skip_past_delimiter(stream, path).await?;
        }
        if !read_line_capped(stream, &mut line, proto::MAX_LINE)
            .await
            .map_err(|e| io_err(path, e))?
        {
            return Err(closed(path));
        }
        match proto::parse_message(proto::trim_line(&line)) {
            Ok(Message::Return { value, .. }) if value.as_u64() == Some(id) => return Ok(()),
            Ok(Message::Error { class, .. }) if class == "CommandNotFound" && delimited => {
                delimited = false;
                send(stream, "guest-sync", &json!({ "id": id }), path).await?;
            }
            _ => {} // stale reply or noise: keep looking
        }
    }
}

/// Consume bytes up to and including the next `0xFF`, keeping none of them.
async fn skip_past_delimiter(stream: &mut BufReader<UnixStream>, path: &Path) -> Result<()> {
    loop {
        let buf = stream.fill_buf().await.map_err(|e| io_err(path, e))?;
        if buf.is_empty() {
            return Err(closed(path));
        }
        match buf.iter().position(|&b| b == 0xff) {
            Some(i) => {
                stream.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                stream.consume(n);
            }
        }
    }
}

async fn read_reply(
    stream: &mut BufReader<UnixStream>,
    command: &str,
    path: &Path,
) -> Result<Value> {
    let mut line = Vec::new();
    loop {
        if !read_line_capped(stream, &mut line, proto::MAX_LINE)
            .await
            .map_err(|e| io_err(path, e))?
        {
            return Err(closed(path));
        }
        let text = proto::trim_line(&line);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return match proto::parse_message(text) {
            Ok(Message::Return { value, .. }) => Ok(value),
            Ok(Message::Error { class, desc, .. }) => Err(QmpError::AgentCommand {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(other) => Err(QmpError::Agent {
                path: path.to_path_buf(),
                detail: format!("unexpected message {other:?}"),
            }),
            Err(e) => Err(QmpError::Agent {
                path: path.to_path_buf(),
                detail: e,
            }),
        };
    }
}

fn as_count(command: &str, v: &Value) -> Result<u64> {
    v.as_u64().ok_or_else(|| QmpError::BadReply {
        command: command.to_string(),
        detail: format!("expected a count, got {v}"),
    })
}

fn io_err(path: &Path, e: std::io::Error) -> QmpError {
    QmpError::Agent {
        path: path.to_path_buf(),
        detail: format!("I/O error: {e}"),
    }
}

fn closed(path: &Path) -> QmpError {
    QmpError::Agent {
        path: path.to_path_buf(),
        detail: "the socket closed; is the VM still running?".into(),
    }
}
