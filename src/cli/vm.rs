//! `holdfast vm`, `holdfast snapshot`, `holdfast doctor`, and backups of running VMs.

use crate::jobs::snapshot::{self, CreateArgs};
use crate::jobs::vmbackup::{self, VmBackupOptions};
use crate::jobs::vms::{parse_duration, Vm, VmConfig, VmsFile};
use crate::jobs::Progress;
use crate::repo::Repo;
use crate::{Error, Result};
use clap::Subcommand;
use indicatif::HumanBytes;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum VmCmd {
    /// Declare a VM that runs in QEMU (its QMP socket and disks)
    #[command(
        after_help = "Example:\n  holdfast vm add web-01 --qmp /run/qemu/web-01.qmp --disk root=disk0 --agent /run/qemu/web-01.qga\n\n\
NODE is the QEMU block node name of the disk (-blockdev node-name=..., or query-named-block-nodes)."
    )]
    Add {
        /// The VM's name: letters, digits, '-', '_', '.'
        name: String,
        /// QEMU's QMP unix socket (qemu-system-x86_64 -qmp unix:PATH,server=on,wait=off)
        #[arg(long, value_name = "SOCKET")]
        qmp: PathBuf,
        /// A disk as NAME=NODE; repeat for each disk
        #[arg(long = "disk", value_name = "NAME=NODE", required = true)]
        disks: Vec<String>,
        /// The guest agent's unix socket (for --quiesce)
        #[arg(long, value_name = "SOCKET")]
        agent: Option<PathBuf>,
        /// Where fleecing images and the NBD socket go [default: REPO/work/NAME]
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// The unix socket of an NBD server this QEMU already runs (read points are exported there)
        #[arg(long, value_name = "SOCKET")]
        nbd_socket: Option<PathBuf>,
        /// Lifespan of snapshots, e.g. 12h, 10d, 2w [default: 10d]
        #[arg(long, value_name = "DURATION")]
        snapshot_ttl: Option<String>,
        /// Snapshots the VM may hold at once [default: 1]
        #[arg(long, value_name = "N")]
        snapshot_limit: Option<u32>,
        /// Do not check the socket and the nodes now
        #[arg(long)]
        no_check: bool,
    },
    /// List declared VMs
    List,
    /// Forget a VM's declaration (its backups and snapshots stay)
    Remove {
        /// The VM's name
        name: String,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot (a rollback point) of a VM, or of several VMs at once
    #[command(
        after_help = "Examples:\n  holdfast snapshot create web-01 PreUpdate --description 'before apt upgrade'\n  \
holdfast snapshot create web-01 PreUpdate --memory --ttl 2d\n  holdfast snapshot create --vm web-01 --vm db-01 PreMigration\n\n\
Names: letters, digits, '-' and '_'. qcow2 disks get QEMU internal snapshots (with --memory, RAM\n\
and device state too); raw disks get external qcow2 overlays (disk-only)."
    )]
    Create {
        /// VM NAME, or just NAME with --vm
        #[arg(value_name = "VM NAME", num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// Snapshot these VMs together (repeat)
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
        /// Also save RAM and device state: revert resumes the VM where it was
        #[arg(long)]
        memory: bool,
        /// Freeze the guest's filesystems around the snapshot (needs the guest agent)
        #[arg(long)]
        quiesce: bool,
        /// A note shown by `snapshot list`
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// Lifespan, e.g. 12h, 10d [default: the VM's snapshot_ttl, 10d]
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// List snapshots: name, when, size, memory or not, when it expires, whether QEMU has it
    List {
        /// Only this VM
        vm: Option<String>,
    },
    /// Return a VM to a snapshot (memory snapshots while it runs; disk-only ones when it is shut down)
    #[command(
        after_help = "A snapshot with memory state is reverted while the VM runs, which then runs on from the\n\
snapshot. QEMU reverts disk-only snapshots only while the VM is shut down: shut it down, run\n\
this, start it again. The next backup of the VM reads every disk whole (a revert is invisible\n\
to dirty bitmaps)."
    )]
    Revert { vm: String, name: String },
    /// Give a snapshot another name (QEMU's tag stays)
    Rename {
        vm: String,
        old: String,
        new: String,
    },
    /// Delete a snapshot (the VM keeps its current state)
    Delete {
        vm: String,
        name: String,
        /// Only drop holdfast's record; QEMU and the image files are not touched
        #[arg(long)]
        forget: bool,
    },
    /// Delete every snapshot past its lifespan (run it from cron or a timer)
    Expire,
}

