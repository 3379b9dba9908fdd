//! The `holdfast` command line: a thin layer over [`crate::ops`]. Each command parses its
//! arguments, calls one operation of the [`Appliance`] and prints the result (human, or JSON
//! with `--json`); progress bars and notes come from [`events::Term`], the CLI's events sink.
//!
//! Exit codes come from the error ([`Error::exit_code`]): 1 for errors, 2 for usage, 3 for damaged data, 4
//! for a busy VM or repository, 130 when interrupted. With `--json`, an error is also printed
//! on stdout as `{"error": {"code": …, "message": …, "details": …}}`.

/// Print a line on stdout. A write that fails is remembered, not a panic: a closed pipe
/// (`holdfast backups | head -1`) ends the output quietly, as other Unix tools do; any other
/// failure (a full disk) becomes the command's one-line error at the end ([`stdout_error`]).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let r = writeln!(std::io::stdout(), $($t)*);
        $crate::cli::stdout_result(r);
    }};
}

/// Print a line on stderr, ignoring a closed stderr.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod backup;
mod data;
mod events;
mod key;
mod output;
mod policy;
mod serve;
mod service;
mod tasks;
mod vm;

use crate::ops::Appliance;
use crate::task::Cancel;
use crate::{Error, Result};
use clap::{Parser, Subcommand};
use output::Out;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Back up VM disks into a deduplicating store, and restore them.",
    long_about = "Back up VM disks into a deduplicating store, and restore them.\n\n\
Disks are cut into content-defined chunks inside aligned 4 MiB segments, named by a keyed hash,\n\
compressed with zstd and stored once. Every backup is a complete map of its disks; only new\n\
chunks take space.\n\n\
Quick start:\n  holdfast init --repo /srv/backups\n  holdfast backup web-01 --disk root=/var/lib/vm/web-01.img\n  \
holdfast backups\n  holdfast restore web-01 --disk root --to /tmp/root.img\n  holdfast verify\n\n\
Every operation is a task with a record: `holdfast tasks` lists them, `holdfast task ID --follow`\n\
follows one. Ctrl-C, SIGTERM and SIGHUP (a closed terminal) stop an operation cleanly; to let\n\
one outlive its terminal, run it under nohup or systemd-run."
)]
pub struct Cli {
    /// Repository directory [default: /var/lib/holdfast as root, else ~/.local/share/holdfast]
    #[arg(long, global = true, env = "HOLDFAST_REPO")]
    repo: Option<PathBuf>,
    /// Print machine-readable JSON on stdout instead of text
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars
    #[arg(long, short, global = true)]
    quiet: bool,
    /// The VM declarations (QMP sockets, disks) [default: REPO/vms.toml]
    #[arg(long, global = true, env = "HOLDFAST_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The passphrase of an encrypted (repokey) store, in a file of mode 0600 [or the
    /// HOLDFAST_PASSPHRASE variable, or asked on a terminal; never on the command line]
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// A new passphrase (init, key add, key passwd), in a file of mode 0600 [or
    /// HOLDFAST_NEW_PASSPHRASE, or asked twice on a terminal]
    #[arg(long, global = true, value_name = "FILE")]
    new_passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a repository: store config (chunker, id key, compression) and catalog
    Init(data::InitArgs),
    /// Back up a VM: its disks as files, block devices or NBD exports, or a running VM through QEMU
    #[command(after_help = backup::BACKUP_HELP)]
    Backup(backup::BackupArgs),
    /// List backups, oldest first
    Backups {
        /// Only this VM
        vm: Option<String>,
    },
    /// Show one backup: disks, sizes, what it stored
    Show {
        /// VM@ID (an id prefix works; VM alone or VM@latest means the newest)
        spec: String,
    },
    /// Restore one disk to a sparse raw image (every chunk is re-hashed)
    #[command(
        after_help = "Example: holdfast restore web-01@20261122-101500 --disk root --to /tmp/root.img"
    )]
    Restore(data::RestoreArgs),
    /// Re-read and re-hash what backups reference; name what any damage affects (exit 3)
    Verify(data::VerifyArgs),
    /// Remove a backup; `holdfast gc` then frees what nothing else uses
    Forget {
        /// VM@ID
        spec: String,
        /// Remove a manifest that cannot be read (as `holdfast verify` names it): that backup
        /// is lost, and gc, which stops while the store holds one, can run again
        #[arg(long)]
        damaged: bool,
    },
    /// Delete chunks and packs no backup references; safe beside running backups
    Gc {
        /// Let go of backups whose manifests are gone from the store (they are kept, with
        /// their data, until then)
        #[arg(long)]
        accept_missing: bool,
    },
    /// Stored bytes, dedup and compression ratios, and what the storage costs
    Stats {
        /// Storage price in dollars per GB-month
        #[arg(long, default_value_t = 0.05)]
        price: f64,
    },
    /// Serve a backup's disk over NBD (read-only, or writes to a local overlay); Ctrl-C stops it
    #[command(after_help = serve::EXPORT_HELP)]
    Export(serve::ExportArgs),
    /// Browse every backup as a read-only filesystem, down to the files inside the guests
    #[command(after_help = serve::MOUNT_HELP)]
    Mount(serve::MountArgs),
    /// Unmount a `holdfast mount`; its process then ends
    Umount {
        /// Where `holdfast mount` mounted the backups
        mountpoint: PathBuf,
        /// Detach now even if files are open there (the mount ends when they close)
        #[arg(long)]
        lazy: bool,
    },
    /// Print a file from inside a backup to standard output, without mounting
    #[command(
        after_help = "Example: holdfast cat web-01@20261122-101500:root/p2/etc/fstab\n\n\
PART is p1, p2, ... (as `holdfast mount` shows them), or fs for a disk without a partition table."
    )]
    Cat {
        /// VM[@ID]:DISK/PART/PATH (VM alone means the newest backup)
        spec: String,
    },
    /// Copy files or a directory tree out of a backup, with owners, modes, times and links
    #[command(name = "restore-files", after_help = serve::RESTORE_FILES_HELP)]
    RestoreFiles(serve::RestoreFilesArgs),
    /// VMs that run in QEMU: declare them once, then `holdfast backup VM` and snapshots need no more
    Vm {
        #[command(subcommand)]
        cmd: vm::VmCmd,
    },
    /// VM snapshots: rollback points taken before risky changes
    Snapshot {
        #[command(subcommand)]
        cmd: vm::SnapshotCmd,
    },
    /// Find (and remove) what an interrupted holdfast left: in a VM's QEMU, or (without a VM)
    /// the partial files of killed restores
    Doctor {
        /// A VM declared with `holdfast vm add` (none: the leftovers of restores)
        vm: Option<String>,
        /// Only report
        #[arg(long)]
        dry_run: bool,
    },
    /// Catalog maintenance
    Catalog {
        #[command(subcommand)]
        cmd: CatalogCmd,
    },
    /// List operations: running, and those that ended (newest last)
    #[command(after_help = tasks::TASKS_HELP)]
    Tasks(tasks::TasksArgs),
    /// Show one operation: its progress, log and outcome; --follow until it ends
    Task(tasks::TaskArgs),
    /// Run the appliance as a service: the HTTP API, live task progress, users and tokens
    #[command(after_help = service::SERVE_HELP)]
    Serve(service::ServeArgs),
    /// Users of the service: viewers, operators and admins, and the VMs assigned to them
    User {
        #[command(subcommand)]
        cmd: service::UserCmd,
    },
    /// API tokens (USER!NAME) for scripts: a secret shown once, narrowed, expiring, revocable
    Token {
        #[command(subcommand)]
        cmd: service::TokenCmd,
    },
    /// The audit log: every change made through the service (and by `user`/`token`)
    Audit(service::AuditArgs),
    /// Policies: schedules, backup slots or keep rules, snapshot lifespans
    #[command(after_help = policy::POLICY_HELP)]
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// Apply the retention rules now: which backups each rule keeps, and why
    #[command(after_help = policy::PRUNE_HELP)]
    Prune(policy::PruneArgs),
    /// The next times a calendar expression names (as `systemd-analyze calendar` does)
    #[command(after_help = policy::CALENDAR_HELP)]
    Calendar(policy::CalendarArgs),
    /// The keys of an encrypted store: passphrases (list, add, remove, passwd) and the key
    /// itself (export a paper copy, import it on a new machine)
    #[command(after_help = key::KEY_HELP)]
    Key {
        #[command(subcommand)]
        cmd: key::KeyCmd,
    },
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// Throw the catalog away and rebuild it from the store alone (pack footers and manifests)
    Rebuild,
}

