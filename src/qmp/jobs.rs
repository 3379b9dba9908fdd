//! Block jobs: query, wait, cancel, dismiss.
//!
//! Invariants:
//! - A wait follows `JOB_STATUS_CHANGE` events and re-reads `query-jobs` after each one (and at
//!   least every `POLL`), so a missed event costs at most one poll, never a hang; every wait has a
//!   deadline.
//! - `wait_job` dismisses the job it saw conclude (when QEMU did not already), and reports the
//!   job's `error` text; a job that vanished (auto-dismissed) is judged by its
//!   `BLOCK_JOB_COMPLETED` / `BLOCK_JOB_CANCELLED` event when one was kept.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{Client, QmpError, Result};

const POLL: Duration = Duration::from_millis(500);

/// One entry of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub id: String,
    /// `type`: backup, commit, create, snapshot-save, …
    pub kind: String,
    /// created, running, paused, ready, standby, waiting, pending, aborting, concluded, null
    pub status: String,
    pub current_progress: u64,
    pub total_progress: u64,
    pub error: Option<String>,
}

impl JobInfo {
    fn parse(v: &Value) -> Option<JobInfo> {
        Some(JobInfo {
            id: v.get("id")?.as_str()?.to_string(),
            kind: v
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            status: v.get("status")?.as_str()?.to_string(),
            current_progress: v
                .get("current-progress")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            total_progress: v.get("total-progress").and_then(Value::as_u64).unwrap_or(0),
            error: v.get("error").and_then(Value::as_str).map(String::from),
        })
    }
}

impl Client {
    /// `query-jobs`.
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>> {
        let v = self.execute("query-jobs", Value::Null).await?;
        let arr = v
            .as_array()
            .ok_or_else(|| bad("query-jobs", "not an array"))?;
        arr.iter()
            .map(|j| JobInfo::parse(j).ok_or_else(|| bad("query-jobs", "entry without id/status")))
            .collect()
    }

    /// The job with this id, if QEMU still has it.
    pub async fn job(&self, id: &str) -> Result<Option<JobInfo>> {
        Ok(self.query_jobs().await?.into_iter().find(|j| j.id == id))
    }

    /// Wait until job `id` has one of `statuses` or has concluded (whichever first), within
    /// `limit`. Returns its last state; `Ok(None)` if the job is gone (dismissed).
    pub async fn wait_job_status(
        &self,
        id: &str,
        statuses: &[&str],
        limit: Duration,
    ) -> Result<Option<JobInfo>> {
        let deadline = Instant::now() + limit;
        loop {
            let mark = self.event_mark();
            match self.job(id).await? {
                None => return Ok(None),
                Some(j) if j.status == "concluded" || statuses.contains(&j.status.as_str()) => {
                    return Ok(Some(j))
                }
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                let state = self
                    .job(id)
                    .await?
                    .map(|j| j.status)
                    .unwrap_or("gone".into());
                return Err(QmpError::Timeout {
                    what: format!("job {id} to reach {statuses:?} (it is {state})"),
                    timeout: limit,
                });
            }
            let wait = POLL.min(deadline - now);
            let _ = self
                .wait_event(mark, wait, |e| {
                    e.name == "JOB_STATUS_CHANGE" && e.str("id") == Some(id)
                })
                .await;
        }
    }

    /// Wait for job `id` to conclude, dismiss it, and fail with its error text if it has one.
    pub async fn wait_job(&self, id: &str, limit: Duration) -> Result<JobInfo> {
        match self.wait_job_status(id, &[], limit).await? {
            Some(j) => {
                self.dismiss_job(id).await?;
                match &j.error {
                    Some(e) => Err(QmpError::JobFailed {
                        id: id.to_string(),
                        status: j.status.clone(),
                        error: e.clone(),
                    }),
                    None => Ok(j),
                }
            }
            None => self.vanished_job(id),
        }
    }

    /// Judge a job that is no longer in `query-jobs` by its kept completion event.
    fn vanished_job(&self, id: &str) -> Result<JobInfo> {
        let done = self.events_since(0).into_iter().rev().find(|e| {
            matches!(
                e.name.as_str(),
                "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"
            ) && e.str("device") == Some(id)
        });
        let Some(ev) = done else {
            return Err(QmpError::NotFound(format!("job {id}")));
        };
        let info = JobInfo {
            id: id.to_string(),
            kind: ev.str("type").unwrap_or("").to_string(),
            status: "null".into(),
            current_progress: ev.data.get("offset").and_then(Value::as_u64).unwrap_or(0),
            total_progress: ev.data.get("len").and_then(Value::as_u64).unwrap_or(0),
            error: ev.str("error").map(String::from),
        };
        if ev.name == "BLOCK_JOB_CANCELLED" || info.error.is_some() {
            return Err(QmpError::JobFailed {
                id: id.to_string(),
                status: ev.name.to_lowercase(),
                error: info.error.unwrap_or_else(|| "cancelled".into()),
            });
        }
        Ok(info)
    }

    /// `job-dismiss`, tolerating a job that is already gone.
    pub async fn dismiss_job(&self, id: &str) -> Result<()> {
        match self.execute("job-dismiss", json!({ "id": id })).await {
            Ok(_) => Ok(()),
            Err(e) if e.class() == Some("DeviceNotFound") || e.class() == Some("GenericError") => {
                match self.job(id).await? {
                    None => Ok(()),
                    Some(_) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// `job-cancel` (if not concluded), wait for it to conclude, then `job-dismiss`. A job that
    /// is gone is fine. The job's own error text (e.g. "operation canceled") is not an error here.
    pub async fn cancel_job(&self, id: &str, limit: Duration) -> Result<()> {
        let Some(j) = self.job(id).await? else {
            return Ok(());
        };
        if j.status != "concluded" {
            if let Err(e) = self.execute("job-cancel", json!({ "id": id })).await {
                // It may have concluded in between.
                if self.job(id).await?.is_some_and(|j| j.status != "concluded") {
                    return Err(e);
                }
            }
        }
        if self.wait_job_status(id, &[], limit).await?.is_some() {
            self.dismiss_job(id).await?;
        }
        Ok(())
    }

    /// `job-complete` (e.g. an active block-commit in `ready`), then wait for it like
    /// [`Client::wait_job`].
    pub async fn complete_job(&self, id: &str, limit: Duration) -> Result<JobInfo> {
        self.execute("job-complete", json!({ "id": id })).await?;
        self.wait_job(id, limit).await
    }
}

fn bad(command: &str, detail: &str) -> QmpError {
    QmpError::BadReply {
        command: command.to_string(),
        detail: detail.to_string(),
    }
}
