//! `holdfast policy show`, `holdfast prune`, `holdfast calendar`.

use super::Cmdline;
use crate::calendar::{self, Calendar};
use crate::ops::PruneRequest;
use crate::policy::{OnFull, Retention};
use crate::{Error, Result};
use clap::{Args, Subcommand};

pub const POLICY_HELP: &str = "Policies live in the config file's [policy] table (defaults for every VM),\n\
[policy.vm.NAME] (one VM) and [policy.group.NAME] (group snapshots); admins change them through\n\
the API too (PUT /api/v1/policy). docs/policies.md has every setting.\n\n\
Example:\n  [policy]\n  backup.schedule = \"daily\"\n  backup.slots = 2\n  [policy.vm.web-01]\n  backup.keep = { last = 3, daily = 7 }";

pub const PRUNE_HELP: &str =
    "Slots keep a VM's newest backups; keep rules (keep-last, -hourly, -daily, -weekly,\n\
-monthly, -yearly) keep the newest of each period, as Proxmox Backup Server does. Protected\n\
backups are never removed. The service also applies the rules after every backup.\n\n\
Examples:\n  holdfast prune --dry-run\n  holdfast prune web-01 --json";

pub const CALENDAR_HELP: &str = "Expressions: hourly, daily, weekly, monthly, quarterly, yearly, or\n\
[WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]], each field *, N, A..B, A/STEP, lists with ','.\n\n\
Examples:\n  holdfast calendar 'mon..fri 02:30' --count 5\n  holdfast calendar 'sat *-1..7 15:00'\n  holdfast calendar '*:0/15' --timezone Europe/Berlin";

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// The policy in force (of one VM, with every default filled in) and what runs next
    Show {
        /// One VM
        vm: Option<String>,
    },
}

#[derive(Args)]
pub struct PruneArgs {
    /// One VM (default: every VM with backups)
    vm: Option<String>,
    /// Say what would be kept and removed, and why; remove nothing
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
pub struct CalendarArgs {
    /// A calendar expression (quote it)
    expr: String,
    /// How many of the next times to print
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Count from this time (RFC 3339, e.g. 2027-03-27T12:00:00Z) instead of now
    #[arg(long)]
    after: Option<String>,
    /// The time zone (default: the policy's, else UTC)
    #[arg(long)]
    timezone: Option<String>,
}

pub fn policy(cx: &Cmdline, cmd: PolicyCmd) -> Result<i32> {
    let PolicyCmd::Show { vm } = cmd;
    let r = cx.app.policy_show(vm.as_deref())?;
    if cx.out.json(&r) {
        return Ok(0);
    }
    if let Some(e) = &r.vm {
        say!("VM {}", e.vm);
        let rule = match &e.retention {
            Retention::Slots(n) => {
                let full = match e.on_full {
                    Some(OnFull::Rotate) => "rotate".to_string(),
                    Some(OnFull::Refuse) => "refuse".to_string(),
                    None => "scheduled rotate, manual refuse".to_string(),
                };
                format!("{n} slots (when full: {full})")
            }
            Retention::Keep(k) => serde_json::to_string(k).unwrap_or_default(),
        };
        say!("  retention            {rule}");
        say!(
            "  backup.schedule      {}",
            e.backup_schedule
                .as_deref()
                .unwrap_or("none (manual backups only)")
        );
        if e.random_delay_seconds > 0 {
            say!("  backup.random_delay  {}s", e.random_delay_seconds);
        }
        for (d, s) in &e.sources {
            say!("  backup.sources.{d}  {s}");
        }
        say!(
            "  snapshot.schedule    {}",
            e.snapshot_schedule.as_deref().unwrap_or("none")
        );
        say!(
            "  snapshot.max_lifespan {}",
            crate::policy::show_duration(e.max_lifespan())
        );
        say!(
            "  snapshot.limit       {}",
            e.snapshot_limit
                .map_or("1 (default)".to_string(), |n| n.to_string())
        );
        say!("  timezone             {}", e.timezone);
    } else {
        let text = toml::to_string_pretty(&r.config).map_err(Error::internal)?;
        say!("[policy]  (as configured; unset values take their defaults)");
        say!("{}", text.trim_end());
    }
    say!("next runs:");
    for n in &r.next {
        say!(
            "  {:<24} {:<22} {}",
            n.what,
            n.schedule,
            n.next.as_deref().unwrap_or("never")
        );
    }
    Ok(0)
}

pub fn prune(cx: &Cmdline, a: PruneArgs) -> Result<i32> {
    let r = cx.app.prune(
        PruneRequest {
            vm: a.vm,
            dry_run: a.dry_run,
        },
        &cx.term(),
    )?;
    if cx.out.json(&r) {
        return Ok(0);
    }
    for v in &r.vms {
        say!("{}:", v.vm);
        for d in &v.decisions {
            let verb = match (d.keep, r.dry_run) {
                (true, _) => "keep  ",
                (false, true) => "would remove",
                (false, false) => "removed",
            };
            say!("  {verb} {}@{}  ({})", v.vm, d.id, d.reason);
        }
    }
    let n: usize = r.vms.iter().map(|v| v.removed.len()).sum();
    match r.dry_run {
        true => say!("{n} backup(s) would be removed; nothing was changed"),
        false if n > 0 => {
            say!("removed {n} backup(s); run `holdfast gc` to free their unshared data")
        }
        false => say!("nothing to remove"),
    }
    Ok(0)
}

pub fn calendar(cx: &Cmdline, a: CalendarArgs) -> Result<i32> {
    let c = Calendar::parse(&a.expr).map_err(Error::Usage)?;
    let zone_name = match a.timezone {
        Some(z) => Some(z),
        None => crate::jobs::vms::VmsFile::load(cx.app.config_path())
            .ok()
            .and_then(|f| f.policy.timezone),
    };
    let tz = calendar::zone(zone_name.as_deref()).map_err(Error::Usage)?;
    let after = match &a.after {
        Some(t) => t.parse::<jiff::Timestamp>().map_err(|e| {
            Error::usage(format!(
                "--after {t:?}: not an RFC 3339 time ({e}); e.g. 2027-03-27T12:00:00Z"
            ))
        })?,
        None => jiff::Timestamp::now(),
    };
    if a.count == 0 || a.count > 10_000 {
        return Err(Error::usage("--count: from 1 to 10000"));
    }
    let times = c.next_n(after, &tz, a.count);
    if cx.json {
        let v = serde_json::json!({
            "original": c.original(),
            "normalized": c.to_string(),
            "timezone": zone_name.unwrap_or_else(|| "UTC".into()),
            "next": times.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        });
        cx.out.json(&v);
        return Ok(0);
    }
    say!("  Original form: {}", c.original());
    say!("Normalized form: {c}");
    if times.is_empty() {
        say!("    Next elapse: never");
    }
    for (i, t) in times.iter().enumerate() {
        let label = if i == 0 {
            "    Next elapse".to_string()
        } else {
            format!("   Iteration #{}", i + 1)
        };
        say!("{label}: {}", calendar::show_time(*t, &tz));
    }
    Ok(0)
}