pub fn config_path(config: Option<&Path>, repo_dir: &Path) -> PathBuf {
    config
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_dir.join("vms.toml"))
}

fn load(config: &Path) -> Result<VmsFile> {
    VmsFile::load(config)
}

pub fn declared(config: &Path, repo_dir: &Path, name: &str) -> Result<Vm> {
    crate::names::check("VM", name)?;
    load(config)?.vm(name, repo_dir, config)
}

fn all_vms(config: &Path, repo_dir: &Path) -> Result<Vec<Vm>> {
    let f = load(config)?;
    f.vm.iter()
        .map(|(n, c)| f.resolve(n, c, repo_dir))
        .collect()
}

fn parse_node(s: &str) -> Result<(String, String)> {
    let (name, node) = s.split_once('=').ok_or_else(|| {
        Error::Invalid(format!(
            "--disk {s:?} must be NAME=NODE, e.g. --disk root=disk0"
        ))
    })?;
    crate::names::check("disk", name)?;
    if node.is_empty() {
        return Err(Error::Invalid(format!(
            "--disk {s:?} has no node name after '='"
        )));
    }
    Ok((name.into(), node.into()))
}

pub fn vm(cmd: VmCmd, config: &Path, repo_dir: &Path, json: bool) -> Result<()> {
    let mut f = load(config)?;
    match cmd {
        VmCmd::Add {
            name,
            qmp,
            disks,
            agent,
            work_dir,
            nbd_socket,
            snapshot_ttl,
            snapshot_limit,
            no_check,
        } => {
            crate::names::check("VM", &name)?;
            if f.vm.contains_key(&name) {
                return Err(Error::Invalid(format!("VM {name} is already declared in {}; `holdfast vm remove {name}` first to change it", config.display())));
            }
            if let Some(t) = &snapshot_ttl {
                parse_duration(t).map_err(Error::Invalid)?;
            }
            let mut map = std::collections::BTreeMap::new();
            for d in &disks {
                let (n, node) = parse_node(d)?;
                if map.insert(n.clone(), node).is_some() {
                    return Err(Error::Invalid(format!("disk {n} is given twice")));
                }
            }
            let c = VmConfig {
                qmp,
                agent,
                work_dir,
                nbd_socket,
                snapshot_ttl,
                snapshot_limit,
                disks: map,
            };
            if !no_check {
                let v = f.resolve(&name, &c, repo_dir)?;
                let rt = vmbackup::runtime()?;
                let client = vmbackup::connect(&rt, &v)?;
                for (disk, node) in &v.disks {
                    rt.block_on(crate::qmp::ops::find_disk(&client, node)).map_err(|e| Error::NotFound(format!("disk {disk}: {e}; check the node name (query-named-block-nodes lists them)")))?;
                }
                rt.block_on(client.close());
            }
            f.vm.insert(name.clone(), c);
            f.save(config)?;
            if !json {
                println!("declared VM {name} in {}", config.display());
            }
        }
        VmCmd::List => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&f.vm).unwrap_or_default()
                );
            } else if f.vm.is_empty() {
                println!("no VMs declared in {}; add one with `holdfast vm add NAME --qmp SOCKET --disk NAME=NODE`", config.display());
            } else {
                for (n, c) in &f.vm {
                    let disks: Vec<String> =
                        c.disks.iter().map(|(a, b)| format!("{a}={b}")).collect();
                    let agent = c
                        .agent
                        .as_ref()
                        .map(|a| format!(" agent {}", a.display()))
                        .unwrap_or_default();
                    println!(
                        "{n:<16} qmp {}{agent} disks {}",
                        c.qmp.display(),
                        disks.join(" ")
                    );
                }
            }
        }
        VmCmd::Remove { name } => {
            if f.vm.remove(&name).is_none() {
                return Err(Error::NotFound(format!(
                    "VM {name:?} is not declared in {}",
                    config.display()
                )));
            }
            f.save(config)?;
            if !json {
                println!(
                    "removed VM {name} from {}; its backups and snapshots stay",
                    config.display()
                );
            }
        }
    }
    Ok(())
}

