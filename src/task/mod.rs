//! Tasks: every operation, whoever starts it (the CLI today, the service next), runs as a task
//! with a durable record that any process can read — what runs, how far it got, what it
//! logged, how it ended.
//!
//! - [`Task::start`] takes the per-VM locks (`locks/<vm>.lock`, `flock`ed for the life of the
//!   task and released by the kernel if the process dies; the file names the task), then
//!   writes the record `tasks/<id>.json` as `running`. A second operation on a VM fails at
//!   once with [`Error::Busy`] naming the first task, its pid and its progress.
//! - While the job runs, the [`Task`] is one of its [`Events`] sinks: progress, phase and log
//!   lines update the record in memory, and a flusher thread writes it at most 4 times a
//!   second (whole-file replace: crash-safe).
//! - [`Task::finish`] writes the outcome (fsynced), releases the locks and prunes old records.
//!   A task whose process died reads as `failed: process ended` ([`TaskRecord::effective`]).
//!
//! Jobs never take locks themselves: the layer that starts the task does, before the job
//! looks at the catalog (gc relies on a backup being visible as running before it reads).

mod cancel;
mod events;
mod record;
mod slots;

pub use cancel::Cancel;
pub use events::{Events, Level, NoEvents, Outcome, Serving, Tee};
pub use record::{
    check_id, list, prune, read, running, tasks_dir, to_prune, Kind, LogLine, Progress, State,
    TaskRecord, DEFAULT_KEEP, LOG_LINES, VERSION,
};
pub use slots::{Slot, Slots};

use crate::error::Busy;
use crate::sys::FileLock;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Least time between two writes of a running task's record.
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// What a job gets from the layer that runs it: where its events go, whether it was asked to
/// stop, and when its task started.
pub struct Ctx<'a> {
    pub events: &'a dyn Events,
    pub cancel: Cancel,
    /// Unix milliseconds when the task started (a backup is named after it).
    pub started_ms: u64,
}

impl<'a> Ctx<'a> {
    pub fn new(events: &'a dyn Events, cancel: Cancel, started_ms: u64) -> Ctx<'a> {
        Ctx {
            events,
            cancel,
            started_ms,
        }
    }

    /// A context for tests and internal callers: no events, never cancelled, started now.
    pub fn quiet() -> Ctx<'static> {
        Ctx::new(&NoEvents, Cancel::new(), crate::timefmt::now_millis())
    }

    /// `Err(Cancelled)` once someone asked the job to stop.
    pub fn check(&self) -> Result<()> {
        self.cancel.check()
    }

    pub fn info(&self, line: &str) {
        self.events.log(Level::Info, line);
    }

    pub fn warn(&self, line: &str) {
        self.events.log(Level::Warn, line);
    }
}

/// What a new task is.
pub struct TaskSpec {
    pub kind: Kind,
    /// The VMs it works on (it is listed under them).
    pub vms: Vec<String>,
    /// Lock the VMs for the task's life (false for readers: verify, export).
    pub lock: bool,
    pub target: String,
    /// The file or directory it writes outside the repository.
    pub output: Option<PathBuf>,
    pub user: String,
    /// Finished records to keep per VM when this one ends.
    pub keep: usize,
}

struct Live {
    rec: TaskRecord,
    dirty: bool,
    done: bool,
}

struct Shared {
    live: Mutex<Live>,
    cv: Condvar,
    path: PathBuf,
}

impl Shared {
    fn write(&self, rec: &TaskRecord, durable: bool) {
        let Ok(json) = serde_json::to_vec_pretty(rec) else {
            return;
        };
        if let Err(e) = crate::sys::write_atomic(&self.path, &json, durable) {
            tracing::warn!("cannot write task record {}: {e}", self.path.display());
        }
    }

    fn update(&self, f: impl FnOnce(&mut TaskRecord)) {
        let mut g = crate::sys::lock(&self.live);
        g.rec.seq += 1;
        f(&mut g.rec);
        g.dirty = true;
    }

    /// Write the record now, in this thread: a phase starting or reaching its total (a few
    /// times per task, so the rate bound holds) is on disk before the job goes on.
    fn write_now(&self) {
        let rec = {
            let mut g = crate::sys::lock(&self.live);
            if g.done {
                return;
            }
            g.dirty = false;
            g.rec.clone()
        };
        self.write(&rec, false);
    }

