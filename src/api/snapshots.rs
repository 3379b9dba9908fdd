//! `/vms/{vm}/snapshots`: list, create, revert, rename, delete — through the same code as the
//! CLI; the mutations are tasks.

use super::auth::Caller;
use super::jobs;
use super::openapi::{ErrorReply, TaskRef};
use super::{accepted, ok, ApiResult, Body, Shared};
use crate::auth::{authorize, Need, Principal};
use crate::jobs::snapshot::{Kind, Listed};
use crate::ops::SnapshotCreateRequest;
use crate::Error;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};

#[derive(Serialize, utoipa::ToSchema)]
pub struct SnapshotItem {
    pub vm: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    pub created_ms: u64,
    /// With memory (RAM and device state): revert resumes the VM where it was.
    pub stateful: bool,
    /// `internal` (qcow2) or `external` (an overlay).
    pub kind: String,
    /// Bytes (memory state, or overlay data); absent when QEMU does not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// `ok`, `missing` (QEMU no longer has it) or `vm not running`.
    pub state: String,
}

pub fn item(l: &Listed) -> SnapshotItem {
    let s = &l.snapshot;
    SnapshotItem {
        vm: s.vm.clone(),
        name: s.name.clone(),
        description: s.description.clone(),
        created: crate::timefmt::rfc3339(s.created_ms / 1000),
        created_ms: s.created_ms,
        stateful: s.memory,
        kind: if s.kind == Kind::Internal {
            "internal"
        } else {
            "external"
        }
        .into(),
        size: l.size,
        expires: s.expires_ms.map(|e| crate::timefmt::rfc3339(e / 1000)),
        state: l.state.clone(),
    }
}

fn check(p: &Principal, need: Need, vm: &str) -> ApiResult<()> {
    crate::names::check("VM", vm)?;
    Ok(authorize(p, need, Some(vm))?)
}

/// A VM's snapshots.
#[utoipa::path(get, path = "/api/v1/vms/{vm}/snapshots", tag = "snapshots", params(("vm" = String, Path)),
    responses((status = 200, body = [SnapshotItem]), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 404, body = ErrorReply)))]
pub async fn list(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
) -> ApiResult<Response> {
    check(&p, Need::Read, &vm)?;
    let app = s.appliance(&p);
    let v = tokio::task::spawn_blocking(move || app.snapshot_list(Some(&vm)))
        .await
        .map_err(Error::internal)??;
    ok(v.iter().map(item).collect::<Vec<_>>())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub name: String,
    /// Also save RAM and device state.
    #[serde(default)]
    pub memory: bool,
    /// Freeze the guest's filesystems around the snapshot.
    #[serde(default)]
    pub quiesce: bool,
    #[serde(default)]
    pub description: Option<String>,
    /// Lifespan, e.g. `12h`, `10d` [default: the VM's].
    #[serde(default)]
    pub ttl: Option<String>,
}

/// Take a snapshot (a task).
#[utoipa::path(post, path = "/api/v1/vms/{vm}/snapshots", tag = "snapshots", params(("vm" = String, Path)),
    request_body = SnapshotCreate,
    responses((status = 202, body = TaskRef), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply),
        (status = 413, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn create(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
    Body(b): Body<SnapshotCreate>,
) -> ApiResult<Response> {
    check(&p, Need::Operate, &vm)?;
    crate::jobs::snapshot::check_name(&b.name)?;
    let ttl = b
        .ttl
        .as_deref()
        .map(crate::jobs::vms::parse_duration)
        .transpose()
        .map_err(Error::Usage)?;
    let req = SnapshotCreateRequest {
        vms: vec![vm.clone()],
        name: b.name,
        memory: b.memory,
        quiesce: b.quiesce,
        description: b.description,
        ttl,
    };
    let r = jobs::start(&s, &p, false, move |app, ev| {
        app.snapshot_create(req, ev).map(|_| ())
    })
    .await;
    accepted(r?.task)
}

/// Return the VM to a snapshot (a task).
#[utoipa::path(post, path = "/api/v1/vms/{vm}/snapshots/{name}/revert", tag = "snapshots",
    params(("vm" = String, Path), ("name" = String, Path)),
    responses((status = 202, body = TaskRef), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply)))]
