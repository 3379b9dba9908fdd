//! Operations started through the API run on worker threads, never on the async runtime, each
//! as a task of the core ([`crate::ops`]) with a cancel of its own. The request that starts
//! one waits only until its task exists (its VMs locked: a refusal, like `busy`, is still the
//! request's answer), then answers with the task id while the job runs on. At shutdown every
//! job is cancelled and waited for (a VM backup tears its read point down first).

use super::{ApiError, ApiResult, Shared};
use crate::auth::Principal;
use crate::ops::Appliance;
use crate::task::{Cancel, Events, Serving};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The jobs this service runs: their cancels and threads.
#[derive(Default)]
pub struct Running {
    cancels: Mutex<HashMap<String, Cancel>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Running {
    /// Ask task `id` to stop; false when this service does not run it.
    pub fn cancel(&self, id: &str, by: &str) -> bool {
        match crate::sys::lock(&self.cancels).get(id) {
            Some(c) => {
                c.cancel(by);
                true
            }
            None => false,
        }
    }

    /// Ask every job to stop.
    pub fn cancel_all(&self, by: &str) {
        for c in crate::sys::lock(&self.cancels).values() {
            c.cancel(by);
        }
    }

    /// Wait for every job thread to end, at most `limit`; true when all did.
    pub fn join_all(&self, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            let mut threads = crate::sys::lock(&self.threads);
            threads.retain(|t| !t.is_finished());
            if threads.is_empty() {
                return true;
            }
            drop(threads);
            if start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ids of the tasks this service runs now.
    pub fn ids(&self) -> Vec<String> {
        crate::sys::lock(&self.cancels).keys().cloned().collect()
    }
}

/// Tells the starting request when the task exists (and, for a server, where it serves).
struct Starter {
    s: Shared,
    cancel: Cancel,
    started: Mutex<Option<oneshot::Sender<String>>>,
    serving: Mutex<Option<oneshot::Sender<Serving>>>,
}

impl Events for Starter {
    fn started(&self, id: &str) {
        crate::sys::lock(&self.s.jobs.cancels).insert(id.to_string(), self.cancel.clone());
        if let Some(tx) = crate::sys::lock(&self.started).take() {
            let _ = tx.send(id.to_string());
        }
    }

    fn serving(&self, s: &Serving) {
        if let Some(tx) = crate::sys::lock(&self.serving).take() {
            let _ = tx.send(s.clone());
        }
    }
}

/// What [`start`] hands back: the task, and where it serves (for servers).
pub struct Started {
    pub task: String,
    pub serving: Option<Serving>,
}

/// Run `job` on a worker thread as `p`; answer once its task exists (and, with `wait_serving`,
/// once it serves). A job that fails before its task exists fails the request.
pub async fn start(
    s: &Shared,
    p: &Principal,
    wait_serving: bool,
    job: impl FnOnce(&Appliance, &dyn Events) -> Result<()> + Send + 'static,
) -> ApiResult<Started> {
    if s.shutdown.is_cancelled() {
        return Err(ApiError(Error::busy(
            "service",
            "the service is shutting down",
        )));
    }
    let cancel = Cancel::new();
    let app = Appliance::new(
        s.dir.clone(),
        Some(s.config.clone()),
        format!("api:{}", p.name),
    )
    .with_cancel(cancel.clone())
    .with_slots(s.slots.clone());
    let (started_tx, started_rx) = oneshot::channel();
    let (serving_tx, serving_rx) = oneshot::channel();
    let (failed_tx, failed_rx) = oneshot::channel::<Error>();
    let starter = Starter {
        s: s.clone(),
        cancel,
        started: Mutex::new(Some(started_tx)),
        serving: Mutex::new(Some(serving_tx)),
    };
    let shared = s.clone();
    let thread = std::thread::Builder::new()
        .name("holdfast-job".into())
        .spawn(move || {
            if let Err(e) = job(&app, &starter) {
                // Heard by the request while it still waits (before the task existed, or
                // before a server served); after that, the task record says it.
                let _ = failed_tx.send(e);
            }
            crate::sys::lock(&shared.jobs.cancels).retain(|_, c| !c.same_as(&starter.cancel));
        })
        .map_err(|e| Error::io("start a job thread", e))?;
    crate::sys::lock(&s.jobs.threads).push(thread);
    let mut failed_rx = failed_rx;
    let lost = || Error::internal("the job ended without a word");
    let task = tokio::select! {
        biased;
        id = started_rx => match id {
            Ok(id) => id,
            Err(_) => return Err(ApiError((&mut failed_rx).await.unwrap_or_else(|_| lost()))),
        },
        e = &mut failed_rx => return Err(ApiError(e.unwrap_or_else(|_| lost()))),
    };
    if !wait_serving {
        return Ok(Started {
            task,
            serving: None,
        });
    }
    tokio::select! {
        biased;
        sv = serving_rx => match sv {
            Ok(sv) => Ok(Started { task, serving: Some(sv) }),
            Err(_) => Err(ApiError(failed_rx.await.unwrap_or_else(|_| lost()))),
        },
        e = &mut failed_rx => Err(ApiError(e.unwrap_or_else(|_| lost()))),
    }
}
