//! The library API: every operation of the appliance as a function on [`Appliance`] that takes
//! a typed request and returns a typed result. The CLI is a thin layer over this (parse, call,
//! print), and so will the service be: neither holds job logic.
//!
//! What this layer owns, and the jobs below it do not:
//! - **tasks**: every operation that does work runs as a task ([`crate::task`]) with a durable
//!   record; the per-VM locks are taken here, before the job looks at the catalog;
//! - **requests**: checking what was asked (names, options that do not go together) before a
//!   task starts, so a malformed request leaves no record;
//! - **resolution**: `VM@ID` to a backup, a VM name to its declaration, a disk argument to a
//!   file, block device or NBD source.
//!
//! Queries (listings, `show`, `stats`, task records) are not tasks: they change nothing.

mod backup;
mod config;
mod data;
mod prune;
mod serve;
mod tasks;
mod vms;

pub use backup::{BackupReport, BackupRequest};
pub use data::{InitReport, InitRequest, RestoreRequest, S3Init, VerifyRequest};
pub use prune::{schedules, NextRun, PolicyShow, PruneReport, PruneRequest, VmPrune};
pub use serve::{CatRequest, ExportRequest, MountRequest, RestoreFilesRequest, UmountReport};
pub use tasks::TaskFilter;
pub use vms::{
    expire_error, DoctorReport, ExpireReport, SnapshotCloneRequest, SnapshotCreateRequest,
    VmAddRequest, VmList, VmRemoved,
};

use crate::jobs::vms::VmsFile;
use crate::repo::Repo;
use crate::task::{Cancel, Ctx, Events, Kind, Outcome, Task, TaskSpec};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One appliance: a repository directory, its configuration (the VMs), who is asking, and
/// how the asker stops a running operation.
pub struct Appliance {
    dir: PathBuf,
    config: PathBuf,
    user: String,
    cancel: Cancel,
    /// A bound on jobs at once (the service's): tasks wait for a slot, queued.
    slots: Option<crate::task::Slots>,
    /// What the store said that the caller should hear (backups whose manifests are gone or
    /// damaged), gathered while the repository was brought in step.
    warnings: std::sync::Mutex<Vec<String>>,
}

