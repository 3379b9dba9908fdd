//! `/healthz`, `/metrics` (Prometheus text format), the request counter and the 404 of
//! routes that do not exist.

use super::auth::Caller;
use super::{ApiError, ApiResult, Shared};
use crate::auth::{authorize, Need};
use crate::task::{Kind, State};
use crate::Error;
use axum::extract::{MatchedPath, Request, State as AxState};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// HTTP requests by route (the route's pattern, not the path) and status.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

/// Count every request by its route and status.
pub async fn count(AxState(s): AxState<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    *crate::sys::lock(&s.metrics.requests)
        .entry((route, resp.status().as_u16()))
        .or_default() += 1;
    resp
}

/// Liveness: the service answers and its repository opens.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, body = String), (status = 503, body = super::openapi::ErrorReply)))]
pub async fn healthz(AxState(s): AxState<Shared>) -> ApiResult<Response> {
    let dir = s.dir.clone();
    tokio::task::spawn_blocking(move || crate::repo::Repo::open(&dir).map(|_| ()))
        .await
        .map_err(Error::internal)?
        .map_err(|e| ApiError(Error::busy("service", format!("unhealthy: {e}"))))?;
    Ok("ok\n".into_response())
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', " ")
}

/// Prometheus text: backups ok and failed per VM, seconds since each VM's last good backup,
/// bytes stored, running tasks, task durations by kind, HTTP requests by route and status.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, body = String, content_type = "text/plain"),
        (status = 401, body = super::openapi::ErrorReply)))]
pub async fn metrics(AxState(s): AxState<Shared>, Caller(p): Caller) -> ApiResult<Response> {
    authorize(&p, Need::Read, None)?;
    let s2 = s.clone();
    let text = tokio::task::spawn_blocking(move || render(&s2, &p))
        .await
        .map_err(Error::internal)??;
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}

fn render(s: &Shared, p: &crate::auth::Principal) -> crate::Result<String> {
    let mut out = String::new();
    let tasks = crate::task::list(&s.dir)?;
    let mut backups: BTreeMap<(String, &str), u64> = BTreeMap::new();
    let mut durations: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
    let mut running = 0;
    for t in &tasks {
        if t.is_running() {
            running += 1;
        }
        if let Some(end) = t.ended_ms {
            let d = durations.entry(t.kind.name()).or_default();
            d.0 += end.saturating_sub(t.started_ms) as f64 / 1000.0;
            d.1 += 1;
        }
        if t.kind == Kind::Backup && !t.is_running() {
            if let Some(vm) = t.vms.first().filter(|v| p.sees(v)) {
                let st = if t.state == State::Ok { "ok" } else { "failed" };
                *backups.entry((vm.clone(), st)).or_default() += 1;
            }
        }
    }
    let _ = writeln!(out, "# HELP holdfast_backups_total Backup tasks that ended, by VM and result (of the task records kept).");
    let _ = writeln!(out, "# TYPE holdfast_backups_total counter");
    for ((vm, st), n) in &backups {
        let _ = writeln!(
            out,
            "holdfast_backups_total{{vm=\"{}\",state=\"{st}\"}} {n}",
            label(vm)
        );
    }
    let repo = crate::repo::Repo::open(&s.dir)?;
    let now = crate::timefmt::now_secs();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for m in repo.manifests(None)? {
        if p.sees(&m.vm) {
            last.insert(m.vm.clone(), m.time);
        }
    }
    let _ = writeln!(
        out,
        "# HELP holdfast_last_backup_age_seconds Seconds since each VM's newest committed backup."
    );
    let _ = writeln!(out, "# TYPE holdfast_last_backup_age_seconds gauge");
    for (vm, t) in &last {
        let _ = writeln!(
            out,
            "holdfast_last_backup_age_seconds{{vm=\"{}\"}} {}",
            label(vm),
            now.saturating_sub(*t)
        );
    }
    if p.role == crate::auth::Role::Admin {
        let stored: u64 = repo.catalog.packs()?.iter().map(|(_, i)| i.size).sum();
        let _ = writeln!(
            out,
            "# HELP holdfast_stored_bytes Bytes of all packs in the store."
        );
        let _ = writeln!(out, "# TYPE holdfast_stored_bytes gauge");
        let _ = writeln!(out, "holdfast_stored_bytes {stored}");
    }
    let _ = writeln!(
        out,
        "# HELP holdfast_tasks_running Tasks queued or running now."
    );
    let _ = writeln!(out, "# TYPE holdfast_tasks_running gauge");
    let _ = writeln!(out, "holdfast_tasks_running {running}");
    let _ = writeln!(
        out,
        "# HELP holdfast_task_duration_seconds How long tasks that ended took, by kind."
    );
    let _ = writeln!(out, "# TYPE holdfast_task_duration_seconds summary");
    for (kind, (sum, n)) in &durations {
        let _ = writeln!(
            out,
            "holdfast_task_duration_seconds_sum{{kind=\"{kind}\"}} {sum:.3}"
        );
        let _ = writeln!(
            out,
            "holdfast_task_duration_seconds_count{{kind=\"{kind}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP holdfast_http_requests_total HTTP requests by route and status."
    );
    let _ = writeln!(out, "# TYPE holdfast_http_requests_total counter");
    for ((route, status), n) in crate::sys::lock(&s.metrics.requests).iter() {
        let _ = writeln!(
            out,
            "holdfast_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
            label(route)
        );
    }
    Ok(out)
}

/// Any route that does not exist.
pub async fn not_found() -> ApiError {
    ApiError(Error::not_found(
        crate::error::What::File,
        "",
        "no such route; /api/v1/openapi.json lists them",
    ))
}

/// A route that exists, with a method it does not take: 405 in the one error shape (code
/// `usage`: the request is malformed).
pub async fn method_not_allowed(method: axum::http::Method) -> Response {
    let e = Error::usage(format!(
        "{method} is not a method of this route; /api/v1/openapi.json lists them"
    ));
    let body = serde_json::json!({ "error": e.to_body() });
    (axum::http::StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}