    /// Write the record whenever it changed, at most every [`FLUSH_EVERY`], until done.
    fn flush_loop(&self) {
        let mut g = crate::sys::lock(&self.live);
        while !g.done {
            if g.dirty {
                g.dirty = false;
                let rec = g.rec.clone();
                drop(g);
                self.write(&rec, false);
                g = crate::sys::lock(&self.live);
            }
            g = self
                .cv
                .wait_timeout_while(g, FLUSH_EVERY, |l| !l.done)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// A running task: its locks, its record, its flusher. Finish it with [`Task::finish`]; one
/// dropped unfinished (a panic) is recorded as failed.
pub struct Task {
    repo_dir: PathBuf,
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
    locks: Mutex<Vec<VmLock>>,
    keep: usize,
}

fn new_id(now_ms: u64) -> Result<String> {
    let mut r = [0u8; 3];
    getrandom::fill(&mut r).map_err(|e| Error::internal(format!("no randomness: {e}")))?;
    Ok(format!(
        "{}-{}",
        crate::timefmt::compact(now_ms / 1000),
        hex::encode(r)
    ))
}

impl Task {
    /// Lock the spec's VMs and record the task as running.
    pub fn start(repo_dir: &Path, spec: TaskSpec) -> Result<Task> {
        let dir = tasks_dir(repo_dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let started_ms = crate::timefmt::now_millis();
        let (pid, pid_start) = crate::sys::this_process();
        let mut id = new_id(started_ms)?;
        // Reserve the id (create_new): two tasks started in one second by chance.
        for _ in 0..8 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(record::record_path(repo_dir, &id))
            {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => id = new_id(started_ms)?,
                Err(e) => return Err(Error::io(format!("create a task in {}", dir.display()), e)),
            }
        }
        let path = record::record_path(repo_dir, &id);
        let mut locks = Vec::new();
        for vm in spec.vms.iter().filter(|_| spec.lock) {
            match VmLock::acquire(repo_dir, vm, &id) {
                Ok(l) => locks.push(l),
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            }
        }
        let rec = TaskRecord {
            version: VERSION,
            id,
            seq: 1,
            kind: spec.kind,
            vms: spec.vms,
            target: spec.target,
            output: spec.output,
            user: spec.user,
            pid,
            pid_start,
            started_ms,
            ended_ms: None,
            state: State::Running,
            progress: Progress::default(),
            log: Vec::new(),
            outcome: Outcome::default(),
        };
        let shared = Arc::new(Shared {
            live: Mutex::new(Live {
                rec: rec.clone(),
                dirty: false,
                done: false,
            }),
            cv: Condvar::new(),
            path,
        });
        shared.write(&rec, false);
        let s = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("holdfast-task".into())
            .spawn(move || s.flush_loop())
            .map_err(|e| Error::io("start the task record writer", e))?;
        Ok(Task {
            repo_dir: repo_dir.to_path_buf(),
            shared,
            flusher: Some(flusher),
            locks: Mutex::new(locks),
            keep: spec.keep,
        })
    }

    pub fn id(&self) -> String {
        crate::sys::lock(&self.shared.live).rec.id.clone()
    }

    pub fn started_ms(&self) -> u64 {
        crate::sys::lock(&self.shared.live).rec.started_ms
    }

    /// The record as it is now (in memory).
    pub fn record(&self) -> TaskRecord {
        crate::sys::lock(&self.shared.live).rec.clone()
    }

    /// Set the task's state while it runs (queued while it waits for a job slot).
    pub fn set_state(&self, state: State) {
        self.shared.update(|r| r.state = state);
        self.shared.write_now();
    }

    /// Also lock `vm` for this task, until [`Task::unlock_vm`] or the end (expiring the
    /// snapshots of many VMs locks each in turn).
    pub fn lock_vm(&self, vm: &str) -> Result<()> {
        let l = VmLock::acquire(&self.repo_dir, vm, &self.id())?;
        crate::sys::lock(&self.locks).push(l);
        self.shared.update(|r| {
            if !r.vms.iter().any(|v| v == vm) {
                r.vms.push(vm.to_string());
            }
        });
        Ok(())
    }

    pub fn unlock_vm(&self, vm: &str) {
        crate::sys::lock(&self.locks).retain(|l| l.vm != vm);
    }

    /// Record how the task ended (durably), release its locks, prune old records.
    pub fn finish(mut self, outcome: Outcome) -> TaskRecord {
        let state = match &outcome.error {
            None => State::Ok,
            Some(e) if e.code == "cancelled" => State::Cancelled,
            Some(_) => State::Failed,
        };
        self.end(state, outcome)
    }

    fn end(&mut self, state: State, outcome: Outcome) -> TaskRecord {
        let rec = {
            let mut g = crate::sys::lock(&self.shared.live);
            g.rec.seq += 1;
            // The log ends with how the task ended, for people reading it (or its stream).
            let last = match (&outcome.error, &outcome.summary) {
                (Some(e), _) => Some((Level::Error, e.message.clone())),
                (None, Some(s)) => Some((Level::Info, s.clone())),
                (None, None) => None,
            };
            if let Some((level, line)) = last {
                let seq = g.rec.seq;
                g.rec.log.push(LogLine {
                    seq,
                    ms: crate::timefmt::now_millis(),
                    level,
                    line,
                });
                let extra = g.rec.log.len().saturating_sub(LOG_LINES);
                g.rec.log.drain(..extra);
                g.rec.seq += 1; // the record's seq stays above its lines' (stream ids)
            }
            g.rec.state = state;
            g.rec.ended_ms = Some(crate::timefmt::now_millis());
            g.rec.outcome = outcome;
            g.done = true;
            g.dirty = false;
            g.rec.clone()
        };
        self.shared.cv.notify_all();
        if let Some(f) = self.flusher.take() {
            let _ = f.join();
        }
        self.shared.write(&rec, true);
        crate::sys::lock(&self.locks).clear();
        if let Err(e) = prune(&self.repo_dir, self.keep) {
            tracing::warn!("pruning task records: {e}");
        }
        rec
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if self.flusher.is_some() {
            let error = Error::internal("the task ended without an outcome (a panic?)");
            let outcome = Outcome {
                error: Some(error.to_body()),
                ..Outcome::default()
            };
            self.end(State::Failed, outcome);
        }
    }
}

impl Events for Task {
    fn phase(&self, name: &str, total: u64) {
        self.shared.update(|r| {
            r.progress = Progress {
                phase: name.to_string(),
                done: 0,
                total,
                percent: None,
            };
            r.progress.update_percent();
        });
        self.shared.write_now();
    }

    fn progress(&self, bytes: u64) {
        let mut complete = false;
        self.shared.update(|r| {
            let before = r.progress.done;
            r.progress.done = r.progress.done.saturating_add(bytes);
            r.progress.update_percent();
            complete = r.progress.total > 0
                && before < r.progress.total
                && r.progress.done >= r.progress.total;
        });
        if complete {
            self.shared.write_now();
        }
    }

    fn log(&self, level: Level, line: &str) {
        self.shared.update(|r| {
            r.log.push(LogLine {
                seq: r.seq,
                ms: crate::timefmt::now_millis(),
                level,
                line: line.to_string(),
            });
            if r.log.len() > LOG_LINES {
                let extra = r.log.len() - LOG_LINES;
                r.log.drain(..extra);
            }
            // Above every line's: a stream sends a line, then the state, with rising ids.
            r.seq += 1;
        });
    }

    fn serving(&self, s: &Serving) {
        self.log(Level::Info, &format!("serving {} at {}", s.what, s.at));
    }
}

/// One operation at a time per VM: `locks/<vm>.lock`, `flock`ed, naming the task that holds it.
pub struct VmLock {
    _file: FileLock,
    vm: String,
}

fn locks_dir(repo_dir: &Path) -> PathBuf {
    repo_dir.join("locks")
}

impl VmLock {
    pub fn acquire(repo_dir: &Path, vm: &str, task_id: &str) -> Result<VmLock> {
        crate::names::check("VM", vm)?;
        let dir = locks_dir(repo_dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let path = dir.join(format!("{vm}.lock"));
        let lock = FileLock::try_acquire(&path)
            .map_err(|e| Error::io(format!("lock {}", path.display()), e))?;
        let Some(mut file) = lock else {
            return Err(busy_vm(repo_dir, vm, &path));
        };
        file.set_contents(task_id.as_bytes())
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        Ok(VmLock {
            _file: file,
            vm: vm.to_string(),
        })
    }
}

fn human(b: u64) -> String {
    indicatif::HumanBytes(b).to_string()
}

/// The busy error for `vm`, naming the task that holds its lock.
fn busy_vm(repo_dir: &Path, vm: &str, lock_path: &Path) -> Error {
    let holder = std::fs::read_to_string(lock_path)
        .ok()
        .and_then(|id| read(repo_dir, id.trim()).ok())
        .filter(TaskRecord::is_running);
    let Some(t) = holder else {
        return Error::Busy(Box::new(Busy {
            vm: Some(vm.into()),
            operation: "unknown".into(),
            task: None,
            pid: None,
            percent: None,
            message: format!(
                "VM {vm} is busy: another operation is starting; wait for it to finish, then retry"
            ),
        }));
    };
    let p = &t.progress;
    let pct = p
        .percent
        .map(|x| format!(", {x:.0}% done ({} of {})", human(p.done), human(p.total)))
        .unwrap_or_default();
    let message = format!(
        "VM {vm} is busy: a {} (pid {}, task {}, started {}{pct}) is running; wait for it to \
         finish (`holdfast task {} --follow`), then retry",
        t.kind.name(),
        t.pid,
        t.id,
        crate::timefmt::rfc3339(t.started_ms / 1000),
        t.id
    );
    Error::Busy(Box::new(Busy {
        vm: Some(vm.into()),
        operation: t.kind.name().into(),
        task: Some(t.id.clone()),
        pid: Some(t.pid),
        percent: p.percent.map(|x| x as u8),
        message,
    }))
}

/// Refuse when any task runs in this repository (`catalog rebuild` needs it quiet).
pub fn refuse_if_running(repo_dir: &Path, what: &str) -> Result<()> {
    let Some(t) = running(repo_dir).into_iter().next() else {
        return Ok(());
    };
    Err(Error::Busy(Box::new(Busy {
        vm: t.vms.first().cloned(),
        operation: t.kind.name().into(),
        task: Some(t.id.clone()),
        pid: Some(t.pid),
        percent: t.progress.percent.map(|x| x as u8),
        message: format!(
            "a {} of {} (pid {}, task {}) is running; {what} when no holdfast operation runs",
            t.kind.name(),
            t.vms_label(),
            t.pid,
            t.id
        ),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: Kind, vms: &[&str]) -> TaskSpec {
        TaskSpec {
            kind,
            vms: vms.iter().map(|s| s.to_string()).collect(),
            lock: true,
            target: String::new(),
            output: None,
            user: "cli:test".into(),
            keep: 2,
        }
    }

    /// The record of task `id` once `ok` holds for it (within 5 s: the flusher writes 4 times a
    /// second).
    fn wait_for(dir: &Path, id: &str, ok: impl Fn(&TaskRecord) -> bool) -> TaskRecord {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = read(dir, id).unwrap();
            if ok(&r) {
                return r;
            }
            assert!(std::time::Instant::now() < deadline, "never written: {r:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_second_task_on_a_vm_is_refused_with_the_first_one_named() {
        let d = tempfile::tempdir().unwrap();
        let a = Task::start(d.path(), spec(Kind::Backup, &["vm1"])).unwrap();
        a.phase("backup", 200);
        a.progress(50);
        wait_for(d.path(), &a.id(), |r| r.progress.done == 50);
        let e = Task::start(d.path(), spec(Kind::Restore, &["vm1"]))
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(msg.starts_with("VM vm1 is busy: a backup (pid"), "{msg}");
        assert!(msg.contains("25% done"), "{msg}");
        assert_eq!(e.code(), "busy");
        assert_eq!(e.exit_code(), 4);
        let other = Task::start(d.path(), spec(Kind::Backup, &["vm2"])).unwrap();
        assert_eq!(running(d.path()).len(), 2);
        other.finish(Outcome::default());
        let id = a.id();
        let done = a.finish(Outcome {
            backup: Some("vm1@x".into()),
            ..Outcome::default()
        });
        assert_eq!(done.state, State::Ok);
        let back = read(d.path(), &id).unwrap();
        assert_eq!(back.state, State::Ok);
        assert_eq!(back.progress.done, 50);
        assert_eq!(back.outcome.backup.as_deref(), Some("vm1@x"));
        assert!(Task::start(d.path(), spec(Kind::Restore, &["vm1"])).is_ok());
    }

    #[test]
    fn progress_reaches_the_file_within_a_flush_and_old_records_are_pruned() {
        let d = tempfile::tempdir().unwrap();
        let t = Task::start(d.path(), spec(Kind::Verify, &[])).unwrap();
        t.phase("verify", 1000);
        t.progress(400);
        t.log(Level::Warn, "a note");
        let id = t.id();
        let r = wait_for(d.path(), &id, |r| r.progress.done == 400);
        assert_eq!(r.log[0].line, "a note");
        let err = Error::usage("bad");
        t.finish(Outcome {
            error: Some(err.to_body()),
            ..Outcome::default()
        });
        assert_eq!(read(d.path(), &id).unwrap().state, State::Failed);
        for _ in 0..3 {
            Task::start(d.path(), spec(Kind::Gc, &[]))
                .unwrap()
                .finish(Outcome::default());
        }
        assert_eq!(
            list(d.path()).unwrap().len(),
            2,
            "keep = 2 for tasks without a VM"
        );
    }
}
