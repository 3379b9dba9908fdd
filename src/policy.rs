//! Policies: when a VM is backed up and snapshotted, how many backups it keeps (slots, or keep
//! rules with Proxmox Backup Server's semantics), how long snapshots may live, and when the
//! repository is collected and verified. Declared in the config file's `[policy]` table
//! (defaults for every VM, `[policy.vm.NAME]` per VM, `[policy.group.NAME]` for group
//! snapshots), changed by admins through the API too.
//!
//! ```toml
//! [policy]
//! timezone = "Europe/Berlin"         # of every schedule [default: UTC]
//! backup.schedule = "daily"          # a calendar expression (docs/policies.md)
//! backup.slots = 2                   # backups kept per VM [default: 2]
//! backup.on_full = "rotate"          # or "refuse" [default: scheduled rotate, manual refuse]
//! backup.random_delay = "30m"        # spread a fleet's scheduled backups
//! snapshot.max_lifespan = "10d"      # no snapshot lives longer [default and most: 10d]
//! snapshot.limit = 1                 # snapshots per VM [default: 1]
//! gc.schedule = "daily"              # [default: daily]
//! verify.schedule = "weekly"         # [default: weekly], checking
//! verify.sample = 10                 #   this percent of the chunks [default: 10]
//!
//! [policy.vm.web-01]
//! backup.keep = { last = 3, daily = 7, weekly = 4 }   # instead of slots
//! backup.sources = { root = "/var/lib/images/web-01.img" }   # a VM not in QEMU
//!
//! [policy.group.db]
//! vms = ["db-1", "db-2"]
//! schedule = "sun 03:00"
//! name = "auto-%Y%m%d"
//! ```
//!
//! What this module owns: the config's shape and checks, the effective policy of a VM, and
//! [`retain`], the pure function deciding which backups a rule keeps (and why).
//! Invariants: protected backups are never removed by a rule; a rule keeps at least one
//! backup (slots ≥ 1, a keep rule ≥ 1); retention runs only after a backup committed.

use crate::calendar::{self, Calendar};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

pub const DEFAULT_SLOTS: u32 = 2;
/// The longest a snapshot may live, and the most `snapshot.max_lifespan` may say.
pub const MAX_LIFESPAN: Duration = Duration::from_secs(10 * 86400);
pub const DEFAULT_GC: &str = "daily";
pub const DEFAULT_VERIFY: &str = "weekly";
pub const DEFAULT_VERIFY_SAMPLE: u32 = 10;
/// The default name of scheduled snapshots.
pub const DEFAULT_SNAPSHOT_NAME: &str = "auto-%Y%m%d-%H%M%S";

/// What a backup does when the VM's slots are all in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Forget the oldest unprotected backup once the new one has committed.
    Rotate,
    /// Refuse the new backup (`slots-full`).
    Refuse,
}

/// Keep rules (Proxmox Backup Server's): each keeps the newest backup of that many of the
/// most recent periods that have one, looking only at backups no earlier rule kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yearly: Option<u32>,
}

