//! The scheduler of `holdfast serve`: policies that run by themselves. Once a second it
//! looks at every schedule of the config (backups, snapshots, group snapshots, gc, verify)
//! and starts what is due through the same job path as the API (the global job limit, the
//! per-VM lock); every 10 seconds it removes expired snapshots; it delivers the notification
//! outbox.
//!
//! Invariants:
//! - a schedule's slot is recorded as handled (`REPO/schedule.json`, fsynced) *before* its job
//!   starts, so a crash never runs one slot twice; runs missed while the service was down run
//!   once at start (like anacron), not once per missed slot;
//! - a run that finds its VM busy waits, shown as `queued` (`GET /schedule`), and is tried
//!   again every second until it starts: never dropped;
//! - a run that fails before its task exists (a VM's QMP socket gone, a bad source) still
//!   sends its failed event; a snapshot run refused by the VM's limit sends "skipped".

use super::{jobs, Shared};
use crate::calendar::Calendar;
use crate::jobs::vms::VmsFile;
use crate::notify::Event;
use crate::ops::{Appliance, BackupRequest, SnapshotCreateRequest, VerifyRequest};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often expired snapshots are looked for (at most a minute, per the policy's promise).
const SWEEP: Duration = Duration::from_secs(10);

/// One schedule's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Entry {
    /// The expression this state is for (a changed expression starts afresh).
    pub schedule: String,
    /// Unix seconds up to which every slot is handled.
    pub handled: u64,
    /// A run that is due but waits (its VM busy): since when, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<Queued>,
    /// The task of the last run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_task: Option<String>,
    /// How the last attempt to start went, when it did not (`busy: …`, an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Queued {
    pub since: u64,
    pub why: String,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("schedule.json")
}

