//! `/policy`, `/vms/{vm}/policy` (schedules, slots or keep rules, snapshot lifespans),
//! `/schedule` (what the scheduler runs next and what waits), `/prune`, and
//! `/notifications` (targets, and a test event). Changes are admins' only.

use super::auth::Caller;
use super::openapi::{Done, ErrorReply, TaskRef};
use super::{accepted, jobs, ok, ApiResult, Body, Shared};
use crate::auth::{authorize, Need};
use crate::notify::{NotifyConfig, Target};
use crate::ops::{PolicyShow, PruneRequest};
use crate::policy::{PolicyConfig, VmPolicy};
use axum::extract::{Path, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};

/// The policy as configured (admins).
#[utoipa::path(get, path = "/api/v1/policy", tag = "policy",
    responses((status = 200, body = PolicyShow), (status = 401, body = ErrorReply),
        (status = 403, body = ErrorReply)))]
pub async fn show(State(s): State<Shared>, Caller(p): Caller) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    ok(s.appliance(&p).policy_show(None)?)
}

/// Replace the whole policy (admins); checked whole first: a bad one changes nothing.
#[utoipa::path(put, path = "/api/v1/policy", tag = "policy", request_body = PolicyConfig,
    responses((status = 200, body = PolicyConfig), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 422, body = ErrorReply)))]
pub async fn set(
    State(s): State<Shared>,
    Caller(p): Caller,
    Body(b): Body<PolicyConfig>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    ok(s.appliance(&p).policy_set(b)?)
}

/// One VM's policy in force, every default filled in, and its next scheduled runs.
#[utoipa::path(get, path = "/api/v1/vms/{vm}/policy", tag = "policy",
    params(("vm" = String, Path)),
    responses((status = 200, body = PolicyShow), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 404, body = ErrorReply)))]
pub async fn vm_show(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
) -> ApiResult<Response> {
    crate::names::check("VM", &vm)?;
    authorize(&p, Need::Read, Some(&vm))?;
    let mut r = s.appliance(&p).policy_show(Some(&vm))?;
    if p.role != crate::auth::Role::Admin {
        // Others see their VM's policy, not every VM's.
        r.config = PolicyConfig::default();
    }
    ok(r)
}

/// Set one VM's own policy (admins); its unset fields take the defaults.
#[utoipa::path(put, path = "/api/v1/vms/{vm}/policy", tag = "policy",
    params(("vm" = String, Path)), request_body = VmPolicy,
    responses((status = 200, body = crate::policy::Effective), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 422, body = ErrorReply)))]
pub async fn vm_set(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
    Body(b): Body<VmPolicy>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, Some(&vm))?;
    ok(s.appliance(&p).policy_set_vm(&vm, Some(b))?)
}

/// Drop one VM's own policy: the defaults apply (admins).
#[utoipa::path(delete, path = "/api/v1/vms/{vm}/policy", tag = "policy",
    params(("vm" = String, Path)),
    responses((status = 200, body = crate::policy::Effective), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply)))]
pub async fn vm_reset(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, Some(&vm))?;
    ok(s.appliance(&p).policy_set_vm(&vm, None)?)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ScheduleItem {
    /// `backup web-01`, `snapshot web-01`, `group db`, `gc`, `verify`.
    pub what: String,
    pub schedule: String,
    /// RFC 3339 (UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// `queued` while a due run waits for its VM; else `idle`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_task: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Every schedule (of the VMs the caller sees): the next run, and runs that wait.
#[utoipa::path(get, path = "/api/v1/schedule", tag = "policy",
    responses((status = 200, body = [ScheduleItem]), (status = 401, body = ErrorReply)))]