pub async fn revert(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((vm, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    check(&p, Need::Operate, &vm)?;
    crate::jobs::snapshot::check_name(&name)?;
    let (vm2, name2) = (vm.clone(), name.clone());
    let r = jobs::start(&s, &p, false, move |app, ev| {
        app.snapshot_revert(&vm2, &name2, ev).map(|_| ())
    })
    .await;
    accepted(r?.task)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRename {
    /// The new name.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub name: String,
}

/// Give a snapshot another name (a task).
#[utoipa::path(post, path = "/api/v1/vms/{vm}/snapshots/{name}/rename", tag = "snapshots",
    params(("vm" = String, Path), ("name" = String, Path)), request_body = SnapshotRename,
    responses((status = 202, body = TaskRef), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply),
        (status = 413, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn rename(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((vm, name)): Path<(String, String)>,
    Body(b): Body<SnapshotRename>,
) -> ApiResult<Response> {
    check(&p, Need::Operate, &vm)?;
    crate::jobs::snapshot::check_name(&name)?;
    crate::jobs::snapshot::check_name(&b.name)?;
    let (vm2, old) = (vm.clone(), name.clone());
    let r = jobs::start(&s, &p, false, move |app, ev| {
        app.snapshot_rename(&vm2, &old, &b.name, ev).map(|_| ())
    })
    .await;
    accepted(r?.task)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotClone {
    /// The new image: a file inside one of the restore directories (`[service] restore_dirs`).
    pub to: String,
    /// The disk (may be left out when the snapshot has one).
    #[serde(default)]
    pub disk: Option<String>,
    /// Default: qcow2 for a `.qcow2` name, else raw.
    #[serde(default)]
    pub format: Option<super::backups::RestoreFormat>,
    /// Overwrite an existing file (never an image in use or a container).
    #[serde(default)]
    pub force: bool,
}

/// Write a snapshot's disk state to a new image in a restore directory: a new server from
/// this snapshot (a task).
#[utoipa::path(post, path = "/api/v1/vms/{vm}/snapshots/{name}/clone", tag = "snapshots",
    params(("vm" = String, Path), ("name" = String, Path)), request_body = SnapshotClone,
    responses((status = 202, body = TaskRef), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply),
        (status = 413, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn clone(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((vm, name)): Path<(String, String)>,
    Body(b): Body<SnapshotClone>,
) -> ApiResult<Response> {
    check(&p, Need::Operate, &vm)?;
    crate::jobs::snapshot::check_name(&name)?;
    let req = crate::ops::SnapshotCloneRequest {
        vm,
        name,
        disk: b.disk,
        to: super::backups::confine(&b.to, &s.settings.restore_dirs)?,
        format: b.format.map(|f| match f {
            super::backups::RestoreFormat::Raw => "raw".to_string(),
            super::backups::RestoreFormat::Qcow2 => "qcow2".to_string(),
        }),
        force: b.force,
    };
    let r = jobs::start(&s, &p, false, move |app, ev| {
        app.snapshot_clone(&req, ev).map(|_| ())
    })
    .await;
    accepted(r?.task)
}

/// Delete a snapshot (a task).
#[utoipa::path(delete, path = "/api/v1/vms/{vm}/snapshots/{name}", tag = "snapshots",
    params(("vm" = String, Path), ("name" = String, Path)),
    responses((status = 202, body = TaskRef), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply)))]
pub async fn delete(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((vm, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    check(&p, Need::Operate, &vm)?;
    crate::jobs::snapshot::check_name(&name)?;
    let (vm2, name2) = (vm.clone(), name.clone());
    let r = jobs::start(&s, &p, false, move |app, ev| {
        app.snapshot_delete(&vm2, &name2, false, ev).map(|_| ())
    })
    .await;
    accepted(r?.task)
}
