//! `/vms`: the VMs a caller may see — declared ones and those with backups — with their last
//! backup, slots and running task; declaring and removing VMs (admins).

use super::auth::Caller;
use super::openapi::{Done, ErrorReply};
use super::{ok, ApiResult, Body, Shared};
use crate::auth::{authorize, Need, Principal};
use crate::error::What;
use crate::ops::VmAddRequest;
use crate::repo::Manifest;
use crate::task::{NoEvents, TaskRecord};
use crate::Error;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Serialize, utoipa::ToSchema)]
pub struct LastBackup {
    pub id: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub age_seconds: u64,
}

/// The "1 / 2" counter: backups held, and the slots the VM's policy gives (None: the VM
/// keeps backups by keep rules, not slots).
#[derive(Serialize, utoipa::ToSchema)]
pub struct SlotUse {
    pub used: u64,
    pub total: Option<u64>,
    /// A manual backup would be refused now (`slots-full`): every slot is used and the
    /// policy refuses, or every backup in them is protected.
    pub full: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TaskBrief {
    pub id: String,
    pub kind: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

impl TaskBrief {
    pub fn of(t: &TaskRecord) -> TaskBrief {
        TaskBrief {
            id: t.id.clone(),
            kind: t.kind.name().into(),
            state: t.state.name().into(),
            percent: t.progress.percent,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VmItem {
    pub name: String,
    /// Declared with `vm add` (a VM in QEMU); otherwise known only by its backups.
    pub declared: bool,
    pub backups: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<LastBackup>,
    pub slots: SlotUse,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running_task: Option<TaskBrief>,
    /// Disk name → QEMU block node (declared VMs).
    pub disks: BTreeMap<String, String>,
    /// What the VM's backups added to the store when they were taken (cheap to list for a
    /// fleet; `/vms/{vm}/stats` says what they alone hold now).
    pub stored_bytes: u64,
    /// `stored_bytes` at `[service] price_per_gb_month`.
    pub cost_per_month: f64,
}

fn item(
    name: &str,
    declared: Option<&crate::jobs::vms::VmConfig>,
    backups: &[&Manifest],
    running: &[TaskRecord],
    policy: &crate::policy::Effective,
    price: f64,
) -> VmItem {
    let now = crate::timefmt::now_secs();
    let total = match policy.retention {
        crate::policy::Retention::Slots(n) => Some(u64::from(n)),
        crate::policy::Retention::Keep(_) => None,
    };
    let full = total.is_some_and(|n| backups.len() as u64 >= n)
        && policy.on_full(false) == crate::policy::OnFull::Refuse;
    let stored: u64 = backups.iter().map(|m| m.stats.new_stored_bytes).sum();
    VmItem {
        name: name.to_string(),
        declared: declared.is_some(),
        backups: backups.len() as u64,
        last_backup: backups.last().map(|m| LastBackup {
            id: m.id.clone(),
            time: crate::timefmt::rfc3339(m.time),
            age_seconds: now.saturating_sub(m.time),
        }),
        slots: SlotUse {
            used: backups.len() as u64,
            total,
            full,
        },
        running_task: running
            .iter()
            .find(|t| t.vms.iter().any(|v| v == name))
            .map(TaskBrief::of),
        disks: declared.map(|c| c.disks.clone()).unwrap_or_default(),
        stored_bytes: stored,
        cost_per_month: stored as f64 / 1e9 * price,
    }
}

/// Every VM `p` sees, as list items.
fn items(s: &Shared, p: &Principal, only: Option<&str>) -> ApiResult<Vec<VmItem>> {
    let app = s.appliance(p);
    let file = s.vms_file()?;
    let all = match app.backups(None) {
        Ok(b) => b,
        Err(Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let running = crate::task::running(&s.dir);
    let names: BTreeSet<&str> = file
        .vm
        .keys()
        .map(String::as_str)
        .chain(all.iter().map(|m| m.vm.as_str()))
        .filter(|n| p.sees(n) && only.is_none_or(|o| o == *n))
        .collect();
    Ok(names
        .into_iter()
        .map(|n| {
            let bs: Vec<&Manifest> = all.iter().filter(|m| m.vm == n).collect();
            let policy = file.policy.effective(n);
            item(n, file.vm.get(n), &bs, &running, &policy, s.price())
        })
        .collect())
}

/// The VMs the caller may see.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    responses((status = 200, body = [VmItem]), (status = 401, body = ErrorReply)))]
pub async fn list(State(s): State<Shared>, Caller(p): Caller) -> ApiResult<Response> {
    authorize(&p, Need::Read, None)?;
    let s2 = s.clone();
    let v = tokio::task::spawn_blocking(move || items(&s2, &p, None))
        .await
        .map_err(Error::internal)??;
    ok(v)
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{vm}", tag = "vms", params(("vm" = String, Path)),
    responses((status = 200, body = VmItem), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 404, body = ErrorReply)))]
pub async fn show(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
) -> ApiResult<Response> {
    crate::names::check("VM", &vm)?;
    authorize(&p, Need::Read, Some(&vm))?;
    let vm2 = vm.clone();
    let v = tokio::task::spawn_blocking(move || items(&s, &p, Some(&vm2)))
        .await
        .map_err(Error::internal)??;
    match v.into_iter().next() {
        Some(item) => ok(item),
        None => Err(Error::not_found(What::Vm, vm.clone(), format!("no VM {vm:?}")).into()),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDeclare {
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
    /// QEMU's QMP unix socket.
    pub qmp: String,
    /// Disk name → QEMU block node name.
    pub disks: BTreeMap<String, String>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub work_dir: Option<String>,
    #[serde(default)]
    pub nbd_socket: Option<String>,
    /// Lifespan of snapshots, e.g. `10d`.
    #[serde(default)]
    pub snapshot_ttl: Option<String>,
    #[serde(default)]
    pub snapshot_limit: Option<u32>,
    /// Check the socket and nodes now [default: true].
    #[serde(default = "yes")]
    pub check: bool,
}

fn yes() -> bool {
    true
}

/// Declare a VM that runs in QEMU (admins).
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = VmDeclare,
    responses((status = 200, body = VmItem), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply),
        (status = 413, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn declare(
    State(s): State<Shared>,
    Caller(p): Caller,
    Body(d): Body<VmDeclare>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    let name = d.name.clone();
    let s2 = s.clone();
    let p2 = p.clone();
    let r = tokio::task::spawn_blocking(move || {
        let req = VmAddRequest {
            name: d.name,
            qmp: d.qmp.into(),
            disks: d.disks.into_iter().collect(),
            agent: d.agent.map(Into::into),
            work_dir: d.work_dir.map(Into::into),
            nbd_socket: d.nbd_socket.map(Into::into),
            snapshot_ttl: d.snapshot_ttl,
            snapshot_limit: d.snapshot_limit,
            check: d.check,
        };
        s2.appliance(&p2).vm_add(req, &NoEvents).map(|_| ())
    })
    .await
    .map_err(Error::internal)?;
    // A socket no QEMU answers on is what the request got wrong, not a service failure.
    let r = r.map_err(|e| match e {
        Error::Qemu { .. } | Error::Qmp(_) => {
            Error::InvalidBody(format!("qmp: {e} (or declare it with \"check\": false)"))
        }
        e => e,
    });
    r?;
    let s3 = s.clone();
    let n2 = name.clone();
    let v = tokio::task::spawn_blocking(move || items(&s3, &p, Some(&n2)))
        .await
        .map_err(Error::internal)??;
    match v.into_iter().next() {
        Some(i) => {
            let mut r = axum::Json(i).into_response();
            r.extensions_mut().insert(super::audit::NamedVm(name));
            Ok(r)
        }
        None => Err(Error::internal("a declared VM is not listed").into()),
    }
}

/// Forget a VM's declaration (admins); its backups and snapshots stay.
#[utoipa::path(delete, path = "/api/v1/vms/{vm}", tag = "vms", params(("vm" = String, Path)),
    responses((status = 200, body = Done), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply)))]
pub async fn remove(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
) -> ApiResult<Response> {
    crate::names::check("VM", &vm)?;
    authorize(&p, Need::Admin, Some(&vm))?;
    let (s2, p2, vm2) = (s.clone(), p.clone(), vm.clone());
    let r = tokio::task::spawn_blocking(move || s2.appliance(&p2).vm_remove(&vm2, &NoEvents))
        .await
        .map_err(Error::internal)?;
    r?;
    ok(Done { done: true })
}