pub async fn schedule(State(s): State<Shared>, Caller(p): Caller) -> ApiResult<Response> {
    authorize(&p, Need::Read, None)?;
    let show = s.appliance(&p).policy_show(None)?;
    let st = super::schedule::load_state(&s.dir);
    let items: Vec<ScheduleItem> = show
        .next
        .into_iter()
        .filter(|n| match n.what.split_once(' ') {
            Some(("backup" | "snapshot", vm)) => p.sees(vm),
            _ => p.role == crate::auth::Role::Admin,
        })
        .map(|n| {
            let e = st.get(&n.what).filter(|e| e.schedule == n.schedule);
            let q = e.and_then(|e| e.queued.as_ref());
            ScheduleItem {
                state: if q.is_some() { "queued" } else { "idle" }.into(),
                queued_since: q.map(|q| crate::timefmt::rfc3339(q.since)),
                why: q.map(|q| q.why.clone()),
                last_task: e.and_then(|e| e.last_task.clone()),
                last_error: e.and_then(|e| e.last_error.clone()),
                what: n.what,
                schedule: n.schedule,
                next: n.next,
            }
        })
        .collect();
    ok(items)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneBody {
    /// One VM (default: every VM with backups; admins only).
    #[serde(default)]
    pub vm: Option<String>,
    /// Say what would go; remove nothing (answered at once, no task).
    #[serde(default)]
    pub dry_run: bool,
}

/// Apply the retention rules now (admins; → task), or with `dry_run` say what they would do.
#[utoipa::path(post, path = "/api/v1/prune", tag = "policy", request_body = PruneBody,
    responses((status = 200, body = crate::ops::PruneReport), (status = 202, body = TaskRef),
        (status = 400, body = ErrorReply), (status = 401, body = ErrorReply),
        (status = 403, body = ErrorReply), (status = 404, body = ErrorReply),
        (status = 409, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn prune(
    State(s): State<Shared>,
    Caller(p): Caller,
    Body(b): Body<PruneBody>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, b.vm.as_deref())?;
    let req = PruneRequest {
        vm: b.vm,
        dry_run: b.dry_run,
    };
    if req.dry_run {
        return ok(s.appliance(&p).prune(req, &crate::task::NoEvents)?);
    }
    let r = jobs::start(&s, &p, false, move |app, ev| app.prune(req, ev).map(|_| ())).await;
    accepted(r?.task)
}

/// The notification targets (admins; secrets stay in their files).
#[utoipa::path(get, path = "/api/v1/notifications", tag = "notifications",
    responses((status = 200, body = NotifyConfig), (status = 401, body = ErrorReply),
        (status = 403, body = ErrorReply)))]
pub async fn targets(State(s): State<Shared>, Caller(p): Caller) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    ok(s.appliance(&p).notify_config()?)
}

/// Add or replace a target (admins).
#[utoipa::path(put, path = "/api/v1/notifications/targets/{target}", tag = "notifications",
    params(("target" = String, Path)), request_body = Target,
    responses((status = 200, body = Done), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 422, body = ErrorReply)))]
pub async fn set_target(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(name): Path<String>,
    Body(b): Body<Target>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    s.appliance(&p).notify_set_target(&name, Some(b))?;
    ok(Done { done: true })
}

/// Remove a target; what waited for it is dropped (admins).
#[utoipa::path(delete, path = "/api/v1/notifications/targets/{target}", tag = "notifications",
    params(("target" = String, Path)),
    responses((status = 200, body = Done), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply)))]
pub async fn remove_target(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    s.appliance(&p).notify_set_target(&name, None)?;
    ok(Done { done: true })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TestSent {
    /// The test event's id, as the target will receive it.
    pub event: String,
}

/// Send a test event to a target (admins): queued at once, delivered like any other.
#[utoipa::path(post, path = "/api/v1/notifications/targets/{target}/test", tag = "notifications",
    params(("target" = String, Path)),
    responses((status = 202, body = TestSent), (status = 401, body = ErrorReply),
        (status = 403, body = ErrorReply), (status = 404, body = ErrorReply)))]
pub async fn test(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    let e = s.appliance(&p).notify_test(&name)?;
    Ok(axum::response::IntoResponse::into_response((
        axum::http::StatusCode::ACCEPTED,
        axum::Json(TestSent { event: e.id }),
    )))
}
