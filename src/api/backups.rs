//! `/vms/{vm}/backups`: list, show, create (a task), forget, protect, restore to a file in a
//! configured restore directory (a task), export over NBD (a task that serves until stopped),
//! verify (a task).

use super::auth::Caller;
use super::jobs;
use super::openapi::{Done, ErrorReply, TaskRef};
use super::{accepted, ok, ApiResult, Body, Shared};
use crate::auth::{authorize, Need, Principal};
use crate::error::What;
use crate::jobs::export::Listen;
use crate::ops::{BackupRequest, ExportRequest, RestoreRequest, VerifyRequest};
use crate::repo::Manifest;
use crate::task::NoEvents;
use crate::Error;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Serialize, utoipa::ToSchema)]
pub struct DiskItem {
    pub name: String,
    pub size: u64,
    pub data_bytes: u64,
    pub source: String,
    /// The QEMU dirty bitmap the next incremental backup reads (backups of running VMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BackupItem {
    pub vm: String,
    pub id: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub time_ms: u64,
    pub logical_bytes: u64,
    pub data_bytes: u64,
    /// Bytes this backup added to the store.
    pub new_stored_bytes: u64,
    pub protected: bool,
    /// Always `committed`: a backup is listed only once its manifest is written.
    pub state: String,
    pub disks: Vec<DiskItem>,
}

fn item(m: &Manifest, protected: bool) -> BackupItem {
    BackupItem {
        vm: m.vm.clone(),
        id: m.id.clone(),
        time: crate::timefmt::rfc3339(m.time),
        time_ms: m.time_ms,
        logical_bytes: m.stats.logical_bytes,
        data_bytes: m.stats.data_bytes,
        new_stored_bytes: m.stats.new_stored_bytes,
        protected,
        state: "committed".into(),
        disks: m
            .disks
            .iter()
            .map(|d| DiskItem {
                name: d.name.clone(),
                size: d.size,
                data_bytes: d.data_bytes,
                source: d.source.clone(),
                checkpoint: d.checkpoint.clone(),
            })
            .collect(),
    }
}

/// Check the names in a path and the caller's right; blocking work runs off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> ApiResult<T> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(Error::internal)??)
}

fn check(p: &Principal, need: Need, vm: &str) -> ApiResult<()> {
    crate::names::check("VM", vm)?;
    Ok(authorize(p, need, Some(vm))?)
}

/// A VM's backups, oldest first.
#[utoipa::path(get, path = "/api/v1/vms/{vm}/backups", tag = "backups", params(("vm" = String, Path)),
    responses((status = 200, body = [BackupItem]), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 404, body = ErrorReply)))]
pub async fn list(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
) -> ApiResult<Response> {
    check(&p, Need::Read, &vm)?;
    let app = s.appliance(&p);
    let v = blocking(move || {
        let ms = match app.backups(Some(&vm)) {
            Ok(ms) => ms,
            Err(Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let repo = crate::repo::Repo::open(app.dir())?;
        let protected = repo.protected(&vm)?;
        Ok(ms
            .iter()
            .map(|m| item(m, protected.contains(&m.id)))
            .collect::<Vec<_>>())
    })
    .await?;
    ok(v)
}

/// One backup.
#[utoipa::path(get, path = "/api/v1/vms/{vm}/backups/{id}", tag = "backups",
    params(("vm" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = BackupItem), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 404, body = ErrorReply)))]
