//! Retention: which backups a VM's policy keeps, applied now (`prune`), before a backup (a
//! VM whose slots are full and whose policy refuses), and after one commits (rotation).

use super::{summary, Appliance};
use crate::jobs::vms::VmsFile;
use crate::policy::{self, Decision, Effective, OnFull, Retention};
use crate::repo::{Manifest, Repo};
use crate::task::{Ctx, Events, Kind};
use crate::{Error, Result};
use serde::Serialize;

#[derive(Clone, Debug, Default)]
pub struct PruneRequest {
    /// One VM (default: every VM with backups).
    pub vm: Option<String>,
    /// Say what would go; remove nothing.
    pub dry_run: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VmPrune {
    pub vm: String,
    pub retention: Retention,
    /// Every backup, newest first, with what the rule decided and why.
    pub decisions: Vec<Decision>,
    /// `VM@ID` of the backups removed (or that would be, with --dry-run).
    pub removed: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PruneReport {
    pub dry_run: bool,
    pub vms: Vec<VmPrune>,
}

/// What `vm`'s rule decides for its backups now.
fn plan(repo: &Repo, vm: &str, eff: &Effective, file: &VmsFile) -> Result<VmPrune> {
    let tz = file.policy.zone().map_err(Error::Usage)?;
    let protected = repo.protected(vm)?;
    let items: Vec<policy::Item> = repo
        .manifests(Some(vm))?
        .iter()
        .map(|m| policy::Item {
            id: m.id.clone(),
            time_ms: if m.time_ms > 0 {
                m.time_ms
            } else {
                m.time * 1000
            },
            protected: protected.contains(&m.id),
        })
        .collect();
    let decisions = policy::retain(&items, &eff.retention, &tz);
    let removed = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| format!("{vm}@{}", d.id))
        .collect();
    Ok(VmPrune {
        vm: vm.to_string(),
        retention: eff.retention.clone(),
        decisions,
        removed,
    })
}

/// Forget what `p` removes; returns `VM@ID` of each.
fn apply(repo: &Repo, p: &VmPrune, ctx: &Ctx) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    for d in p.decisions.iter().filter(|d| !d.keep) {
        ctx.check()?;
        let m = repo.resolve(&format!("{}@{}", p.vm, d.id))?;
        crate::jobs::gc::forget(repo, &m)?;
        ctx.info(&format!("removed {}@{} ({})", p.vm, d.id, d.reason));
        gone.push(format!("{}@{}", p.vm, d.id));
    }
    Ok(gone)
}

/// Before a backup of `vm`: refused when its slots are full and its policy refuses (or
/// every backup in them is protected, so rotation could free none).
pub(super) fn check_slots(repo: &Repo, vm: &str, eff: &Effective, scheduled: bool) -> Result<()> {
    let Retention::Slots(n) = eff.retention else {
        return Ok(());
    };
    let ms = repo.manifests(Some(vm))?;
    if ms.len() < n as usize {
        return Ok(());
    }
    let protected = repo.protected(vm)?;
    let used: Vec<String> = ms.iter().rev().map(|m| m.id.clone()).collect();
    let full = |message: String| Error::SlotsFull {
        vm: vm.to_string(),
        slots: u64::from(n),
        used: used.clone(),
        message,
    };
    match eff.on_full(scheduled) {
        OnFull::Refuse => Err(full(format!(
            "VM {vm} has all {n} backup slots in use ({}): forget one (`holdfast forget \
             {vm}@{}`), raise backup.slots in the policy, or set backup.on_full = \"rotate\"",
            used.join(", "),
            used.last().map_or("ID", String::as_str)
        ))),
        OnFull::Rotate if ms.iter().all(|m| protected.contains(&m.id)) => Err(full(format!(
            "VM {vm} has all {n} backup slots in use and every backup in them is protected \
             ({}): unprotect one or raise backup.slots in the policy",
            used.join(", ")
        ))),
        OnFull::Rotate => Ok(()),
    }
}

/// After a backup of `vm` committed: apply its rule (slots rotate only where the policy
/// rotates). Returns what went.
pub(super) fn after_commit(
    repo: &Repo,
    file: &VmsFile,
    m: &Manifest,
    scheduled: bool,
    ctx: &Ctx,
) -> Result<Vec<String>> {
    let eff = file.policy.effective(&m.vm);
    if matches!(eff.retention, Retention::Slots(_)) && eff.on_full(scheduled) == OnFull::Refuse {
        return Ok(Vec::new());
    }
    let p = plan(repo, &m.vm, &eff, file)?;
    if p.decisions.iter().any(|d| d.id == m.id && !d.keep) {
        // Cannot happen (the newest is always kept); never remove what was just made.
        return Err(Error::internal(format!(
            "retention would remove the backup {}@{} just made",
            m.vm, m.id
        )));
    }
    apply(repo, &p, ctx)
}

