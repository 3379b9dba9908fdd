//! QEMU control: an async QMP client, a guest-agent client, and the typed QEMU operations a
//! backup needs (read points with dirty bitmaps, user snapshots). See `docs/qemu.md`.
//!
//! Layers:
//! - [`proto`]: pure parsing and encoding of QMP / guest-agent JSON lines.
//! - [`Client`]: one QMP connection (greeting, `qmp_capabilities`, commands matched to replies
//!   by `id`, events kept and broadcast, block-job waiting).
//! - [`Agent`]: the QEMU guest agent over its host-side unix socket.
//! - [`ops`]: node discovery, bitmaps, read points, teardown, leftovers, snapshots.
//!
//! Invariants:
//! - Every wait is bounded: each command, job wait, event wait and agent call has a timeout; a
//!   peer that stops answering gives [`QmpError::Timeout`], never a hang.
//! - Nothing from the peer is trusted: lines are capped ([`proto::MAX_LINE`]) before parsing,
//!   malformed JSON or an unexpected shape is [`QmpError::Protocol`], never a panic; after a
//!   protocol error or EOF every pending and later command fails with
//!   [`QmpError::Disconnected`].
//! - Everything holdfast creates inside QEMU (node names, job ids, export names, bitmap names,
//!   snapshot tags) and every fleecing file starts with [`ops::PREFIX`], so leftovers of a
//!   killed holdfast can be found and removed ([`ops::find_leftovers`]).
//! - This module imports nothing from the rest of the crate.

mod agent;
mod client;
mod jobs;
pub mod ops;
pub mod proto;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use agent::{Agent, FreezeStatus, Frozen, THAW_TRIES};
pub use client::Client;
pub use jobs::JobInfo;
pub use proto::{Event, QemuVersion};

/// Default bound for one QMP command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub type Result<T, E = QmpError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}; is the VM running and its -qmp socket right?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP handshake on {path} failed: {reason}; is this a QMP socket (not a guest agent or serial console)?")]
    Handshake { path: PathBuf, reason: String },
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("no answer to {what} within {timeout:?}; is QEMU hung or overloaded?")]
    Timeout { what: String, timeout: Duration },
    #[error("QMP connection lost: {0}; is the VM still running?")]
    Disconnected(String),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("unexpected reply to {command}: {detail}")]
    BadReply { command: String, detail: String },
    #[error("job {id} ended with status {status}: {error}")]
    JobFailed {
        id: String,
        status: String,
        error: String,
    },
    #[error("cannot connect to guest agent socket {path}: {source}; is the VM running with a virtio-serial org.qemu.guest_agent.0 port on this socket?")]
    AgentConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent on {path} did not answer {command} within {timeout:?}; is qemu-guest-agent installed and running in the guest?")]
    AgentTimeout {
        path: PathBuf,
        command: String,
        timeout: Duration,
    },
    #[error("guest agent refused {command}: {class}: {desc}")]
    AgentCommand {
        command: String,
        class: String,
        desc: String,
    },
    #[error("guest agent on {path}: {detail}")]
    Agent { path: PathBuf, detail: String },
    #[error("{0} not found in QEMU")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("teardown left things behind ({}); run find_leftovers/clean_leftovers", .0.join("; "))]
    Teardown(Vec<String>),
}

impl QmpError {
    /// QMP's error class when QEMU refused a command (e.g. `GenericError`, `CommandNotFound`,
    /// `DeviceNotFound`).
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } | QmpError::AgentCommand { class, .. } => Some(class),
            _ => None,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        QmpError::Io {
            what: what.into(),
            source,
        }
    }
}
