//! `holdfast tasks` and `holdfast task ID [--follow]`.

use super::Cmdline;
use crate::ops::TaskFilter;
use crate::task::{State, TaskRecord};
use crate::Result;
use clap::Args;
use indicatif::HumanBytes;

pub const TASKS_HELP: &str = "Every operation (backup, restore, verify, gc, export, mount, snapshots, ...) is a task\n\
with a record in REPO/tasks: who started it, its progress, its last log lines and how it ended.\n\
A task whose process died shows as failed (process ended). Old records are pruned: the newest\n\
100 per VM are kept ([tasks] keep = N in the config changes it).\n\n\
Examples:\n  holdfast tasks --running\n  holdfast tasks --vm web-01 --json\n  holdfast task 20261201-101500-a1b2c3 --follow";

#[derive(Args)]
pub struct TasksArgs {
    /// Only tasks on this VM
    #[arg(long)]
    vm: Option<String>,
    /// Only tasks running now
    #[arg(long)]
    running: bool,
}

#[derive(Args)]
pub struct TaskArgs {
    /// The task id (a unique prefix works)
    id: String,
    /// Print its progress and log as they change, until it ends; the exit code is then the
    /// task's (0 ok, 1 failed, 3 damaged, 4 busy, 130 cancelled)
    #[arg(long, short)]
    follow: bool,
}

fn progress(t: &TaskRecord) -> String {
    let p = &t.progress;
    match p.percent {
        Some(x) => format!("{x:.1}%"),
        None if p.done > 0 => HumanBytes(p.done).to_string(),
        None => "-".into(),
    }
}

fn duration(t: &TaskRecord) -> String {
    let end = t.ended_ms.unwrap_or_else(crate::timefmt::now_millis);
    let secs = end.saturating_sub(t.started_ms) / 1000;
    indicatif::HumanDuration(std::time::Duration::from_secs(secs)).to_string()
}

fn state(t: &TaskRecord) -> String {
    match (&t.state, &t.outcome.error) {
        (State::Failed, Some(e)) if e.code == "process-ended" => "failed: process ended".into(),
        (State::Failed, Some(e)) => format!("failed: {}", e.code),
        (s, _) => s.name().into(),
    }
}

pub fn tasks(cx: &Cmdline, a: TasksArgs) -> Result<i32> {
    let filter = TaskFilter {
        vm: a.vm,
        running: a.running,
    };
    let list = cx.app.tasks(&filter)?;
    if cx.json {
        say!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(0);
    }
    if list.is_empty() {
        say!("no tasks{}", if filter.running { " running" } else { "" });
        return Ok(0);
    }
    say!(
        "{:<22} {:<16} {:<14} {:<24} {:>8} {:<20} {:>8}  USER",
        "ID",
        "KIND",
        "VM",
        "STATE",
        "PROGRESS",
        "STARTED",
        "TIME"
    );
    for t in &list {
        say!(
            "{:<22} {:<16} {:<14} {:<24} {:>8} {:<20} {:>8}  {}",
            t.id,
            t.kind.name(),
            t.vms_label(),
            state(t),
            progress(t),
            crate::timefmt::rfc3339(t.started_ms / 1000),
            duration(t),
            t.user
        );
    }
    Ok(0)
}

fn print_record(t: &TaskRecord) {
    say!("task {} ({})", t.id, t.kind.name());
    say!("  vm        {}", t.vms_label());
    if !t.target.is_empty() {
        say!("  target    {}", t.target);
    }
    say!("  user      {} (pid {})", t.user, t.pid);
    say!(
        "  started   {}",
        crate::timefmt::rfc3339(t.started_ms / 1000)
    );
    if let Some(e) = t.ended_ms {
        say!(
            "  ended     {} ({})",
            crate::timefmt::rfc3339(e / 1000),
            duration(t)
        );
    }
    say!("  state     {}", state(t));
    let p = &t.progress;
    if !p.phase.is_empty() {
        say!(
            "  progress  {} {} of {} ({})",
            p.phase,
            HumanBytes(p.done),
            HumanBytes(p.total),
            progress(t)
        );
    }
    for l in &t.log {
        say!("  log       {}", l.line);
    }
    if let Some(s) = &t.outcome.summary {
        say!("  outcome   {s}");
    }
    if let Some(e) = &t.outcome.error {
        say!("  error     {} ({})", e.message, e.code);
    }
}

/// One line per change while following.
fn print_change(t: &TaskRecord, seen_log: &mut usize) {
    for l in t.log.iter().skip(*seen_log) {
        say!("{} {}", t.id, l.line);
    }
    *seen_log = t.log.len();
    let p = &t.progress;
    if t.is_running() {
        say!("{} {} {} {}", t.id, state(t), p.phase, progress(t));
    }
}

/// The exit code a finished task stands for.
fn exit_code(t: &TaskRecord) -> i32 {
    match (&t.state, &t.outcome.error) {
        (State::Ok, _) | (State::Running, _) | (State::Queued, _) => 0,
        (State::Cancelled, _) => 130,
        (State::Failed, Some(e)) => crate::error::exit_code_of(&e.code),
        (State::Failed, None) => 1,
    }
}

pub fn task(cx: &Cmdline, a: TaskArgs) -> Result<i32> {
    if !a.follow {
        let t = cx.app.task(&a.id)?;
        if cx.json {
            say!("{}", serde_json::to_string_pretty(&t).unwrap_or_default());
        } else {
            print_record(&t);
        }
        return Ok(0);
    }
    let mut seen = 0;
    let last = cx.app.follow(&a.id, &mut |t| {
        if cx.json {
            say!("{}", serde_json::to_string(t).unwrap_or_default());
        } else {
            print_change(t, &mut seen);
        }
    })?;
    if !cx.json {
        print_record(&last);
    }
    Ok(exit_code(&last))
}
