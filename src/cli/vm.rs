//! `holdfast vm`, `holdfast snapshot`, `holdfast doctor`.

use super::{usage, Cmdline};
use crate::jobs::snapshot::Kind;
use crate::jobs::vms::parse_duration;
use crate::ops::{parse_named, SnapshotCreateRequest, VmAddRequest};
use crate::Result;
use clap::Subcommand;
use indicatif::HumanBytes;
use std::path::PathBuf;

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
    Revert {
        /// VM NAME, or just NAME with --vm
        #[arg(value_name = "VM NAME", num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// Revert these VMs to one group snapshot (repeat): all are checked first
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
    },
    /// Write a snapshot's disk state to a new image: a new server from this snapshot
    #[command(
        after_help = "Examples:\n  holdfast snapshot clone web-01 PreUpdate --to /var/lib/images/web-02.qcow2\n  \
holdfast snapshot clone db-01 PreMigration --disk data --to /srv/db-data.img --format raw\n\n\
The VM may be running: a snapshot's state never changes, and it is read beside QEMU. Internal\n\
(qcow2) and external (overlay) snapshots both work; the new image is complete and independent\n\
(no backing file). It is written under a partial name and appears only when whole."
    )]
    Clone {
        vm: String,
        name: String,
        /// The new image file
        #[arg(long)]
        to: PathBuf,
        /// Which disk (may be left out when the snapshot has one)
        #[arg(long)]
        disk: Option<String>,
        /// raw (sparse) or qcow2 [default: qcow2 for a .qcow2 path, else raw]
        #[arg(long, value_name = "raw|qcow2")]
        format: Option<String>,
        /// Overwrite an existing file (never one in use, nor a qcow2 or other container)
        #[arg(long)]
        force: bool,
    },
    /// Give a snapshot another name (QEMU's tag stays)
    Rename {
        vm: String,
        old: String,
        new: String,
    },
    /// Delete a snapshot (the VM keeps its current state)
    Delete {
        /// VM NAME, or just NAME with --vm
        #[arg(value_name = "VM NAME", num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// Delete one group snapshot from these VMs (repeat)
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
        /// Only drop holdfast's record (also of a VM no longer declared); QEMU and the image
        /// files are not touched
        #[arg(long)]
        forget: bool,
    },
    /// Delete every snapshot past its lifespan (run it from cron or a timer)
    Expire,
}

pub fn vm(cx: &Cmdline, cmd: VmCmd) -> Result<i32> {
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
            let disks = disks
                .iter()
                .map(|d| parse_named(d, "NODE", "root=disk0"))
                .collect::<Result<Vec<_>>>()?;
            let req = VmAddRequest {
                name,
                qmp,
                disks,
                agent,
                work_dir,
                nbd_socket,
                snapshot_ttl,
                snapshot_limit,
                check: !no_check,
            };
            let vm = cx.app.vm_add(req, &cx.term())?;
            if !cx.json {
                say!(
                    "declared VM {} in {}",
                    vm.name,
                    cx.app.config_path().display()
                );
            }
        }
        VmCmd::List => vm_list(cx)?,
        VmCmd::Remove { name } => {
            let r = cx.app.vm_remove(&name, &cx.term())?;
            if !cx.json {
                say!(
                    "removed VM {} from {}; its backups and snapshots stay",
                    r.name,
                    r.config.display()
                );
            }
        }
    }
    Ok(0)
}

fn vm_list(cx: &Cmdline) -> Result<()> {
    let l = cx.app.vm_list()?;
    if cx.json {
        say!(
            "{}",
            serde_json::to_string_pretty(&l.vms).unwrap_or_default()
        );
    } else if l.vms.is_empty() {
        say!(
            "no VMs declared in {}; add one with `holdfast vm add NAME --qmp SOCKET --disk NAME=NODE`",
            l.config.display()
        );
    } else {
        for (n, c) in &l.vms {
            let disks: Vec<String> = c.disks.iter().map(|(a, b)| format!("{a}={b}")).collect();
            let agent = c
                .agent
                .as_ref()
                .map(|a| format!(" agent {}", a.display()))
                .unwrap_or_default();
            say!(
                "{n:<16} qmp {}{agent} disks {}",
                c.qmp.display(),
                disks.join(" ")
            );
        }
    }
    Ok(())
}

