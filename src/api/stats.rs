//! `/stats` (the repository: logical, stored, dedup, cost), `/vms/{vm}/stats` (a VM, each of
//! its backups with what it alone would free, its snapshots), and `/gc`.

use super::auth::Caller;
use super::jobs;
use super::openapi::{ErrorReply, TaskRef};
use super::snapshots::SnapshotItem;
use super::{ok, ApiResult, Shared};
use crate::auth::{authorize, Need, Principal, Role};
use crate::Error;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Serialize;

#[derive(Serialize, utoipa::ToSchema)]
pub struct BackupStat {
    pub id: String,
    pub logical_bytes: u64,
    pub data_bytes: u64,
    /// Stored bytes only this backup uses: what forgetting it (then gc) frees.
    pub exclusive_bytes: u64,
    pub cost_per_month: f64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VmStats {
    pub vm: String,
    pub backups: u64,
    pub logical_bytes: u64,
    /// Stored bytes only this VM's backups use.
    pub exclusive_bytes: u64,
    pub cost_per_month: f64,
    pub price_per_gb_month: f64,
    pub per_backup: Vec<BackupStat>,
    pub snapshots: Vec<SnapshotItem>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TotalStats {
    pub vms: u64,
    pub backups: u64,
    pub logical_bytes: u64,
    pub data_bytes: u64,
    /// All packs (chunks, metadata, footers); for a non-admin, what their VMs alone use.
    pub stored_bytes: u64,
    /// data / unique (admins; 0 otherwise).
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
    pub price_per_gb_month: f64,
    pub cost_per_month: f64,
}

fn cost(bytes: u64, price: f64) -> f64 {
    bytes as f64 / 1e9 * price
}

/// The repository as a whole (admins), or the sum of the caller's VMs.
#[utoipa::path(get, path = "/api/v1/stats", tag = "stats",
    responses((status = 200, body = TotalStats), (status = 401, body = ErrorReply)))]
pub async fn total(State(s): State<Shared>, Caller(p): Caller) -> ApiResult<Response> {
    authorize(&p, Need::Read, None)?;
    let price = s.price();
    let app = s.appliance(&p);
    let v = tokio::task::spawn_blocking(move || -> crate::Result<TotalStats> {
        if p.role == Role::Admin {
            let st = app.stats(price)?;
            return Ok(TotalStats {
                vms: st.vms,
                backups: st.backups,
                logical_bytes: st.logical_bytes,
                data_bytes: st.data_bytes,
                stored_bytes: st.stored_bytes,
                dedup_ratio: st.dedup_ratio,
                compression_ratio: st.compression_ratio,
                price_per_gb_month: price,
                cost_per_month: st.cost_per_month,
            });
        }
        let repo = crate::repo::Repo::open(app.dir())?;
        repo.sync()?;
        let u = crate::jobs::stats::usage(&repo)?;
        let mine: Vec<_> = u.vms.iter().filter(|v| p.sees(&v.vm)).collect();
        let data = u
            .backups
            .iter()
            .filter(|b| p.sees(&b.vm))
            .map(|b| b.data_bytes)
            .sum();
        let stored = mine.iter().map(|v| v.exclusive_bytes).sum();
        Ok(TotalStats {
            vms: mine.len() as u64,
            backups: mine.iter().map(|v| v.backups).sum(),
            logical_bytes: mine.iter().map(|v| v.logical_bytes).sum(),
            data_bytes: data,
            stored_bytes: stored,
            dedup_ratio: 0.0,
            compression_ratio: 0.0,
            price_per_gb_month: price,
            cost_per_month: cost(stored, price),
        })
    })
    .await
    .map_err(Error::internal)??;
    ok(v)
}

fn vm_stats(s: &Shared, p: &Principal, vm: &str) -> crate::Result<VmStats> {
    let price = s.price();
    let app = s.appliance(p);
    let repo = crate::repo::Repo::open(app.dir())?;
    repo.sync()?;
    let u = crate::jobs::stats::usage(&repo)?;
    let mine = u.vms.iter().find(|v| v.vm == vm);
    if mine.is_none() && !s.vms_file().map_err(|e| e.0)?.vm.contains_key(vm) {
        return Err(Error::not_found(
            crate::error::What::Vm,
            vm,
            format!("no VM {vm:?}"),
        ));
    }
    let snapshots = match app.snapshot_list(Some(vm)) {
        Ok(l) => l.iter().map(super::snapshots::item).collect(),
        Err(_) => Vec::new(),
    };
    let exclusive = mine.map_or(0, |v| v.exclusive_bytes);
    Ok(VmStats {
        vm: vm.to_string(),
        backups: mine.map_or(0, |v| v.backups),
        logical_bytes: mine.map_or(0, |v| v.logical_bytes),
        exclusive_bytes: exclusive,
        cost_per_month: cost(exclusive, price),
        price_per_gb_month: price,
        per_backup: u
            .backups
            .iter()
            .filter(|b| b.vm == vm)
            .map(|b| BackupStat {
                id: b.id.clone(),
                logical_bytes: b.logical_bytes,
                data_bytes: b.data_bytes,
                exclusive_bytes: b.exclusive_bytes,
                cost_per_month: cost(b.exclusive_bytes, price),
            })
            .collect(),
        snapshots,
    })
}

/// A VM: its backups (each with what it alone would free) and snapshots, and their cost.
#[utoipa::path(get, path = "/api/v1/vms/{vm}/stats", tag = "stats", params(("vm" = String, Path)),
    responses((status = 200, body = VmStats), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 404, body = ErrorReply)))]
pub async fn vm(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(vm): Path<String>,
) -> ApiResult<Response> {
    crate::names::check("VM", &vm)?;
    authorize(&p, Need::Read, Some(&vm))?;
    let v = tokio::task::spawn_blocking(move || vm_stats(&s, &p, &vm))
        .await
        .map_err(Error::internal)??;
    ok(v)
}

/// Free what no backup uses (a task; admins).
#[utoipa::path(post, path = "/api/v1/gc", tag = "stats",
    responses((status = 202, body = TaskRef), (status = 401, body = ErrorReply),
        (status = 403, body = ErrorReply), (status = 409, body = ErrorReply)))]
pub async fn gc(State(s): State<Shared>, Caller(p): Caller) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    let r = jobs::start(&s, &p, false, |app, ev| app.gc(false, ev).map(|_| ())).await;
    super::accepted(r?.task)
}
