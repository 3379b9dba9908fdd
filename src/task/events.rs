//! What a running job tells the world: phases, progress, log lines, readiness, its outcome.
//!
//! Jobs report only through [`Events`]; they never print. The CLI's progress bar, the task
//! record and (next) the service's live streams are implementations; [`Tee`] sends to two.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    /// How a failed task ended (the last line of its record's log).
    Error,
}

/// A long-running server is ready (an NBD export, a FUSE mount).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Serving {
    /// What is served: `web-01@20261122-101500 disk root (read-only)`.
    pub what: String,
    /// Where: `nbd+unix:///root?socket=/run/x.sock`, `nbd://127.0.0.1:10809/root`, a path.
    pub at: String,
    /// How to stop it.
    pub stop: String,
}

/// How an operation ended, as its task record keeps it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Outcome {
    /// The backup it committed (`VM@ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// One line for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::error::ErrorBody>,
    /// What a backup read and stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes: Option<crate::notify::Sizes>,
}

pub trait Events: Send + Sync {
    /// The operation's task exists (its VMs are locked); `id` names it. Sent before any work,
    /// by the layer that runs tasks: the service answers a request with it.
    fn started(&self, _id: &str) {}
    /// A phase starts (`backup`, `restore`, `verify`, …); `total` is in bytes (0: unknown).
    fn phase(&self, _name: &str, _total: u64) {}
    /// `bytes` more of the current phase are done.
    fn progress(&self, _bytes: u64) {}
    /// A note worth keeping: what was cleaned up, why a disk was read whole, a warning.
    fn log(&self, _level: Level, _line: &str) {}
    /// A server is up and serving.
    fn serving(&self, _s: &Serving) {}
    /// The operation ended (sent once, by the layer that runs tasks, not by jobs).
    fn outcome(&self, _o: &Outcome) {}
}

/// Events that go nowhere.
pub struct NoEvents;

impl Events for NoEvents {}

/// Both sinks get every event.
pub struct Tee<'a>(pub &'a dyn Events, pub &'a dyn Events);

impl Events for Tee<'_> {
    fn started(&self, id: &str) {
        self.0.started(id);
        self.1.started(id);
    }
    fn phase(&self, name: &str, total: u64) {
        self.0.phase(name, total);
        self.1.phase(name, total);
    }
    fn progress(&self, bytes: u64) {
        self.0.progress(bytes);
        self.1.progress(bytes);
    }
    fn log(&self, level: Level, line: &str) {
        self.0.log(level, line);
        self.1.log(level, line);
    }
    fn serving(&self, s: &Serving) {
        self.0.serving(s);
        self.1.serving(s);
    }
    fn outcome(&self, o: &Outcome) {
        self.0.outcome(o);
        self.1.outcome(o);
    }
}