impl KeepRules {
    /// (rule name, count) in the order the rules apply.
    fn rules(&self) -> [(&'static str, u32); 6] {
        [
            ("keep-last", self.last.unwrap_or(0)),
            ("keep-hourly", self.hourly.unwrap_or(0)),
            ("keep-daily", self.daily.unwrap_or(0)),
            ("keep-weekly", self.weekly.unwrap_or(0)),
            ("keep-monthly", self.monthly.unwrap_or(0)),
            ("keep-yearly", self.yearly.unwrap_or(0)),
        ]
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupPolicy {
    /// When scheduled backups run (a calendar expression); none: only manual ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_full: Option<OnFull>,
    /// Keep rules instead of slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<KeepRules>,
    /// Scheduled runs start up to this long after their time (the same delay for a VM and a
    /// time, so a restart does not move it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_delay: Option<String>,
    /// Disk name → file, block device or NBD URI: what a scheduled backup of a VM that is not
    /// declared in QEMU reads.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPolicy {
    /// When scheduled snapshots are taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The name of scheduled snapshots, with strftime fields [default: auto-%Y%m%d-%H%M%S].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// No snapshot lives longer (and a longer `--ttl` is refused) [default: 10d, at most 10d].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifespan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSchedule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// verify: the percent of chunks checked per run [default: 10].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPolicy {
    #[serde(default)]
    pub backup: BackupPolicy,
    #[serde(default)]
    pub snapshot: SnapshotPolicy,
}

/// Snapshots of several VMs at once, on a schedule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSchedule {
    pub vms: Vec<String>,
    pub schedule: String,
    /// strftime fields allowed [default: auto-%Y%m%d-%H%M%S].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `[policy]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default)]
    pub backup: BackupPolicy,
    #[serde(default)]
    pub snapshot: SnapshotPolicy,
    #[serde(default)]
    pub gc: JobSchedule,
    #[serde(default)]
    pub verify: JobSchedule,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vm: BTreeMap<String, VmPolicy>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group: BTreeMap<String, GroupSchedule>,
}

/// How a VM's backups are thinned.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    Slots(u32),
    Keep(KeepRules),
}

/// A VM's policy with every default filled in.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Effective {
    pub vm: String,
    pub backup_schedule: Option<String>,
    pub retention: Retention,
    /// As configured (None: scheduled runs rotate, manual ones are refused).
    pub on_full: Option<OnFull>,
    pub random_delay_seconds: u64,
    pub sources: BTreeMap<String, String>,
    pub snapshot_schedule: Option<String>,
    pub snapshot_name: String,
    pub snapshot_max_lifespan_seconds: u64,
    pub snapshot_limit: Option<u32>,
    pub timezone: String,
}

impl Effective {
    /// What a full VM does for a backup that is `scheduled` or manual.
    pub fn on_full(&self, scheduled: bool) -> OnFull {
        self.on_full.unwrap_or(if scheduled {
            OnFull::Rotate
        } else {
            OnFull::Refuse
        })
    }

    pub fn max_lifespan(&self) -> Duration {
        Duration::from_secs(self.snapshot_max_lifespan_seconds)
    }
}

impl PolicyConfig {
    /// The policy of `vm`: its own settings over the defaults over the built-in ones.
    pub fn effective(&self, vm: &str) -> Effective {
        let own = self.vm.get(vm).cloned().unwrap_or_default();
        let (b, d) = (&own.backup, &self.backup);
        let retention = match (&b.keep, b.slots, &d.keep, d.slots) {
            (Some(k), _, _, _) => Retention::Keep(k.clone()),
            (None, Some(n), _, _) => Retention::Slots(n),
            (None, None, Some(k), _) => Retention::Keep(k.clone()),
            (None, None, None, n) => Retention::Slots(n.unwrap_or(DEFAULT_SLOTS)),
        };
        let (s, ds) = (&own.snapshot, &self.snapshot);
        let lifespan = s
            .max_lifespan
            .as_ref()
            .or(ds.max_lifespan.as_ref())
            .and_then(|t| parse_duration(t).ok())
            .unwrap_or(MAX_LIFESPAN)
            .min(MAX_LIFESPAN);
        Effective {
            vm: vm.to_string(),
            backup_schedule: b.schedule.clone().or_else(|| d.schedule.clone()),
            retention,
            on_full: b.on_full.or(d.on_full),
            random_delay_seconds: b
                .random_delay
                .as_ref()
                .or(d.random_delay.as_ref())
                .and_then(|t| parse_duration(t).ok())
                .map_or(0, |x| x.as_secs()),
            sources: b.sources.clone(),
            snapshot_schedule: s.schedule.clone().or_else(|| ds.schedule.clone()),
            snapshot_name: s
                .name
                .clone()
                .or_else(|| ds.name.clone())
                .unwrap_or_else(|| DEFAULT_SNAPSHOT_NAME.into()),
            snapshot_max_lifespan_seconds: lifespan.as_secs(),
            snapshot_limit: s.limit.or(ds.limit),
            timezone: self.timezone.clone().unwrap_or_else(|| "UTC".into()),
        }
    }

    pub fn zone(&self) -> Result<TimeZone, String> {
        calendar::zone(self.timezone.as_deref())
    }

