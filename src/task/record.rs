//! Task records: `tasks/<id>.json` in the repository directory, one per operation.
//!
//! Invariants:
//! - a record is replaced whole (temp file, rename): a reader sees one version or the next,
//!   never a mix; the final state is fsynced;
//! - a record that says `running` is believed only while its process (pid *and* start time,
//!   since pids are reused) is alive: otherwise it reads as `failed: process ended`;
//! - records are versioned; an unknown version or a damaged file is skipped by listings and
//!   named by `read`.

use super::events::{Level, Outcome};
use crate::error::{ErrorBody, What};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 1;
/// Log lines a record keeps (the newest).
pub const LOG_LINES: usize = 50;
/// Finished records kept per VM (and for tasks without a VM) unless configured.
pub const DEFAULT_KEEP: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Backup,
    Restore,
    RestoreFiles,
    Verify,
    Forget,
    Gc,
    Export,
    Mount,
    SnapshotCreate,
    SnapshotRevert,
    SnapshotRename,
    SnapshotClone,
    SnapshotDelete,
    SnapshotExpire,
    Prune,
    VmAdd,
    VmRemove,
    Doctor,
    CatalogRebuild,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Backup => "backup",
            Kind::Restore => "restore",
            Kind::RestoreFiles => "restore-files",
            Kind::Verify => "verify",
            Kind::Forget => "forget",
            Kind::Gc => "gc",
            Kind::Export => "export",
            Kind::Mount => "mount",
            Kind::SnapshotCreate => "snapshot-create",
            Kind::SnapshotRevert => "snapshot-revert",
            Kind::SnapshotRename => "snapshot-rename",
            Kind::SnapshotClone => "snapshot-clone",
            Kind::SnapshotDelete => "snapshot-delete",
            Kind::SnapshotExpire => "snapshot-expire",
            Kind::Prune => "prune",
            Kind::VmAdd => "vm-add",
            Kind::VmRemove => "vm-remove",
            Kind::Doctor => "doctor",
            Kind::CatalogRebuild => "catalog-rebuild",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for a job slot (the service runs a bounded number at once); its VMs are locked.
    Queued,
    Running,
    Ok,
    Failed,
    Cancelled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Ok => "ok",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Progress {
    /// The current phase (`backup`, `verify`, …); empty before the first.
    pub phase: String,
    pub done: u64,
    /// Bytes the phase will do (0: unknown).
    pub total: u64,
    /// `done / total` in percent, when the total is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

impl Progress {
    pub(crate) fn update_percent(&mut self) {
        self.percent = (self.total > 0).then(|| {
            (self.done.min(self.total) as f64 * 1000.0 / self.total as f64).floor() / 10.0
        });
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LogLine {
    /// The record's change counter when the line was added (the event id of live streams).
    #[serde(default)]
    pub seq: u64,
    pub ms: u64,
    pub level: Level,
    pub line: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TaskRecord {
    pub version: u32,
    pub id: String,
    /// Counts the record's changes: a live stream's event ids (resume after `Last-Event-ID`).
    #[serde(default)]
    pub seq: u64,
    pub kind: Kind,
    /// The VMs it works on (several for a group snapshot; none for gc).
    #[serde(default)]
    pub vms: Vec<String>,
    /// What it works on, for people: `web-01@20261122-101500 disk root → /tmp/root.img`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// The file or directory it writes outside the repository (restore, restore-files): where
    /// `holdfast doctor` looks for what a killed run left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "appliance", schema(value_type = Option<String>))]
    pub output: Option<std::path::PathBuf>,
    /// Who started it: `cli:USER`, or a service user.
    pub user: String,
    pub pid: u32,
    /// The process's start time (clock ticks since boot), to tell a reused pid apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    pub state: State,
    #[serde(default)]
    pub progress: Progress,
    #[serde(default)]
    pub log: Vec<LogLine>,
    #[serde(default)]
    pub outcome: Outcome,
}

impl TaskRecord {
    /// The record as it stands: a `running` record whose process is gone is `failed`.
    pub fn effective(mut self) -> TaskRecord {
        if self.is_running() && !crate::sys::process_alive(self.pid, self.pid_start) {
            self.state = State::Failed;
            self.outcome.error = Some(ErrorBody {
                code: "process-ended".into(),
                message: format!(
                    "process ended: pid {} died before the task finished (killed, or the \
                     machine restarted)",
                    self.pid
                ),
                details: serde_json::Value::Null,
            });
        }
        self
    }

    /// Queued or running: not ended.
    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running | State::Queued)
    }

    /// `VM` of a single-VM task, `a,b` for several, `-` for none.
    pub fn vms_label(&self) -> String {
        if self.vms.is_empty() {
            "-".into()
        } else {
            self.vms.join(",")
        }
    }

    /// The group the record is pruned in: its first VM, or "" for tasks without one.
    pub(crate) fn group(&self) -> &str {
        self.vms.first().map(String::as_str).unwrap_or("")
    }
}

pub fn tasks_dir(repo_dir: &Path) -> PathBuf {
    repo_dir.join("tasks")
}

pub(crate) fn record_path(repo_dir: &Path, id: &str) -> PathBuf {
    tasks_dir(repo_dir).join(format!("{id}.json"))
}

/// Task ids: `YYYYMMDD-HHMMSS-xxxxxx` (UTC start, then random), sortable by start.
pub fn check_id(id: &str) -> Result<()> {
    let ok = id.len() <= 40
        && !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "{id:?} is not a task id (like 20261201-101500-a1b2c3); `holdfast tasks` lists them"
        )))
    }
}