/// The schedules' state (an unreadable file starts afresh, with a warning).
pub fn load_state(dir: &Path) -> BTreeMap<String, Entry> {
    match std::fs::read(state_path(dir)) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(
                "{} is damaged ({e}); schedules start afresh",
                state_path(dir).display()
            );
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

fn save_state(dir: &Path, st: &BTreeMap<String, Entry>) {
    let body = serde_json::to_vec_pretty(st).unwrap_or_default();
    if let Err(e) = crate::sys::write_atomic(&state_path(dir), &body, true) {
        tracing::warn!("could not save {}: {e}", state_path(dir).display());
    }
}

/// The delay a schedule with `random_delay` adds to the slot at `t`: the same for a schedule
/// and a slot every time (a restart does not move it), spread over `[0, max)`.
fn delay(what: &str, t: u64, max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let h = blake3::hash(format!("{what}@{t}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b) % max
}

/// Run the scheduler until the service shuts down.
pub fn run(s: Shared) {
    let mut st = load_state(&s.dir);
    let mut last_sweep: Option<Instant> = None;
    let mut deliver = Deliverer::default();
    let mut said = String::new();
    while !s.shutdown.is_cancelled() {
        match VmsFile::load(&s.config) {
            Ok(file) => {
                said.clear();
                // A bug in one round must not end scheduling for good: it is logged, and
                // the next round runs.
                let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    tick(&s, &file, &mut st);
                    if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP) {
                        last_sweep = Some(Instant::now());
                        sweep(&s);
                    }
                    deliver.round(&s.dir, &file);
                }));
                if round.is_err() {
                    tracing::error!("a scheduler round failed (a bug); the next one runs");
                }
            }
            Err(e) => {
                let m = e.to_string();
                if m != said {
                    tracing::warn!("schedules paused: {m}");
                    said = m;
                }
            }
        }
        for _ in 0..5 {
            if s.shutdown.is_cancelled() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Start whatever is due.
fn tick(s: &Shared, file: &VmsFile, st: &mut BTreeMap<String, Entry>) {
    let Ok(tz) = file.policy.zone() else { return };
    let now = crate::timefmt::now_secs();
    let schedules = crate::ops::schedules(file);
    let mut changed = false;
    st.retain(|what, _| schedules.iter().any(|(w, _)| w == what));
    for (what, expr) in &schedules {
        let Ok(cal) = Calendar::parse(expr) else {
            continue;
        };
        let e = st.entry(what.clone()).or_default();
        if e.schedule != *expr {
            // New (or changed): count from now; the first run is the next slot.
            *e = Entry {
                schedule: expr.clone(),
                handled: now,
                ..Entry::default()
            };
            changed = true;
            continue;
        }
        let due = match &e.queued {
            Some(_) => true,
            None => {
                let from = jiff::Timestamp::from_second(e.handled as i64).unwrap_or_default();
                let max = match what.strip_prefix("backup ") {
                    Some(vm) => file.policy.effective(vm).random_delay_seconds,
                    None => 0,
                };
                cal.next_after(from, &tz).is_some_and(|t| {
                    let t = t.as_second().max(0) as u64;
                    t + delay(what, t, max) <= now
                })
            }
        };
        if !due {
            continue;
        }
        // Handled before the job starts: a crash from here on never runs this slot twice.
        e.handled = now;
        save_state(&s.dir, st);
        let e = st.get_mut(what).expect("just inserted");
        match launch(s, file, what, &tz) {
            Ok(task) => {
                tracing::info!("schedule: {what} started task {task}");
                e.last_task = Some(task);
                e.queued = None;
                e.last_error = None;
            }
            Err(err @ Error::Busy(_)) => {
                let why = err.to_string();
                if e.queued.is_none() {
                    tracing::info!("schedule: {what} waits: {why}");
                    e.queued = Some(Queued {
                        since: now,
                        why: why.clone(),
                    });
                }
                e.last_error = Some(why);
            }
            Err(err) => {
                tracing::warn!("schedule: {what} could not start: {err}");
                e.queued = None;
                e.last_error = Some(err.to_string());
                failed_to_start(s, what, &err);
            }
        }
        changed = true;
    }
    if changed {
        save_state(&s.dir, st);
    }
}

/// The event of a run that never became a task.
fn failed_to_start(s: &Shared, what: &str, err: &Error) {
    let (kind, vms) = subject(what);
    let skipped = matches!(err, Error::Limit { .. } | Error::SlotsFull { .. });
    let mut e = match skipped {
        true => Event::new("schedule", "skipped", vms),
        false => Event::new(kind, "failed", vms),
    };
    e.summary = Some(format!("scheduled {what}: {err}"));
    e.error_code = Some(err.code().to_string());
    e.error_message = Some(err.to_string());
    app(s).notify(&e);
}

/// (event kind, VMs) of a schedule.
fn subject(what: &str) -> (&'static str, Vec<String>) {
    match what.split_once(' ') {
        Some(("backup", vm)) => ("backup", vec![vm.to_string()]),
        Some(("snapshot", vm)) => ("snapshot", vec![vm.to_string()]),
        Some(("group", _)) => ("snapshot", Vec::new()),
        _ if what == "gc" => ("gc", Vec::new()),
        _ => ("verify", Vec::new()),
    }
}

fn app(s: &Shared) -> Appliance {
    Appliance::new(s.dir.clone(), Some(s.config.clone()), "schedule".into())
}

/// Start the job of schedule `what`; its task id, once the task exists.
fn launch(s: &Shared, file: &VmsFile, what: &str, tz: &jiff::tz::TimeZone) -> Result<String> {
    let now = jiff::Timestamp::now();
    let (verb, name) = what.split_once(' ').unwrap_or((what, ""));
    let name = name.to_string();
    match verb {
        "backup" => {
            let eff = file.policy.effective(&name);
            let disks: Vec<(String, String)> = if file.vm.contains_key(&name) {
                Vec::new()
            } else if eff.sources.is_empty() {
                return Err(Error::usage(format!(
                    "VM {name} has a backup schedule but is neither declared (`holdfast vm \
                     add`) nor given policy.vm.{name}.backup.sources"
                )));
            } else {
                eff.sources.into_iter().collect()
            };
            let req = BackupRequest {
                vm: name,
                disks,
                scheduled: true,
                ..BackupRequest::default()
            };
            jobs::start_blocking(s, "schedule", move |app, ev| {
                app.backup(req, ev).map(|_| ())
            })
        }
        "snapshot" | "group" => {
            let (vms, pattern) = if verb == "snapshot" {
                let eff = file.policy.effective(&name);
                (vec![name.clone()], eff.snapshot_name)
            } else {
                let g = file.policy.group.get(&name).cloned().unwrap_or_default();
                let pattern = g
                    .name
                    .unwrap_or_else(|| crate::policy::DEFAULT_SNAPSHOT_NAME.into());
                (g.vms, pattern)
            };
            // A VM at its snapshot limit is skipped (an event says so), not failed.
            let app = app(s);
            for v in &vms {
                let limit = app.declared(v)?.snapshot_limit as usize;
                let have = app.snapshot_list(Some(v))?.len();
                if have >= limit {
                    return Err(Error::Limit {
                        what: crate::error::What::Snapshot,
                        limit: limit as u64,
                        message: format!(
                            "VM {v} already has {have} snapshot(s), its limit: the scheduled \
                             snapshot ({what}) is skipped"
                        ),
                    });
                }
            }
            let snap = crate::policy::expand_name(&pattern, now, tz).map_err(Error::Usage)?;
            let req = SnapshotCreateRequest {
                vms,
                name: snap,
                memory: false,
                quiesce: false,
                description: Some(format!("scheduled ({what})")),
                ttl: None,
            };
            jobs::start_blocking(s, "schedule", move |app, ev| {
                app.snapshot_create(req, ev).map(|_| ())
            })
        }
        "gc" => jobs::start_blocking(s, "schedule", |app, ev| app.gc(false, ev).map(|_| ())),
        _ => {
            let sample = file
                .policy
                .verify
                .sample
                .unwrap_or(crate::policy::DEFAULT_VERIFY_SAMPLE);
            let req = VerifyRequest {
                spec: None,
                sample: f64::from(sample),
                repair: false,
            };
            jobs::start_blocking(s, "schedule", move |app, ev| {
                app.verify(&req, ev).map(|_| ())
            })
        }
    }
}

/// Remove snapshots past their lifespan; each one removed is an "expired" event.
fn sweep(s: &Shared) {
    let app = app(s);
    match app.expired_snapshots() {
        Ok(0) => {}
        Ok(_) => match app.snapshot_expire(&crate::task::NoEvents) {
            Ok(r) => {
                for snap in &r.deleted {
                    let mut e = Event::new("snapshot", "expired", vec![snap.vm.clone()]);
                    e.summary = Some(format!(
                        "snapshot {} of VM {} outlived its lifespan and was removed",
                        snap.name, snap.vm
                    ));
                    app.notify(&e);
                }
                for f in &r.failed {
                    tracing::warn!("expired snapshot not removed yet: {f}");
                }
            }
            Err(e) => tracing::warn!("expired snapshots not removed yet: {e}"),
        },
        Err(e) => tracing::warn!("could not look for expired snapshots: {e}"),
    }
}

/// Delivers the outbox: per target, oldest first; a target that fails waits (backoff).
#[derive(Default)]
struct Deliverer {
    /// target → (failures in a row, not before).
    waits: HashMap<String, (u32, Instant)>,
}

impl Deliverer {
    fn round(&mut self, dir: &Path, file: &VmsFile) {
        let Ok(rd) = std::fs::read_dir(crate::notify::outbox(dir)) else {
            return;
        };
        for d in rd.flatten() {
            let target = d.file_name().to_string_lossy().into_owned();
            let Some(t) = file.notify.target.get(&target) else {
                // A target removed from the config: what waited for it cannot go anywhere.
                let n = crate::notify::pending(dir, &target).len();
                if n > 0 {
                    tracing::warn!("dropping {n} event(s) for the removed target {target}");
                }
                let _ = std::fs::remove_dir_all(d.path());
                continue;
            };
            if self
                .waits
                .get(&target)
                .is_some_and(|(_, at)| Instant::now() < *at)
            {
                continue;
            }
            // At most a few per round, so one busy target does not hold up shutdown.
            for path in crate::notify::pending(dir, &target).into_iter().take(20) {
                let ev: Event = match std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                {
                    Some(e) => e,
                    None => {
                        tracing::warn!("dropping the unreadable event {}", path.display());
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                };
                match crate::notify::deliver(&target, t, &ev) {
                    Ok(()) => {
                        let _ = std::fs::remove_file(&path);
                        self.waits.remove(&target);
                    }
                    Err(e) => {
                        let failures = self.waits.get(&target).map_or(0, |w| w.0);
                        let wait = t.backoff(failures);
                        tracing::warn!(
                            "notification {} to {target} failed (attempt {}): {e}; next in {:?}",
                            ev.id,
                            failures + 1,
                            wait
                        );
                        self.waits
                            .insert(target.clone(), (failures + 1, Instant::now() + wait));
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_delays_are_stable_and_within_bounds() {
        assert_eq!(super::delay("backup web", 1000, 0), 0);
        let d = super::delay("backup web", 1_800_000_000, 1800);
        assert!(d < 1800);
        assert_eq!(
            d,
            super::delay("backup web", 1_800_000_000, 1800),
            "the same after a restart"
        );
        let spread: std::collections::BTreeSet<u64> = (0..50)
            .map(|i| super::delay(&format!("backup vm-{i}"), 1_800_000_000, 1800))
            .collect();
        assert!(spread.len() > 40, "a fleet is spread: {spread:?}");
    }
}