    /// Every setting checked, for a one-line error naming the field.
    pub fn check(&self) -> Result<(), String> {
        self.zone().map_err(|e| format!("policy.timezone: {e}"))?;
        let sched = |field: &str, s: &Option<String>| -> Result<(), String> {
            match s {
                Some(s) => Calendar::parse(s)
                    .map(|_| ())
                    .map_err(|e| format!("{field}: {e}")),
                None => Ok(()),
            }
        };
        let mut tables = vec![(
            "policy".to_string(),
            self.backup.clone(),
            self.snapshot.clone(),
        )];
        for (name, v) in &self.vm {
            crate::names::check("VM", name).map_err(|e| format!("policy.vm: {e}"))?;
            tables.push((
                format!("policy.vm.{name}"),
                v.backup.clone(),
                v.snapshot.clone(),
            ));
        }
        for (at, b, s) in &tables {
            sched(&format!("{at}.backup.schedule"), &b.schedule)?;
            sched(&format!("{at}.snapshot.schedule"), &s.schedule)?;
            if b.slots.is_some() && b.keep.is_some() {
                return Err(format!("{at}.backup: give slots or keep rules, not both"));
            }
            if b.slots == Some(0) {
                return Err(format!(
                    "{at}.backup.slots: at least 1 (a VM keeps at least one backup)"
                ));
            }
            if let Some(k) = &b.keep {
                if k.rules().iter().all(|(_, n)| *n == 0) {
                    return Err(format!(
                        "{at}.backup.keep: at least one rule above 0 (e.g. last = 1)"
                    ));
                }
            }
            if let Some(d) = &b.random_delay {
                parse_duration(d).map_err(|e| format!("{at}.backup.random_delay: {e}"))?;
            }
            for (disk, src) in &b.sources {
                crate::names::check("disk", disk)
                    .map_err(|e| format!("{at}.backup.sources: {e}"))?;
                if src.trim().is_empty() {
                    return Err(format!("{at}.backup.sources.{disk}: an empty source"));
                }
            }
            if let Some(l) = &s.max_lifespan {
                let d =
                    parse_duration(l).map_err(|e| format!("{at}.snapshot.max_lifespan: {e}"))?;
                if d > MAX_LIFESPAN {
                    return Err(format!(
                        "{at}.snapshot.max_lifespan: {l} is longer than the 10 days a snapshot \
                         may live at most"
                    ));
                }
            }
            if let Some(n) = &s.name {
                check_pattern(n).map_err(|e| format!("{at}.snapshot.name: {e}"))?;
            }
        }
        if !self.backup.sources.is_empty() {
            return Err(
                "policy.backup.sources: sources belong to one VM ([policy.vm.NAME])".into(),
            );
        }
        sched("policy.gc.schedule", &self.gc.schedule)?;
        sched("policy.verify.schedule", &self.verify.schedule)?;
        if self.gc.sample.is_some() {
            return Err("policy.gc: sample is verify's setting".into());
        }
        if let Some(p) = self.verify.sample {
            if !(1..=100).contains(&p) {
                return Err(format!(
                    "policy.verify.sample: {p} is not a percent from 1 to 100"
                ));
            }
        }
        for (g, s) in &self.group {
            crate::names::check("group", g).map_err(|e| format!("policy.group: {e}"))?;
            if s.vms.len() < 2 {
                return Err(format!(
                    "policy.group.{g}.vms: a group has at least two VMs"
                ));
            }
            for v in &s.vms {
                crate::names::check("VM", v).map_err(|e| format!("policy.group.{g}.vms: {e}"))?;
            }
            sched(
                &format!("policy.group.{g}.schedule"),
                &Some(s.schedule.clone()),
            )?;
            if let Some(n) = &s.name {
                check_pattern(n).map_err(|e| format!("policy.group.{g}.name: {e}"))?;
            }
        }
        Ok(())
    }
}

/// A snapshot name pattern gives valid names.
fn check_pattern(p: &str) -> Result<(), String> {
    let name = expand_name(p, Timestamp::UNIX_EPOCH, &TimeZone::UTC)?;
    crate::names::check("snapshot", &name).map_err(|e| e.to_string())
}

