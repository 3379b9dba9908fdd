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

/// What a launched job reports back: its task id (once it exists), where it serves, and an
/// error from before either.
struct Launched {
    started: oneshot::Receiver<String>,
    serving: oneshot::Receiver<Serving>,
    failed: oneshot::Receiver<Error>,
}

/// Run `job` on a worker thread as `user` (a task's user field).
fn launch(
    s: &Shared,
    user: String,
    job: impl FnOnce(&Appliance, &dyn Events) -> Result<()> + Send + 'static,
) -> Result<Launched> {
    if s.shutdown.is_cancelled() {
        return Err(Error::busy("service", "the service is shutting down"));
    }
    let cancel = Cancel::new();
    let app = Appliance::new(s.dir.clone(), Some(s.config.clone()), user)
        .with_cancel(cancel.clone())
        .with_slots(s.slots.clone());
    let (started_tx, started) = oneshot::channel();
    let (serving_tx, serving) = oneshot::channel();
    let (failed_tx, failed) = oneshot::channel::<Error>();
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
    Ok(Launched {
        started,
        serving,
        failed,
    })
}

fn lost() -> Error {
    Error::internal("the job ended without a word")
}

/// [`start`] for a caller off the async runtime (the scheduler): the task id once the task
/// exists, or the error from before.
pub fn start_blocking(
    s: &Shared,
    user: &str,
    job: impl FnOnce(&Appliance, &dyn Events) -> Result<()> + Send + 'static,
) -> Result<String> {
    let l = launch(s, user.to_string(), job)?;
    match l.started.blocking_recv() {
        Ok(id) => Ok(id),
        // The job ended before its task existed: its error says why.
        Err(_) => Err(l.failed.blocking_recv().unwrap_or_else(|_| lost())),
    }
}

/// Run `job` on a worker thread as `p`; answer once its task exists (and, with `wait_serving`,
/// once it serves). A job that fails before its task exists fails the request.
pub async fn start(
    s: &Shared,
    p: &Principal,
    wait_serving: bool,
    job: impl FnOnce(&Appliance, &dyn Events) -> Result<()> + Send + 'static,
) -> ApiResult<Started> {
    let Launched {
        started,
        serving,
        mut failed,
    } = launch(s, format!("api:{}", p.name), job).map_err(ApiError)?;
    let task = tokio::select! {
        biased;
        id = started => match id {
            Ok(id) => id,
            Err(_) => return Err(ApiError((&mut failed).await.unwrap_or_else(|_| lost()))),
        },
        e = &mut failed => return Err(ApiError(e.unwrap_or_else(|_| lost()))),
    };
    if !wait_serving {
        return Ok(Started {
            task,
            serving: None,
        });
    }
    tokio::select! {
        biased;
        sv = serving => match sv {
            Ok(sv) => Ok(Started { task, serving: Some(sv) }),
            Err(_) => Err(ApiError(failed.await.unwrap_or_else(|_| lost()))),
        },
        e = &mut failed => Err(ApiError(e.unwrap_or_else(|_| lost()))),
    }
}