impl Cmd {
    /// Commands that run an operation (a task) catch SIGINT, SIGTERM and SIGHUP to stop it
    /// cleanly; queries keep the default (a signal ends them at once).
    fn runs_task(&self) -> bool {
        !matches!(
            self,
            Cmd::Init(_)
                | Cmd::Backups { .. }
                | Cmd::Show { .. }
                | Cmd::Stats { .. }
                | Cmd::Umount { .. }
                | Cmd::Cat { .. }
                | Cmd::Tasks(_)
                | Cmd::User { .. }
                | Cmd::Token { .. }
                | Cmd::Audit(_)
                | Cmd::Policy { .. }
                | Cmd::Calendar(_)
                | Cmd::Key { .. }
                | Cmd::Vm {
                    cmd: vm::VmCmd::List
                }
                | Cmd::Snapshot {
                    cmd: vm::SnapshotCmd::List { .. }
                }
        )
    }
}

/// What every command gets: the appliance and how to print.
pub(crate) struct Cmdline {
    pub app: Appliance,
    pub out: Out,
    pub quiet: bool,
    pub json: bool,
}

impl Cmdline {
    /// The terminal as an events sink for this command.
    pub fn term(&self) -> events::Term {
        events::Term::new(self.quiet, self.json)
    }
}