/// A name pattern's strftime fields filled in for `at`.
pub fn expand_name(pattern: &str, at: Timestamp, tz: &TimeZone) -> Result<String, String> {
    let z = at.to_zoned_datetime(tz.clone());
    jiff::fmt::strtime::format(pattern, &z).map_err(|e| format!("{pattern:?}: {e}"))
}

pub use crate::timefmt::parse_duration;

/// `10d`, `36h`, `90m`, `45s`: the largest unit that divides it.
pub fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    for (unit, n) in [("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)] {
        if s >= n && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

/// A backup as retention sees it.
#[derive(Clone, Debug)]
pub struct Item {
    pub id: String,
    /// Unix milliseconds (backups made within a second are told apart).
    pub time_ms: u64,
    pub protected: bool,
}

/// What a rule decided for one backup, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    /// `slot 1 of 2`, `keep-daily`, `protected`, `beyond 2 slots`, `no rule keeps it`.
    pub reason: String,
}

/// Which of `items` a rule keeps, newest first. Pure: the periods of keep rules are civil
/// periods in `tz`.
pub fn retain(items: &[Item], rule: &Retention, tz: &TimeZone) -> Vec<Decision> {
    let mut sorted: Vec<&Item> = items.iter().collect();
    sorted.sort_by(|a, b| b.time_ms.cmp(&a.time_ms).then(b.id.cmp(&a.id)));
    match rule {
        Retention::Slots(n) => slots(&sorted, *n as usize),
        Retention::Keep(k) => keep(&sorted, k, tz),
    }
}

/// The newest `n` stay (protected ones count, and stay beyond `n` too).
fn slots(sorted: &[&Item], n: usize) -> Vec<Decision> {
    let mut excess = sorted.len().saturating_sub(n.max(1));
    let mut remove = vec![false; sorted.len()];
    for (i, it) in sorted.iter().enumerate().rev() {
        if excess > 0 && !it.protected {
            remove[i] = true;
            excess -= 1;
        }
    }
    let mut slot = 0;
    sorted
        .iter()
        .zip(remove)
        .map(|(it, rm)| {
            let reason = if rm {
                format!("beyond {n} slots")
            } else {
                slot += 1;
                if it.protected {
                    format!("protected (slot {slot} of {n})")
                } else {
                    format!("slot {slot} of {n}")
                }
            };
            Decision {
                id: it.id.clone(),
                keep: !rm,
                reason,
            }
        })
        .collect()
}

/// The period a backup falls in, for a keep rule.
fn period(rule: &str, it: &Item, tz: &TimeZone) -> String {
    let Ok(t) = Timestamp::from_millisecond(it.time_ms as i64) else {
        return it.id.clone();
    };
    let z = t.to_zoned_datetime(tz.clone());
    let fmt = match rule {
        "keep-hourly" => "%Y-%m-%d %H",
        "keep-daily" => "%Y-%m-%d",
        "keep-weekly" => "%G-W%V",
        "keep-monthly" => "%Y-%m",
        "keep-yearly" => "%Y",
        _ => return it.id.clone(),
    };
    z.strftime(fmt).to_string()
}

fn keep(sorted: &[&Item], k: &KeepRules, tz: &TimeZone) -> Vec<Decision> {
    // None: undecided; Some(reason): kept.
    let mut kept: Vec<Option<String>> = vec![None; sorted.len()];
    for (i, it) in sorted.iter().enumerate() {
        if it.protected {
            kept[i] = Some("protected".into());
        }
    }
    for (rule, n) in k.rules() {
        if n == 0 {
            continue;
        }
        // Periods already covered by a backup an earlier rule kept count as done.
        let mut covered: std::collections::HashSet<String> = sorted
            .iter()
            .zip(&kept)
            .filter(|(it, k)| k.is_some() && !it.protected)
            .map(|(it, _)| period(rule, it, tz))
            .collect();
        let mut taken = 0;
        for (i, it) in sorted.iter().enumerate() {
            if kept[i].is_some() {
                continue;
            }
            let p = period(rule, it, tz);
            if covered.contains(&p) {
                continue;
            }
            if taken >= n {
                break;
            }
            covered.insert(p);
            taken += 1;
            kept[i] = Some(rule.to_string());
        }
    }
    sorted
        .iter()
        .zip(kept)
        .map(|(it, k)| Decision {
            id: it.id.clone(),
            keep: k.is_some(),
            reason: k.unwrap_or_else(|| "no rule keeps it".into()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(times: &[(&str, bool)]) -> Vec<Item> {
        times
            .iter()
            .map(|(t, p)| Item {
                id: t.to_string(),
                time_ms: t.parse::<Timestamp>().unwrap().as_millisecond() as u64,
                protected: *p,
            })
            .collect()
    }

    fn kept(d: &[Decision]) -> Vec<String> {
        d.iter().filter(|d| d.keep).map(|d| d.id.clone()).collect()
    }

    #[test]
    fn slots_keep_the_newest_and_never_a_protected_one_out() {
        let it = items(&[
            ("2026-12-01T00:00:00Z", false),
            ("2026-12-02T00:00:00Z", false),
            ("2026-12-03T00:00:00Z", false),
        ]);
        let d = retain(&it, &Retention::Slots(2), &TimeZone::UTC);
        assert_eq!(kept(&d), ["2026-12-03T00:00:00Z", "2026-12-02T00:00:00Z"]);
        assert_eq!(d[0].reason, "slot 1 of 2");
        assert_eq!(d[2].reason, "beyond 2 slots");
        // The oldest is protected: the next oldest unprotected one goes instead.
        let it = items(&[
            ("2026-12-01T00:00:00Z", true),
            ("2026-12-02T00:00:00Z", false),
            ("2026-12-03T00:00:00Z", false),
        ]);
        let d = retain(&it, &Retention::Slots(2), &TimeZone::UTC);
        assert_eq!(kept(&d), ["2026-12-03T00:00:00Z", "2026-12-01T00:00:00Z"]);
        assert_eq!(d[2].reason, "protected (slot 2 of 2)");
        // All protected: nothing goes, whatever the slots say.
        let it = items(&[
            ("2026-12-01T00:00:00Z", true),
            ("2026-12-02T00:00:00Z", true),
        ]);
        assert_eq!(
            kept(&retain(&it, &Retention::Slots(1), &TimeZone::UTC)).len(),
            2
        );
        assert!(retain(&[], &Retention::Slots(2), &TimeZone::UTC).is_empty());
    }

    #[test]
    fn keep_rules_select_as_proxmox_backup_server_does() {
        // Two backups a day for ten days, 06:00 and 18:00, 2026-11-20 to 2026-11-29.
        let mut t = Vec::new();
        for d in 20..30 {
            for h in ["06", "18"] {
                t.push((format!("2026-11-{d}T{h}:00:00Z"), false));
            }
        }
        let refs: Vec<(&str, bool)> = t.iter().map(|(s, p)| (s.as_str(), *p)).collect();
        let it = items(&refs);
        let rules = |k: KeepRules| kept(&retain(&it, &Retention::Keep(k), &TimeZone::UTC));
        let table: Vec<(KeepRules, Vec<&str>)> = vec![
            (
                KeepRules {
                    last: Some(3),
                    ..Default::default()
                },
                vec![
                    "2026-11-29T18:00:00Z",
                    "2026-11-29T06:00:00Z",
                    "2026-11-28T18:00:00Z",
                ],
            ),
            // keep-daily: the newest of each of the 3 latest days.
            (
                KeepRules {
                    daily: Some(3),
                    ..Default::default()
                },
                vec![
                    "2026-11-29T18:00:00Z",
                    "2026-11-28T18:00:00Z",
                    "2026-11-27T18:00:00Z",
                ],
            ),
            // keep-last 2 covers the 29th; keep-daily 2 then takes the 28th and 27th (the
            // 29th's 06:00 is in a day already covered).
            (
                KeepRules {
                    last: Some(2),
                    daily: Some(2),
                    ..Default::default()
                },
                vec![
                    "2026-11-29T18:00:00Z",
                    "2026-11-29T06:00:00Z",
                    "2026-11-28T18:00:00Z",
                    "2026-11-27T18:00:00Z",
                ],
            ),
            // ISO weeks: 2026-11-23 is a Monday. Week 48 (23–29) and week 47 (16–22: its
            // newest here is the 22nd's 18:00).
            (
                KeepRules {
                    weekly: Some(5),
                    ..Default::default()
                },
                vec!["2026-11-29T18:00:00Z", "2026-11-22T18:00:00Z"],
            ),
            (
                KeepRules {
                    monthly: Some(1),
                    yearly: Some(1),
                    ..Default::default()
                },
                vec!["2026-11-29T18:00:00Z"],
            ),
            (
                KeepRules {
                    hourly: Some(2),
                    ..Default::default()
                },
                vec!["2026-11-29T18:00:00Z", "2026-11-29T06:00:00Z"],
            ),
        ];
        for (k, want) in table {
            assert_eq!(rules(k.clone()), want, "{k:?}");
        }
        // Reasons name the rule; protected backups stay and cover no period.
        let mut it2 = it.clone();
        it2[0].protected = true; // 2026-11-20T06:00
        let d = retain(
            &it2,
            &Retention::Keep(KeepRules {
                daily: Some(1),
                ..Default::default()
            }),
            &TimeZone::UTC,
        );
        let reasons: Vec<(&str, &str)> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.id.as_str(), d.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("2026-11-29T18:00:00Z", "keep-daily"),
                ("2026-11-20T06:00:00Z", "protected")
            ]
        );
        assert_eq!(d[1].reason, "no rule keeps it");
    }

    #[test]
    fn days_are_the_zones_days() {
        // 23:30 UTC on the 28th is the 29th in Berlin: one day there, two in UTC.
        let it = items(&[
            ("2026-11-28T23:30:00Z", false),
            ("2026-11-29T10:00:00Z", false),
        ]);
        let k = Retention::Keep(KeepRules {
            daily: Some(2),
            ..Default::default()
        });
        assert_eq!(kept(&retain(&it, &k, &TimeZone::UTC)).len(), 2);
        let berlin = crate::calendar::zone(Some("Europe/Berlin")).unwrap();
        assert_eq!(kept(&retain(&it, &k, &berlin)), ["2026-11-29T10:00:00Z"]);
    }

    #[test]
    fn effective_policies_and_checks() {
        let mut p = PolicyConfig::default();
        let e = p.effective("web");
        assert_eq!(e.retention, Retention::Slots(2));
        assert_eq!(
            (e.on_full(true), e.on_full(false)),
            (OnFull::Rotate, OnFull::Refuse)
        );
        assert_eq!(e.max_lifespan(), MAX_LIFESPAN);
        p.backup.slots = Some(3);
        p.vm.entry("web".into()).or_default().backup.keep = Some(KeepRules {
            last: Some(1),
            ..Default::default()
        });
        assert!(matches!(p.effective("web").retention, Retention::Keep(_)));
        assert_eq!(p.effective("db").retention, Retention::Slots(3));
        assert!(p.check().is_ok());
        for (edit, says) in [
            (
                Box::new(|p: &mut PolicyConfig| p.backup.slots = Some(0))
                    as Box<dyn Fn(&mut PolicyConfig)>,
                "at least 1",
            ),
            (
                Box::new(|p: &mut PolicyConfig| p.backup.schedule = Some("dayly".into())),
                "policy.backup.schedule",
            ),
            (
                Box::new(|p: &mut PolicyConfig| p.snapshot.max_lifespan = Some("30d".into())),
                "10 days",
            ),
            (
                Box::new(|p: &mut PolicyConfig| p.timezone = Some("Mars/Olympus".into())),
                "time zone",
            ),
            (
                Box::new(|p: &mut PolicyConfig| p.verify.sample = Some(0)),
                "percent",
            ),
            (
                Box::new(|p: &mut PolicyConfig| p.backup.keep = Some(KeepRules::default())),
                "give slots or keep",
            ),
            (
                Box::new(|p: &mut PolicyConfig| p.snapshot.name = Some("a/%Y".into())),
                "snapshot.name",
            ),
        ] {
            let mut q = p.clone();
            edit(&mut q);
            let e = q.check().unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        assert_eq!(
            expand_name(
                "auto-%Y%m%d",
                "2026-12-02T10:00:00Z".parse().unwrap(),
                &TimeZone::UTC
            )
            .unwrap(),
            "auto-20261202"
        );
    }
}