pub async fn show(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((vm, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check(&p, Need::Read, &vm)?;
    let app = s.appliance(&p);
    let v = blocking(move || {
        let m = app.show(&format!("{vm}@{id}"))?;
        let repo = crate::repo::Repo::open(app.dir())?;
        let protected = repo.protected(&vm)?.contains(&m.id);
        Ok(item(&m, protected))
    })
    .await?;
    ok(v)
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupCreate {
    /// Disk name → raw image, block device or NBD URI on the appliance (admins only); none:
    /// the VM declared in QEMU.
    #[serde(default)]
    pub disks: Option<BTreeMap<String, String>>,
    /// Read every allocated extent, ignoring the dirty bitmap.
    #[serde(default)]
    pub full: bool,
    /// Freeze the guest's filesystems around the read point.
    #[serde(default)]
    pub quiesce: bool,
}

/// Start a backup (a task): the declared VM through QEMU, or (admins) disks given by path.
#[utoipa::path(post, path = "/api/v1/vms/{vm}/backups", tag = "backups", params(("vm" = String, Path)),
    request_body = BackupCreate,
    responses((status = 202, body = TaskRef), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply),
        (status = 413, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn create(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
    Body(b): Body<BackupCreate>,
) -> ApiResult<Response> {
    check(&p, Need::Operate, &vm)?;
    if b.disks.is_some() {
        // Paths on the appliance: reading any file there is an admin's right only.
        authorize(&p, Need::Admin, Some(&vm))?;
    } else {
        let file = s.vms_file()?;
        if !file.vm.contains_key(&vm) {
            return Err(Error::not_found(
                What::Vm,
                vm.clone(),
                format!("VM {vm} is not declared: back it up by its disks, or declare it first"),
            )
            .into());
        }
    }
    let req = BackupRequest {
        vm: vm.clone(),
        disks: b.disks.unwrap_or_default().into_iter().collect(),
        full: b.full,
        quiesce: b.quiesce,
        ..BackupRequest::default()
    };
    let r = jobs::start(&s, &p, false, move |app, ev| {
        app.backup(req, ev).map(|_| ())
    })
    .await;
    accepted(r?.task)
}

/// Forget a backup (refused while it is protected); gc then frees what only it used.
#[utoipa::path(delete, path = "/api/v1/vms/{vm}/backups/{id}", tag = "backups",
    params(("vm" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Done), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply)))]
pub async fn forget(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((vm, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    // Deleting a backup is not among an operator's rights: admins only.
    check(&p, Need::Admin, &vm)?;
    let app = s.appliance(&p);
    let spec = format!("{vm}@{id}");
    let r = blocking(move || app.forget(&spec, &NoEvents).map(|_| ())).await;
    r?;
    ok(Done { done: true })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Protect {
    pub protected: bool,
}

/// Protect a backup (no rule and no forget removes it), or unprotect it.
#[utoipa::path(put, path = "/api/v1/vms/{vm}/backups/{id}/protected", tag = "backups",
    params(("vm" = String, Path), ("id" = String, Path)), request_body = Protect,
    responses((status = 200, body = BackupItem), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 413, body = ErrorReply),
        (status = 422, body = ErrorReply)))]
pub async fn protect(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((vm, id)): Path<(String, String)>,
    Body(b): Body<Protect>,
) -> ApiResult<Response> {
    // Protecting makes nothing unsafe; unprotecting exposes a backup to forget and
    // retention, an admin's decision.
    check(
        &p,
        if b.protected {
            Need::Operate
        } else {
            Need::Admin
        },
        &vm,
    )?;
    let app = s.appliance(&p);
    let (vm2, id2) = (vm.clone(), id.clone());
    let r = blocking(move || {
        let m = app.show(&format!("{vm2}@{id2}"))?;
        let repo = crate::repo::Repo::open(app.dir())?;
        repo.set_protected(&m, b.protected)?;
        Ok(item(&m, b.protected))
    })
    .await;
    ok(r?)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    /// The disk (may be left out when the backup has one).
    #[serde(default)]
    pub disk: Option<String>,
    /// A file inside one of the configured restore directories (`[service] restore_dirs`).
    #[serde(default)]
    pub to: Option<String>,
    /// Instead of `to`: overwrite the declared VM's own disks with the backup (every disk, or
    /// `disk`). Refused while the VM runs; shut it down first.
    #[serde(default)]
    pub in_place: bool,
    /// Overwrite an existing file.
    #[serde(default)]
    pub force: bool,
    /// `raw` (the default, sparse) or `qcow2`: a new qcow2 image.
    #[serde(default)]
    pub format: Option<RestoreFormat>,
}

#[derive(Deserialize, Clone, Copy, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestoreFormat {
    Raw,
    Qcow2,
}