impl Appliance {
    /// The appliance at `dir`; `config` is the VM declarations (default `DIR/vms.toml`);
    /// `user` is recorded in task records (`cli:USER`, a service user).
    /// Every file the appliance creates is private to its user (umask 077, see
    /// [`crate::sys::private_files`]): this sets the process umask.
    pub fn new(dir: PathBuf, config: Option<PathBuf>, user: String) -> Appliance {
        crate::sys::private_files();
        let config = config.unwrap_or_else(|| dir.join("vms.toml"));
        Appliance {
            dir,
            config,
            user,
            cancel: Cancel::new(),
            slots: None,
            warnings: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Operations started through this handle stop (at safe points) once `cancel` fires.
    pub fn with_cancel(mut self, cancel: Cancel) -> Appliance {
        self.cancel = cancel;
        self
    }

    /// Jobs that do work wait, queued, for one of `slots` before they run.
    pub fn with_slots(mut self, slots: crate::task::Slots) -> Appliance {
        self.slots = Some(slots);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What stops this handle's operations (the CLI's signals, a service's shutdown).
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The repository, opened (not synced).
    fn open(&self) -> Result<Arc<Repo>> {
        tracing::debug!("opening the repository");
        let r = Repo::open(&self.dir).map(Arc::new)?;
        tracing::debug!("repository open");
        if r.tightened > 0 {
            crate::sys::lock(&self.warnings).push(format!(
                "{} was readable by other users: made {} files and directories private (0600, \
                 0700)",
                self.dir.display(),
                r.tightened
            ));
        }
        Ok(r)
    }

    /// The repository, opened and in step with its store. Backups whose manifests are gone
    /// from the store or damaged there become warnings ([`Appliance::take_warnings`]).
    fn open_synced(&self) -> Result<Arc<Repo>> {
        let repo = self.open()?;
        let report = repo.sync()?;
        crate::sys::lock(&self.warnings).extend(report.warnings());
        Ok(repo)
    }

    /// The warnings gathered so far (each once).
    pub fn take_warnings(&self) -> Vec<String> {
        let mut w = std::mem::take(&mut *crate::sys::lock(&self.warnings));
        w.dedup();
        w
    }

    fn vms_file(&self) -> Result<VmsFile> {
        VmsFile::load(&self.config)
    }

    /// Finished task records kept per VM (the config's `[tasks] keep`); a config that cannot
    /// be read falls back to the default here (the operation that needs it says why).
    fn task_keep(&self) -> usize {
        self.vms_file()
            .map(|f| f.task_keep())
            .unwrap_or(crate::task::DEFAULT_KEEP)
    }

    /// Run `job` as a task of `kind` on `vms`: lock them, record it, send its events to
    /// `events` and the record, and record how it ended. `summary` turns a result into the
    /// record's outcome.
    fn run<T>(
        &self,
        kind: Kind,
        vms: Vec<String>,
        target: String,
        events: &dyn Events,
        job: impl FnOnce(&Task, &Ctx) -> Result<T>,
        summary: impl FnOnce(&T) -> Outcome,
    ) -> Result<T> {
        self.run_spec(self.spec(kind, vms, target), events, job, summary)
    }

    /// A task spec that locks its VMs.
    fn spec(&self, kind: Kind, vms: Vec<String>, target: String) -> TaskSpec {
        TaskSpec {
            kind,
            vms,
            lock: true,
            target,
            output: None,
            user: self.user.clone(),
            keep: self.task_keep(),
        }
    }

    /// [`Appliance::run`] with a spec of the caller's (one that does not lock, say).
    fn run_spec<T>(
        &self,
        spec: TaskSpec,
        events: &dyn Events,
        job: impl FnOnce(&Task, &Ctx) -> Result<T>,
        summary: impl FnOnce(&T) -> Outcome,
    ) -> Result<T> {
        let kind = spec.kind;
        let task = Task::start(&self.dir, spec)?;
        // Queued before anyone hears of the task, so its first reading is the truth.
        let slot = self.try_slot(kind);
        if matches!(slot, Some(None)) {
            task.set_state(crate::task::State::Queued);
        }
        events.started(&task.id());
        let tee = crate::task::Tee(events, &task);
        let ctx = Ctx::new(&tee, self.cancel.clone(), task.started_ms());
        let result = match slot {
            None | Some(Some(_)) => job(&task, &ctx),
            Some(None) => match self.wait_slot(&task) {
                Ok(_slot) => job(&task, &ctx),
                Err(e) => Err(e),
            },
        };
        let outcome = match &result {
            Ok(v) => summary(v),
            Err(e) => Outcome {
                error: Some(e.to_body()),
                ..Outcome::default()
            },
        };
        events.outcome(&outcome);
        let record = task.finish(outcome);
        self.notify_end(&record);
        result
    }
}

impl Appliance {
    /// A job slot for a task of `kind` if one is free: None when no bound applies (no
    /// slots, or a server or config edit, which is not work that competes), Some(None) when
    /// the task must wait for one.
    fn try_slot(&self, kind: Kind) -> Option<Option<crate::task::Slot>> {
        let slots = self.slots.as_ref()?;
        if matches!(
            kind,
            Kind::Export | Kind::Mount | Kind::VmAdd | Kind::VmRemove | Kind::Forget
        ) {
            return None;
        }
        Some(slots.try_take())
    }

    /// Wait, queued, for a slot; running once it has one.
    fn wait_slot(&self, task: &Task) -> Result<crate::task::Slot> {
        let slots = self.slots.as_ref().expect("a bound applies");
        let slot = slots.take(&self.cancel).ok_or_else(|| Error::Cancelled {
            by: self.cancel.by().unwrap_or_else(|| "request".into()),
        })?;
        task.set_state(crate::task::State::Running);
        Ok(slot)
    }
}

impl Appliance {
    /// Queue the notification of a task that ended (kinds people are told about only).
    fn notify_end(&self, r: &crate::task::TaskRecord) {
        let kind = match r.kind {
            Kind::Backup => "backup",
            Kind::Restore | Kind::RestoreFiles => "restore",
            Kind::SnapshotCreate | Kind::SnapshotRevert | Kind::SnapshotDelete => "snapshot",
            Kind::Prune => "prune",
            Kind::Verify => "verify",
            Kind::Gc => "gc",
            _ => return,
        };
        let outcome = match (&r.state, &r.outcome.error) {
            (_, Some(e)) if kind == "verify" && e.code == "damaged" => "damage",
            (crate::task::State::Ok, _) => "ok",
            (crate::task::State::Cancelled, _) => "cancelled",
            _ => "failed",
        };
        let mut e = crate::notify::Event::new(kind, outcome, r.vms.clone());
        e.task = Some(r.id.clone());
        e.backup = r.outcome.backup.clone();
        e.summary = r.outcome.summary.clone();
        e.error_code = r.outcome.error.as_ref().map(|x| x.code.clone());
        e.error_message = r.outcome.error.as_ref().map(|x| x.message.clone());
        e.sizes = r.outcome.sizes.clone();
        e.duration_ms = r.ended_ms.map(|end| end.saturating_sub(r.started_ms));
        self.notify(&e);
    }

    /// Queue `e` for every target that wants it; a failure to queue is logged, never the
    /// operation's failure.
    pub fn notify(&self, e: &crate::notify::Event) {
        let Ok(file) = self.vms_file() else { return };
        if file.notify.target.is_empty() {
            return;
        }
        if let Err(x) = crate::notify::emit(&self.dir, &file.notify, e) {
            tracing::warn!("could not queue the notification {}: {x}", e.id);
        }
    }
}

/// An outcome with only a summary line.
fn summary(line: String) -> Outcome {
    Outcome {
        summary: Some(line),
        ..Outcome::default()
    }
}

/// `512M`, `4G`, `1T`, `0` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => 0,
            };
            (&t[..i], mul)
        }
        _ => (t, 1),
    };
    match num.parse::<u64>() {
        Ok(n) if mul > 0 => n
            .checked_mul(mul)
            .ok_or_else(|| Error::usage(format!("size {s:?} is too large"))),
        _ => Err(Error::usage(format!(
            "{s:?} is not a size; write e.g. 512M or 4G"
        ))),
    }
}

