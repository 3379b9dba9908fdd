//! `/tasks`: every operation's record (the CLI's too), cancel, and a live stream of a task's
//! progress and log as server-sent events that resumes after `Last-Event-ID`.
//!
//! Event ids are the record's change counter (`seq`): a log line keeps the id it was added
//! with, so a client that comes back with `Last-Event-ID: N` gets every log line after N that
//! the record still holds (its newest 50), the progress as it stands, and the end.

use super::auth::Caller;
use super::openapi::{ErrorReply, TaskRef};
use super::{ok, ApiResult, Shared};
use crate::auth::{authorize, Need, Principal, Role};
use crate::task::{Level, Outcome, State, TaskRecord};
use crate::Error;
use axum::extract::{Path, Query, State as AxState};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How often a live stream looks at the record.
const POLL: Duration = Duration::from_millis(200);

/// May `p` see task `t`: every VM of it, or (tasks without a VM) admins.
pub fn visible(p: &Principal, t: &TaskRecord) -> bool {
    if t.vms.is_empty() {
        return p.role == Role::Admin;
    }
    t.vms.iter().all(|v| p.sees(v))
}

fn find(s: &Shared, p: &Principal, id: &str) -> ApiResult<TaskRecord> {
    let t = crate::task::read(&s.dir, id)?;
    if !visible(p, &t) {
        return Err(
            Error::not_found(crate::error::What::Task, id, format!("no task {id:?}")).into(),
        );
    }
    Ok(t)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TaskQuery {
    /// Only tasks on this VM.
    pub vm: Option<String>,
    /// Only tasks in this state: queued, running, ok, failed, cancelled.
    pub state: Option<String>,
    /// Only tasks of this kind (backup, restore, snapshot-create, …).
    pub kind: Option<String>,
    /// Only tasks started at or after this time (Unix milliseconds).
    pub since: Option<u64>,
}

/// Task records, oldest first (a task whose process died reads as failed).
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", params(TaskQuery),
    responses((status = 200, body = [TaskRecord]), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply)))]
pub async fn list(
    AxState(s): AxState<Shared>,
    Caller(p): Caller,
    q: Result<Query<TaskQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    authorize(&p, Need::Read, None)?;
    let Query(q) = q.map_err(|e| Error::usage(format!("the query: {e}")))?;
    if let Some(v) = &q.vm {
        crate::names::check("VM", v)?;
    }
    let dir = s.dir.clone();
    let all = tokio::task::spawn_blocking(move || crate::task::list(&dir))
        .await
        .map_err(Error::internal)??;
    let v: Vec<TaskRecord> = all
        .into_iter()
        .filter(|t| visible(&p, t))
        .filter(|t| q.vm.as_ref().is_none_or(|v| t.vms.contains(v)))
        .filter(|t| q.state.as_ref().is_none_or(|st| t.state.name() == st))
        .filter(|t| q.kind.as_ref().is_none_or(|k| t.kind.name() == k))
        .filter(|t| q.since.is_none_or(|since| t.started_ms >= since))
        .collect();
    ok(v)
}

/// One task: state, progress, log, outcome.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = TaskRecord), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 404, body = ErrorReply)))]
pub async fn show(
    AxState(s): AxState<Shared>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    ok(find(&s, &p, &id)?)
}

/// Ask a task this service runs to stop (it stops at its next safe point).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/cancel", tag = "tasks", params(("id" = String, Path)),
    responses((status = 202, body = TaskRef), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply)))]
pub async fn cancel(
    AxState(s): AxState<Shared>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let t = find(&s, &p, &id)?;
    match t.vms.first() {
        Some(vm) => authorize(&p, Need::Operate, Some(vm))?,
        None => authorize(&p, Need::Admin, None)?,
    }
    let r = if !t.is_running() {
        Err(Error::Conflict(format!(
            "task {} has ended ({})",
            t.id,
            t.state.name()
        )))
    } else if s.jobs.cancel(&t.id, &format!("user {}", p.name)) {
        Ok(())
    } else {
        Err(Error::Conflict(format!(
            "task {} runs in another process (pid {}, started by {}): stop it there",
            t.id, t.pid, t.user
        )))
    };
    r?;
    super::accepted(t.id)
}

/// `event: progress`: the task's progress as it stands.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ProgressEvent {
    pub state: State,
    pub phase: String,
    pub done: u64,
    pub total: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// `event: log`: a line of the task's log.
#[derive(Serialize, utoipa::ToSchema)]
pub struct LogEvent {
    pub level: Level,
    pub line: String,
    pub ms: u64,
}

/// `event: end`: the task ended (the stream closes after it).
#[derive(Serialize, utoipa::ToSchema)]
pub struct EndEvent {
    pub state: State,
    pub progress: ProgressEvent,
    pub outcome: Outcome,
}

/// One server-sent event of `/tasks/{id}/events`, as a client's SSE parser hands it over.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ServerEvent {
    /// `progress`, `log` or `end`.
    pub event: String,
    /// Rising; send the last one seen back as `Last-Event-ID` to resume.
    pub id: String,
    /// JSON: a [`ProgressEvent`], [`LogEvent`] or [`EndEvent`] (a `TaskEvent`), by `event`.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// The data of one event (its `event:` field names which).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum TaskEvent {
    Progress(ProgressEvent),
    Log(LogEvent),
    End(EndEvent),
}

fn event(kind: &str, id: u64, data: &TaskEvent) -> Event {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
    Event::default().event(kind).id(id.to_string()).data(json)
}

/// The events between what the client saw (`after`) and record `t`.
fn events_of(t: &TaskRecord, after: u64) -> Vec<Event> {
    let mut out = Vec::new();
    for l in t.log.iter().filter(|l| l.seq > after) {
        let data = TaskEvent::Log(LogEvent {
            level: l.level,
            line: l.line.clone(),
            ms: l.ms,
        });
        out.push(event("log", l.seq, &data));
    }
    if t.seq > after {
        let p = &t.progress;
        let progress = ProgressEvent {
            state: t.state,
            phase: p.phase.clone(),
            done: p.done,
            total: p.total,
            percent: p.percent,
        };
        out.push(if t.is_running() {
            event("progress", t.seq, &TaskEvent::Progress(progress))
        } else {
            let end = EndEvent {
                state: t.state,
                progress,
                outcome: t.outcome.clone(),
            };
            event("end", t.seq, &TaskEvent::End(end))
        });
    }
    out
}

/// A task's progress and log, live, as server-sent events (`progress`, `log`, `end`).
/// Reconnect with `Last-Event-ID` to resume.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/events", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", body = ServerEvent),
        (status = 400, body = ErrorReply), (status = 401, body = ErrorReply),
        (status = 404, body = ErrorReply)))]
pub async fn events(
    AxState(s): AxState<Shared>,
    Caller(p): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let first = find(&s, &p, &id)?;
    let after: u64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
    let dir = s.dir.clone();
    let stop = s.shutdown.clone();
    tokio::spawn(async move {
        let mut seen = after;
        let mut rec = first;
        loop {
            for e in events_of(&rec, seen) {
                if tx.send(Ok(e)).await.is_err() {
                    return; // the client went away
                }
            }
            seen = seen.max(rec.seq);
            if !rec.is_running() || stop.is_cancelled() {
                return;
            }
            tokio::time::sleep(POLL).await;
            let (d, id) = (dir.clone(), rec.id.clone());
            match tokio::task::spawn_blocking(move || crate::task::read(&d, &id)).await {
                Ok(Ok(r)) => rec = r,
                _ => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