impl Appliance {
    /// Apply the retention rules now (or say what they would do, with `dry_run`).
    pub fn prune(&self, req: PruneRequest, events: &dyn Events) -> Result<PruneReport> {
        if let Some(v) = &req.vm {
            crate::names::check("VM", v)?;
        }
        let file = self.vms_file()?;
        let repo = self.open_synced()?;
        let vms: Vec<String> = match &req.vm {
            Some(v) => {
                if repo.manifests(Some(v))?.is_empty() {
                    return Err(Error::not_found(
                        crate::error::What::Backup,
                        v,
                        format!("no backups of VM {v:?} to prune"),
                    ));
                }
                vec![v.clone()]
            }
            None => {
                let mut v: Vec<String> = repo.manifests(None)?.into_iter().map(|m| m.vm).collect();
                v.dedup();
                v
            }
        };
        if req.dry_run {
            let vms = vms
                .iter()
                .map(|v| plan(&repo, v, &file.policy.effective(v), &file))
                .collect::<Result<_>>()?;
            return Ok(PruneReport { dry_run: true, vms });
        }
        let target = req.vm.clone().unwrap_or_else(|| "every VM".into());
        self.run_spec(
            crate::task::TaskSpec {
                lock: false,
                ..self.spec(Kind::Prune, Vec::new(), target)
            },
            events,
            |task, ctx| {
                let mut out = Vec::new();
                for v in &vms {
                    task.lock_vm(v)?;
                    let mut p = plan(&repo, v, &file.policy.effective(v), &file)?;
                    p.removed = apply(&repo, &p, ctx)?;
                    task.unlock_vm(v);
                    out.push(p);
                }
                Ok(PruneReport {
                    dry_run: false,
                    vms: out,
                })
            },
            |r| {
                let n: usize = r.vms.iter().map(|v| v.removed.len()).sum();
                summary(format!("pruned {n} backup(s) of {} VM(s)", r.vms.len()))
            },
        )
    }
}

/// One schedule and when it fires next.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NextRun {
    /// `backup web-01`, `snapshot web-01`, `group db`, `gc`, `verify`.
    pub what: String,
    pub schedule: String,
    /// RFC 3339 (UTC); None: the expression names no future time.
    pub next: Option<String>,
}

/// `policy show [VM]`: the configured policy, one VM's effective one, and what runs next.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PolicyShow {
    pub config: policy::PolicyConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<Effective>,
    pub next: Vec<NextRun>,
}

/// Every schedule of the config as (what, VM or group, expression), defaults included.
pub fn schedules(file: &VmsFile) -> Vec<(String, String)> {
    let p = &file.policy;
    let mut vms: Vec<&String> = file.vm.keys().chain(p.vm.keys()).collect();
    vms.sort();
    vms.dedup();
    let mut out = Vec::new();
    for v in vms {
        let e = p.effective(v);
        if let Some(s) = e.backup_schedule {
            out.push((format!("backup {v}"), s));
        }
        if let Some(s) = e.snapshot_schedule {
            out.push((format!("snapshot {v}"), s));
        }
    }
    for (g, s) in &p.group {
        out.push((format!("group {g}"), s.schedule.clone()));
    }
    out.push((
        "gc".into(),
        p.gc.schedule
            .clone()
            .unwrap_or_else(|| policy::DEFAULT_GC.into()),
    ));
    out.push((
        "verify".into(),
        p.verify
            .schedule
            .clone()
            .unwrap_or_else(|| policy::DEFAULT_VERIFY.into()),
    ));
    out
}

impl Appliance {
    pub fn policy_show(&self, vm: Option<&str>) -> Result<PolicyShow> {
        if let Some(v) = vm {
            crate::names::check("VM", v)?;
        }
        let file = self.vms_file()?;
        let tz = file.policy.zone().map_err(Error::Usage)?;
        let now = jiff::Timestamp::now();
        let next = schedules(&file)
            .into_iter()
            .filter(|(what, _)| {
                vm.is_none_or(|v| {
                    what == &format!("backup {v}") || what == &format!("snapshot {v}")
                })
            })
            .map(|(what, schedule)| {
                let next = crate::calendar::Calendar::parse(&schedule)
                    .ok()
                    .and_then(|c| c.next_after(now, &tz))
                    .map(|t| crate::timefmt::rfc3339(t.as_second().max(0) as u64));
                NextRun {
                    what,
                    schedule,
                    next,
                }
            })
            .collect();
        Ok(PolicyShow {
            vm: vm.map(|v| file.policy.effective(v)),
            config: file.policy,
            next,
        })
    }
}