/// `NAME=VALUE` of a `--disk` argument; `what` names the value (`PATH`, `NODE`) in errors.
pub fn parse_named(s: &str, what: &str, example: &str) -> Result<(String, String)> {
    let (name, value) = s.split_once('=').ok_or_else(|| {
        Error::usage(format!(
            "--disk {s:?} must be NAME={what}, e.g. --disk {example}"
        ))
    })?;
    crate::names::check("disk", name)?;
    if value.is_empty() {
        let noun = if what == "NODE" { "node name" } else { "path" };
        return Err(Error::usage(format!(
            "--disk {s:?} has no {noun} after '='"
        )));
    }
    Ok((name.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4g").unwrap(), 4 << 30);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("123").unwrap(), 123);
        for bad in ["", "M", "1.5G", "12Q", "-1"] {
            assert_eq!(parse_size(bad).unwrap_err().code(), "usage", "{bad}");
        }
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn disk_arguments() {
        assert_eq!(
            parse_named("root=/a.img", "PATH", "").unwrap(),
            ("root".into(), "/a.img".into())
        );
        assert!(parse_named("root", "PATH", "")
            .unwrap_err()
            .to_string()
            .contains("must be NAME=PATH"));
        assert!(parse_named("root=", "NODE", "")
            .unwrap_err()
            .to_string()
            .contains("no node name"));
        assert_eq!(
            parse_named("a b=x", "PATH", "").unwrap_err().code(),
            "invalid-name"
        );
    }
}