pub struct VmBackupArgs {
    pub vm: String,
    pub qmp: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    pub disks: Vec<String>,
    pub quiesce: bool,
    pub full: bool,
}

/// `holdfast backup VM` of a VM in QEMU: declared, or given with --qmp and --disk NAME=NODE.
pub fn backup(
    repo: &Repo,
    config: &Path,
    a: VmBackupArgs,
    progress: &dyn Progress,
) -> Result<crate::repo::Manifest> {
    let vm = match &a.qmp {
        Some(qmp) => {
            let mut disks = std::collections::BTreeMap::new();
            for d in &a.disks {
                let (n, node) = parse_node(d)?;
                disks.insert(n, node);
            }
            let c = VmConfig {
                qmp: qmp.clone(),
                agent: a.agent.clone(),
                work_dir: None,
                nbd_socket: None,
                snapshot_ttl: None,
                snapshot_limit: None,
                disks,
            };
            VmsFile::default().resolve(&a.vm, &c, &repo.dir)?
        }
        None => {
            let mut v = declared(config, &repo.dir, &a.vm)?;
            if a.agent.is_some() {
                v.agent = a.agent.clone();
            }
            v
        }
    };
    let r = vmbackup::backup_vm(
        repo,
        &vm,
        &VmBackupOptions {
            quiesce: a.quiesce,
            full: a.full,
        },
        &super::test_hooks(),
        progress,
    )?;
    // Notes go to stderr, also with --json.
    for c in &r.cleaned {
        eprintln!("holdfast: removed a leftover of an interrupted run: {c}");
    }
    for (disk, why) in &r.full_reads {
        eprintln!("holdfast: disk {disk}: full read ({why})");
    }
    if let Some(w) = &r.teardown_warning {
        eprintln!("holdfast: warning: {w}");
    }
    Ok(r.manifest)
}

pub fn doctor(repo: &Repo, config: &Path, name: &str, dry_run: bool, json: bool) -> Result<()> {
    let vm = declared(config, &repo.dir, name)?;
    let found = vmbackup::doctor(repo, &vm, dry_run)?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "vm": name, "leftovers": found, "cleaned": !dry_run })
        );
    } else if found.is_empty() {
        println!("VM {name}: nothing left behind in QEMU");
    } else {
        let verb = if dry_run { "found" } else { "removed" };
        for f in &found {
            println!("VM {name}: {verb} {f}");
        }
    }
    Ok(())
}

fn when(ms: u64) -> String {
    crate::timefmt::rfc3339(ms / 1000)
}