/// The first failed write to stdout: its kind and errno.
static STDOUT_ERROR: std::sync::OnceLock<(std::io::ErrorKind, Option<i32>)> =
    std::sync::OnceLock::new();

/// Remember a failed write to stdout (the first one).
pub(crate) fn stdout_result(r: std::io::Result<()>) {
    if let Err(e) = r {
        let _ = STDOUT_ERROR.set((e.kind(), e.raw_os_error()));
    }
}

/// A write to stdout that failed other than by the reader going away, as the error to end
/// the command with.
fn stdout_error() -> Option<Error> {
    let (kind, errno) = *STDOUT_ERROR.get()?;
    if kind == std::io::ErrorKind::BrokenPipe {
        return None;
    }
    let source = errno.map_or_else(|| kind.into(), std::io::Error::from_raw_os_error);
    Some(Error::Io {
        what: "write to standard output".into(),
        source,
    })
}

/// Parse the command line, run it, print any error; the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let json = cli.json;
    let result = run(cli).and_then(|code| match stdout_error() {
        Some(e) => Err(e),
        None => Ok(code),
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            if json {
                say!("{}", serde_json::json!({ "error": e.to_body() }));
            }
            note!("holdfast: error: {e}");
            e.exit_code()
        }
    }
}

/// From now on the first SIGINT, SIGTERM or SIGHUP asks the running operation to stop
/// cleanly (a backup commits nothing, a backup of a running VM tears down what it made in
/// QEMU, a server stops serving); a second one ends the process at once (exit 130).
fn catch_signals() -> Cancel {
    let cancel = Cancel::new();
    let Ok(mut signals) = crate::sys::Signals::catch() else {
        return cancel;
    };
    let c = cancel.clone();
    let _ = std::thread::Builder::new()
        .name("holdfast-signals".into())
        .spawn(move || {
            let sig = signals.wait();
            note!(
                "holdfast: interrupted ({}): stopping cleanly (again to quit at once)",
                sig.name()
            );
            c.cancel(sig.name());
            signals.wait();
            std::process::exit(130);
        });
    cancel
}

/// Run the command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    let dir = cli.repo.clone().unwrap_or_else(crate::sys::default_repo);
    crate::repo::keys::set_passphrase_files(
        cli.passphrase_file.clone(),
        cli.new_passphrase_file.clone(),
    );
    let mut app = Appliance::new(
        dir,
        cli.config.clone(),
        format!("cli:{}", crate::sys::user_name()),
    );
    if cli.cmd.runs_task() {
        app = app.with_cancel(catch_signals());
    }
    let cx = Cmdline {
        app,
        out: Out { json: cli.json },
        quiet: cli.quiet,
        json: cli.json,
    };
    let code = dispatch(&cx, cli.cmd)?;
    for w in cx.app.take_warnings() {
        note!("holdfast: warning: {w}");
    }
    Ok(code)
}

fn dispatch(cx: &Cmdline, cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Init(a) => data::init(cx, a),
        Cmd::Key { cmd } => key::run(cx, cmd),
        Cmd::Backup(a) => backup::backup(cx, a),
        Cmd::Backups { vm } => backup::backups(cx, vm),
        Cmd::Show { spec } => backup::show(cx, &spec),
        Cmd::Restore(a) => data::restore(cx, a),
        Cmd::Verify(a) => data::verify(cx, a),
        Cmd::Forget { spec, damaged } => backup::forget(cx, &spec, damaged),
        Cmd::Gc { accept_missing } => data::gc(cx, accept_missing),
        Cmd::Stats { price } => data::stats(cx, price),
        Cmd::Export(a) => serve::export(cx, a),
        Cmd::Mount(a) => serve::mount(cx, a),
        Cmd::Umount { mountpoint, lazy } => serve::umount(cx, mountpoint, lazy),
        Cmd::Cat { spec } => serve::cat(cx, spec),
        Cmd::RestoreFiles(a) => serve::restore_files(cx, a),
        Cmd::Vm { cmd } => vm::vm(cx, cmd),
        Cmd::Snapshot { cmd } => vm::snapshot(cx, cmd),
        Cmd::Doctor { vm, dry_run } => vm::doctor(cx, vm.as_deref(), dry_run),
        Cmd::Catalog {
            cmd: CatalogCmd::Rebuild,
        } => data::rebuild(cx),
        Cmd::Tasks(a) => tasks::tasks(cx, a),
        Cmd::Task(a) => tasks::task(cx, a),
        Cmd::Serve(a) => service::serve(cx, a),
        Cmd::User { cmd } => service::user(cx, cmd),
        Cmd::Token { cmd } => service::token(cx, cmd),
        Cmd::Audit(a) => service::audit_log(cx, a),
        Cmd::Policy { cmd } => policy::policy(cx, cmd),
        Cmd::Prune(a) => policy::prune(cx, a),
        Cmd::Calendar(a) => policy::calendar(cx, a),
    }
}

/// Usage errors of the command line itself (not of the request).
pub(crate) fn usage(message: impl Into<String>) -> Error {
    Error::usage(message)
}