fn parse(path: &Path, raw: &[u8]) -> Result<TaskRecord> {
    let r: TaskRecord = serde_json::from_slice(raw).map_err(|e| {
        Error::damaged(
            "task record",
            format!("task record {} is damaged ({e}); remove it", path.display()),
        )
    })?;
    if r.version != VERSION {
        return Err(Error::damaged(
            "task record",
            format!(
                "task record {} has version {}; this holdfast reads version {VERSION}",
                path.display(),
                r.version
            ),
        ));
    }
    Ok(r)
}

/// One task (an id prefix works when it is unique), as it stands.
pub fn read(repo_dir: &Path, id: &str) -> Result<TaskRecord> {
    check_id(id)?;
    let path = record_path(repo_dir, id);
    match std::fs::read(&path) {
        Ok(raw) => return parse(&path, &raw).map(TaskRecord::effective),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
    }
    let hits: Vec<TaskRecord> = list(repo_dir)?
        .into_iter()
        .filter(|r| r.id.starts_with(id))
        .collect();
    match hits.len() {
        1 => Ok(hits.into_iter().next().expect("one")),
        0 => Err(Error::not_found(
            What::Task,
            id,
            format!("no task {id:?}; `holdfast tasks` lists them"),
        )),
        n => Err(Error::usage(format!(
            "{id:?} matches {n} tasks; give more of the id"
        ))),
    }
}

/// Every readable task record, oldest first, as it stands.
pub fn list(repo_dir: &Path) -> Result<Vec<TaskRecord>> {
    let dir = tasks_dir(repo_dir);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.ends_with(".json") || name.starts_with('.') {
            continue;
        }
        let path = e.path();
        // A record removed by pruning between the listing and the read is simply gone.
        let Ok(raw) = std::fs::read(&path) else {
            continue;
        };
        match parse(&path, &raw) {
            Ok(r) => out.push(r.effective()),
            Err(err) => tracing::warn!("{err}"),
        }
    }
    out.sort_by(|a, b| (a.started_ms, &a.id).cmp(&(b.started_ms, &b.id)));
    Ok(out)
}

/// Operations running now (their processes are alive).
pub fn running(repo_dir: &Path) -> Vec<TaskRecord> {
    list(repo_dir)
        .unwrap_or_default()
        .into_iter()
        .filter(TaskRecord::is_running)
        .collect()
}

/// Which finished records to delete so that each group keeps its newest `keep` (pure; the
/// records come oldest first). Running records are never chosen.
pub fn to_prune(records: &[TaskRecord], keep: usize) -> Vec<String> {
    let mut seen: std::collections::HashMap<&str, usize> = Default::default();
    let mut out = Vec::new();
    for r in records.iter().rev() {
        if r.is_running() {
            continue;
        }
        let n = seen.entry(r.group()).or_default();
        *n += 1;
        if *n > keep {
            out.push(r.id.clone());
        }
    }
    out
}

/// Delete the records beyond `keep` per group, and temp files of dead writers.
pub fn prune(repo_dir: &Path, keep: usize) -> Result<usize> {
    let records = list(repo_dir)?;
    let doomed = to_prune(&records, keep);
    for id in &doomed {
        let _ = std::fs::remove_file(record_path(repo_dir, id));
    }
    if let Ok(rd) = std::fs::read_dir(tasks_dir(repo_dir)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if crate::sys::temp_file_pid(&name).is_some_and(|p| !crate::sys::pid_alive(p)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(doomed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, vm: Option<&str>, state: State, ms: u64) -> TaskRecord {
        let (pid, pid_start) = crate::sys::this_process();
        TaskRecord {
            version: VERSION,
            id: id.into(),
            seq: 0,
            kind: Kind::Backup,
            vms: vm.into_iter().map(String::from).collect(),
            target: String::new(),
            output: None,
            user: "cli:test".into(),
            pid,
            pid_start,
            started_ms: ms,
            ended_ms: None,
            state,
            progress: Progress::default(),
            log: vec![],
            outcome: Outcome::default(),
        }
    }

    #[test]
    fn pruning_keeps_the_newest_per_vm_and_every_running_one() {
        let rs = vec![
            rec("a1", Some("a"), State::Ok, 1),
            rec("a2", Some("a"), State::Failed, 2),
            rec("b1", Some("b"), State::Ok, 3),
            rec("a3", Some("a"), State::Running, 4),
            rec("g1", None, State::Ok, 5),
            rec("a4", Some("a"), State::Ok, 6),
            rec("g2", None, State::Ok, 7),
        ];
        assert_eq!(to_prune(&rs, 1), vec!["g1", "a2", "a1"]);
        assert_eq!(to_prune(&rs, 2), vec!["a1"]);
        assert!(to_prune(&rs, 3).is_empty());
    }

    #[test]
    fn a_running_record_of_a_dead_process_reads_as_failed() {
        let mut r = rec("x", None, State::Running, 1);
        assert_eq!(r.clone().effective().state, State::Running);
        r.pid_start = r.pid_start.map(|s| s + 7);
        let e = r.effective();
        assert_eq!(e.state, State::Failed);
        assert_eq!(e.outcome.error.unwrap().code, "process-ended");
    }

    #[test]
    fn percent_is_floored_to_a_tenth() {
        let mut p = Progress {
            phase: "backup".into(),
            done: 2,
            total: 3,
            percent: None,
        };
        p.update_percent();
        assert_eq!(p.percent, Some(66.6));
        p.total = 0;
        p.update_percent();
        assert_eq!(p.percent, None);
    }
}