pub fn snapshot(cmd: SnapshotCmd, repo: &Repo, config: &Path, json: bool) -> Result<()> {
    let print =
        |v: serde_json::Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    match cmd {
        SnapshotCmd::Create {
            args,
            vms,
            memory,
            quiesce,
            description,
            ttl,
        } => {
            let (names, name) = match (vms.is_empty(), args.as_slice()) {
                (true, [vm, name]) => (vec![vm.clone()], name.clone()),
                (false, [name]) => (vms, name.clone()),
                (true, _) => return Err(Error::Invalid("give VM NAME, e.g. `holdfast snapshot create web-01 PreUpdate`".into())),
                (false, _) => return Err(Error::Invalid("with --vm, give only the snapshot NAME, e.g. `holdfast snapshot create --vm a --vm b PreUpdate`".into())),
            };
            snapshot::check_name(&name)?;
            let ttl = ttl
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(Error::Invalid)?;
            let targets: Vec<Vm> = names
                .iter()
                .map(|n| declared(config, &repo.dir, n))
                .collect::<Result<_>>()?;
            let made = snapshot::create(
                repo,
                &targets,
                &CreateArgs {
                    name,
                    memory,
                    quiesce,
                    description,
                    ttl,
                },
            )?;
            if json {
                print(serde_json::to_value(&made).unwrap_or_default());
            } else {
                for s in &made {
                    let what = if s.memory { "with memory" } else { "disk-only" };
                    let kind = if s.kind == snapshot::Kind::Internal {
                        "internal"
                    } else {
                        "external overlay"
                    };
                    println!(
                        "snapshot {} of VM {} taken ({what}, {kind}); expires {}",
                        s.name,
                        s.vm,
                        s.expires_ms.map(when).unwrap_or_else(|| "never".into())
                    );
                }
            }
        }
        SnapshotCmd::List { vm } => {
            if let Some(v) = &vm {
                crate::names::check("VM", v)?;
            }
            let vms = all_vms(config, &repo.dir)?;
            let l = snapshot::list(repo, &vms, vm.as_deref())?;
            if json {
                print(serde_json::to_value(&l).unwrap_or_default());
            } else if l.is_empty() {
                println!("no snapshots; take one with `holdfast snapshot create VM NAME`");
            } else {
                println!(
                    "{:<14} {:<20} {:<20} {:>10} {:<7} {:<20} STATE",
                    "VM", "NAME", "CREATED", "SIZE", "MEMORY", "EXPIRES"
                );
                for x in &l {
                    let s = &x.snapshot;
                    let size = x
                        .size
                        .map(|b| HumanBytes(b).to_string())
                        .unwrap_or_else(|| "?".into());
                    let desc = s
                        .description
                        .as_ref()
                        .map(|d| format!("  {d}"))
                        .unwrap_or_default();
                    println!(
                        "{:<14} {:<20} {:<20} {:>10} {:<7} {:<20} {}{desc}",
                        s.vm,
                        s.name,
                        when(s.created_ms),
                        size,
                        if s.memory { "yes" } else { "no" },
                        s.expires_ms.map(when).unwrap_or_else(|| "never".into()),
                        x.state
                    );
                }
            }
        }
        SnapshotCmd::Revert { vm, name } => {
            let v = declared(config, &repo.dir, &vm)?;
            let r = snapshot::revert(repo, &v, &name)?;
            if json {
                print(serde_json::to_value(&r).unwrap_or_default());
            } else if r.online {
                println!(
                    "VM {vm} reverted to snapshot {name}; it is {}",
                    if r.running_after == Some(true) {
                        "running"
                    } else {
                        "paused"
                    }
                );
            } else {
                println!("VM {vm}'s disks reverted to snapshot {name} (the VM was shut down); start it again");
            }
        }
        SnapshotCmd::Rename { vm, old, new } => {
            let v = declared(config, &repo.dir, &vm)?;
            snapshot::rename(repo, &v, &old, &new)?;
            if !json {
                println!("snapshot {old} of VM {vm} is now {new}");
            }
        }
        SnapshotCmd::Delete { vm, name, forget } => {
            let v = declared(config, &repo.dir, &vm)?;
            snapshot::delete(repo, &v, &name, forget)?;
            if !json {
                println!("deleted snapshot {name} of VM {vm}");
            }
        }
        SnapshotCmd::Expire => {
            let vms = all_vms(config, &repo.dir)?;
            let (gone, failed) = snapshot::expire(repo, &vms, crate::timefmt::now_millis())?;
            if json {
                print(serde_json::json!({ "deleted": gone, "failed": failed }));
            } else {
                for s in &gone {
                    println!(
                        "expired snapshot {} of VM {} (taken {})",
                        s.name,
                        s.vm,
                        when(s.created_ms)
                    );
                }
                if gone.is_empty() && failed.is_empty() {
                    println!("no snapshot is past its lifespan");
                }
            }
            if let Some(f) = failed.first() {
                return Err(Error::Invalid(format!(
                    "{} snapshot(s) could not be expired; first: {f}",
                    failed.len()
                )));
            }
        }
    }
    Ok(())
}