/// `to` when it lies inside one of `dirs` (after resolving links in its directory); its name
/// must be a plain file name.
pub fn confine(to: &str, dirs: &[PathBuf]) -> crate::Result<PathBuf> {
    if dirs.is_empty() {
        return Err(Error::Forbidden(
            "restores through the API need restore directories: set [service] restore_dirs".into(),
        ));
    }
    if to.chars().any(char::is_control) {
        return Err(Error::usage(format!(
            "{to:?}: a path with control characters"
        )));
    }
    let path = PathBuf::from(to);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let (Some(name), Some(parent)) = (name, path.parent()) else {
        return Err(Error::usage(format!("{to:?} is not a file path")));
    };
    if !path.is_absolute() || name == "." || name == ".." || name.starts_with('.') {
        return Err(Error::usage(format!(
            "{to:?}: give an absolute path to a file in a restore directory"
        )));
    }
    let real = parent.canonicalize().map_err(|_| {
        Error::not_found(
            What::Directory,
            parent.display().to_string(),
            format!("directory {} does not exist", parent.display()),
        )
    })?;
    let inside = dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| real.starts_with(&d));
    if !inside {
        return Err(Error::Forbidden(format!(
            "{to} is outside the restore directories ({})",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let target = real.join(&name);
    if target
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        return Err(Error::Forbidden(format!("{to} is a symbolic link")));
    }
    Ok(target)
}

/// Restore a disk of a backup to a file on the appliance (a task).
#[utoipa::path(post, path = "/api/v1/vms/{vm}/backups/{id}/restore", tag = "backups",
    params(("vm" = String, Path), ("id" = String, Path)), request_body = RestoreBody,
    responses((status = 202, body = TaskRef), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply),
        (status = 413, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn restore(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((vm, id)): Path<(String, String)>,
    Body(b): Body<RestoreBody>,
) -> ApiResult<Response> {
    check(&p, Need::Operate, &vm)?;
    let to = match (&b.to, b.in_place) {
        (Some(to), false) => confine(to, &s.settings.restore_dirs)?,
        (None, true) => PathBuf::new(),
        _ => {
            return Err(Error::InvalidBody(
                "the request body: give either `to` (a file in a restore directory) or \
                 `in_place: true`"
                    .into(),
            )
            .into())
        }
    };
    let req = RestoreRequest {
        spec: format!("{vm}@{id}"),
        disk: b.disk,
        to,
        force: b.force,
        format: b.format.map(|f| match f {
            RestoreFormat::Raw => "raw".to_string(),
            RestoreFormat::Qcow2 => "qcow2".to_string(),
        }),
        in_place: b.in_place,
    };
    let r = jobs::start(&s, &p, false, move |app, ev| {
        app.restore(&req, ev).map(|_| ())
    })
    .await;
    accepted(r?.task)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportBody {
    #[serde(default)]
    pub disk: Option<String>,
    /// Accept writes (into an overlay on the appliance, never the store).
    #[serde(default)]
    pub writable: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ExportReply {
    /// The export's task: cancel it to stop serving.
    pub task: String,
    /// `nbd+unix:///DISK?socket=PATH`
    pub uri: String,
}

/// Serve a backup's disk over NBD on a unix socket of the appliance until its task is
/// cancelled.
#[utoipa::path(post, path = "/api/v1/vms/{vm}/backups/{id}/export", tag = "backups",
    params(("vm" = String, Path), ("id" = String, Path)), request_body = ExportBody,
    responses((status = 200, body = ExportReply), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply),
        (status = 413, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn export(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((vm, id)): Path<(String, String)>,
    Body(b): Body<ExportBody>,
) -> ApiResult<Response> {
    check(&p, Need::Operate, &vm)?;
    let dir = s.dir.join("exports");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).map_err(|e| Error::internal(format!("no randomness: {e}")))?;
    let socket = dir.join(format!("{vm}-{}.sock", hex::encode(r)));
    let req = ExportRequest {
        spec: format!("{vm}@{id}"),
        disk: b.disk,
        listen: Listen::Unix(socket),
        writable: b.writable,
        keep_overlay: None,
        cache_bytes: 256 << 20,
        idle_timeout: None,
    };
    let r = jobs::start(&s, &p, true, move |app, ev| app.export(req, ev).map(|_| ())).await;
    let started = r?;
    let uri = started.serving.map(|sv| sv.at).unwrap_or_default();
    let mut reply = axum::Json(ExportReply {
        task: started.task.clone(),
        uri,
    })
    .into_response();
    reply
        .extensions_mut()
        .insert(super::audit::StartedTask(started.task));
    Ok(reply)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ExportItem {
    pub task: String,
    pub vm: String,
    /// What is served (`VM@ID disk NAME (read-only)`).
    pub target: String,
    /// Where, as the export's log says.
    pub uri: Option<String>,
}

/// The exports running now (that the caller may see).
#[utoipa::path(get, path = "/api/v1/exports", tag = "backups",
    responses((status = 200, body = [ExportItem]), (status = 401, body = ErrorReply)))]
pub async fn exports(State(s): State<Shared>, Caller(p): Caller) -> ApiResult<Response> {
    authorize(&p, Need::Read, None)?;
    let dir = s.dir.clone();
    let v = blocking(move || {
        Ok(crate::task::running(&dir)
            .into_iter()
            .filter(|t| t.kind == crate::task::Kind::Export)
            .filter(|t| t.vms.first().is_some_and(|vm| p.sees(vm)))
            .map(|t| ExportItem {
                uri: t
                    .log
                    .iter()
                    .find_map(|l| l.line.rsplit_once(" at ").map(|(_, u)| u.to_string())),
                task: t.id.clone(),
                vm: t.vms.first().cloned().unwrap_or_default(),
                target: t.target.clone(),
            })
            .collect::<Vec<_>>())
    })
    .await?;
    ok(v)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyBody {
    /// Check this percentage of the chunks (a stable sample) [default: 100].
    #[serde(default)]
    pub sample: Option<f64>,
}

/// Re-read and re-hash a VM's backups (a task; damage is its outcome's error).
#[utoipa::path(post, path = "/api/v1/vms/{vm}/verify", tag = "backups", params(("vm" = String, Path)),
    request_body = VerifyBody,
    responses((status = 202, body = TaskRef), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply),
        (status = 413, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn verify(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
    Body(b): Body<VerifyBody>,
) -> ApiResult<Response> {
    check(&p, Need::Operate, &vm)?;
    let req = VerifyRequest {
        spec: Some(vm.clone()),
        sample: b.sample.unwrap_or(100.0),
        repair: false,
    };
    let r = jobs::start(&s, &p, false, move |app, ev| {
        app.verify(&req, ev).map(|_| ())
    })
    .await;
    accepted(r?.task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_stay_inside_their_directories() {
        let d = tempfile::tempdir().unwrap();
        let ok_dir = d.path().join("restores");
        std::fs::create_dir(&ok_dir).unwrap();
        std::fs::create_dir(d.path().join("other")).unwrap();
        std::os::unix::fs::symlink(d.path().join("other"), ok_dir.join("link")).unwrap();
        let dirs = vec![ok_dir.clone()];
        let inside = format!("{}/a.img", ok_dir.display());
        assert_eq!(
            confine(&inside, &dirs).unwrap(),
            ok_dir.canonicalize().unwrap().join("a.img")
        );
        let code = |to: &str| confine(to, &dirs).unwrap_err().code();
        assert_eq!(
            code(&format!("{}/../other/a.img", ok_dir.display())),
            "forbidden"
        );
        assert_eq!(
            code(&format!("{}/link/a.img", ok_dir.display())),
            "forbidden"
        );
        assert_eq!(code("relative.img"), "usage");
        assert_eq!(code(&format!("{}/..", ok_dir.display())), "usage");
        assert_eq!(
            code(&format!("{}/nope/a.img", ok_dir.display())),
            "not-found"
        );
        assert_eq!(confine(&inside, &[]).unwrap_err().code(), "forbidden");
    }
}