pub fn doctor(cx: &Cmdline, name: Option<&str>, dry_run: bool) -> Result<i32> {
    let r = match name {
        Some(n) => cx.app.doctor(n, dry_run, &cx.term())?,
        None => cx.app.doctor_repo(dry_run, &cx.term())?,
    };
    let (label, place) = match name {
        Some(n) => (format!("VM {n}"), "in QEMU"),
        None => ("repository".to_string(), "by restores"),
    };
    if cx.json {
        say!(
            "{}",
            serde_json::json!({ "vm": r.vm, "leftovers": r.leftovers, "cleaned": r.cleaned })
        );
    } else if r.leftovers.is_empty() {
        say!("{label}: nothing left behind {place}");
    } else {
        let verb = if dry_run { "found" } else { "removed" };
        for f in &r.leftovers {
            say!("{label}: {verb} {f}");
        }
    }
    Ok(0)
}

fn when(ms: u64) -> String {
    crate::timefmt::rfc3339(ms / 1000)
}

fn print_json(v: serde_json::Value) {
    say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

pub fn snapshot(cx: &Cmdline, cmd: SnapshotCmd) -> Result<i32> {
    match cmd {
        SnapshotCmd::Create {
            args,
            vms,
            memory,
            quiesce,
            description,
            ttl,
        } => create(cx, args, vms, memory, quiesce, description, ttl)?,
        SnapshotCmd::List { vm } => list(cx, vm.as_deref())?,
        SnapshotCmd::Revert { args, vms } => {
            let (vms, name) = vms_and_name(args, vms, "revert")?;
            let rs = cx.app.snapshot_revert_group(&vms, &name, &cx.term())?;
            if cx.json {
                // One VM: its report, as before groups could be reverted; several: a list.
                let v = match rs.as_slice() {
                    [one] => serde_json::to_value(one),
                    _ => serde_json::to_value(&rs),
                };
                print_json(v.unwrap_or_default());
            }
            for (vm, r) in vms.iter().zip(&rs).filter(|_| !cx.json) {
                if r.online {
                    let state = if r.running_after == Some(true) {
                        "running"
                    } else {
                        "paused"
                    };
                    say!("VM {vm} reverted to snapshot {name}; it is {state}");
                } else {
                    say!("VM {vm}'s disks reverted to snapshot {name} (the VM was shut down); start it again");
                }
            }
        }
        SnapshotCmd::Clone {
            vm,
            name,
            to,
            disk,
            format,
            force,
        } => {
            let req = crate::ops::SnapshotCloneRequest {
                vm,
                name,
                disk,
                to,
                format,
                force,
            };
            let r = cx.app.snapshot_clone(&req, &cx.term())?;
            if cx.json {
                print_json(serde_json::to_value(&r).unwrap_or_default());
            } else {
                say!(
                    "wrote disk {} of snapshot {} of VM {} to {} ({}, {} virtual, {:.1} s)",
                    r.disk,
                    r.snapshot,
                    r.vm,
                    r.to,
                    r.format,
                    HumanBytes(r.size),
                    r.seconds
                );
            }
        }
        SnapshotCmd::Rename { vm, old, new } => {
            cx.app.snapshot_rename(&vm, &old, &new, &cx.term())?;
            if !cx.json {
                say!("snapshot {old} of VM {vm} is now {new}");
            }
        }
        SnapshotCmd::Delete { args, vms, forget } => {
            let (vms, name) = vms_and_name(args, vms, "delete")?;
            cx.app
                .snapshot_delete_group(&vms, &name, forget, &cx.term())?;
            if !cx.json {
                say!("deleted snapshot {name} of VM {}", vms.join(", "));
            }
        }
        SnapshotCmd::Expire => expire(cx)?,
    }
    Ok(0)
}

/// `VM NAME`, or `NAME` with `--vm A --vm B`.
fn vms_and_name(args: Vec<String>, vms: Vec<String>, verb: &str) -> Result<(Vec<String>, String)> {
    match (vms.is_empty(), args.as_slice()) {
        (true, [vm, name]) => Ok((vec![vm.clone()], name.clone())),
        (false, [name]) => Ok((vms, name.clone())),
        (true, _) => Err(usage(format!(
            "give VM NAME, e.g. `holdfast snapshot {verb} web-01 PreUpdate`"
        ))),
        (false, _) => Err(usage(format!(
            "with --vm, give only the snapshot NAME, e.g. `holdfast snapshot {verb} --vm a --vm b PreUpdate`"
        ))),
    }
}

fn create(
    cx: &Cmdline,
    args: Vec<String>,
    vms: Vec<String>,
    memory: bool,
    quiesce: bool,
    description: Option<String>,
    ttl: Option<String>,
) -> Result<()> {
    let (vms, name) = match (vms.is_empty(), args.as_slice()) {
        (true, [vm, name]) => (vec![vm.clone()], name.clone()),
        (false, [name]) => (vms, name.clone()),
        (true, _) => {
            return Err(usage(
                "give VM NAME, e.g. `holdfast snapshot create web-01 PreUpdate`",
            ))
        }
        (false, _) => {
            return Err(usage(
                "with --vm, give only the snapshot NAME, e.g. `holdfast snapshot create --vm a --vm b PreUpdate`",
            ))
        }
    };
    let ttl = ttl
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(crate::Error::Usage)?;
    let req = SnapshotCreateRequest {
        vms,
        name,
        memory,
        quiesce,
        description,
        ttl,
    };
    let made = cx.app.snapshot_create(req, &cx.term())?;
    if cx.json {
        print_json(serde_json::to_value(&made).unwrap_or_default());
        return Ok(());
    }
    for s in &made {
        let what = if s.memory { "with memory" } else { "disk-only" };
        let kind = if s.kind == Kind::Internal {
            "internal"
        } else {
            "external overlay"
        };
        let expires = s.expires_ms.map(when).unwrap_or_else(|| "never".into());
        say!(
            "snapshot {} of VM {} taken ({what}, {kind}); expires {expires}",
            s.name,
            s.vm
        );
    }
    Ok(())
}

fn list(cx: &Cmdline, vm: Option<&str>) -> Result<()> {
    let l = cx.app.snapshot_list(vm)?;
    if cx.json {
        print_json(serde_json::to_value(&l).unwrap_or_default());
        return Ok(());
    }
    if l.is_empty() {
        say!("no snapshots; take one with `holdfast snapshot create VM NAME`");
        return Ok(());
    }
    say!(
        "{:<14} {:<20} {:<20} {:>10} {:>7} {:<7} {:<20} STATE",
        "VM",
        "NAME",
        "CREATED",
        "SIZE",
        "TOOK",
        "MEMORY",
        "EXPIRES"
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
        say!(
            "{:<14} {:<20} {:<20} {:>10} {:>7} {:<7} {:<20} {}{desc}",
            s.vm,
            s.name,
            when(s.created_ms),
            size,
            s.took_ms
                .map(|t| format!("{:.1}s", t as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            if s.memory { "yes" } else { "no" },
            s.expires_ms.map(when).unwrap_or_else(|| "never".into()),
            x.state
        );
    }
    Ok(())
}

fn expire(cx: &Cmdline) -> Result<()> {
    let r = cx.app.snapshot_expire(&cx.term())?;
    if cx.json {
        print_json(serde_json::json!({ "deleted": r.deleted, "failed": r.failed }));
    } else {
        for s in &r.deleted {
            say!(
                "expired snapshot {} of VM {} (taken {})",
                s.name,
                s.vm,
                when(s.created_ms)
            );
        }
        if r.deleted.is_empty() && r.failed.is_empty() {
            say!("no snapshot is past its lifespan");
        }
    }
    match r.failed.first() {
        Some(f) => Err(crate::ops::expire_error(r.failed.len(), f)),
        None => Ok(()),
    }
}
