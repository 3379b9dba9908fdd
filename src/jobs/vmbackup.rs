//! Backups of a running VM through QEMU: a consistent read point, changed-block tracking, and
//! a teardown that always runs (DESIGN §6).
//!
//! The cycle, under the VM's lock:
//! 1. connect to QMP; remove what an earlier, killed holdfast left in QEMU (keeping the
//!    checkpoint bitmap of the last committed backup);
//! 2. optional quiesce through the guest agent (thaw always follows), around
//! 3. one QMP `transaction`: the read point (image fleecing) of every disk, the next persistent
//!    dirty bitmap (the new checkpoint) and the freeze of the previous one;
//! 4. an NBD export per disk carrying the previous checkpoint's bitmap; the incremental read of
//!    the NBD source (only dirty segments are read); commit;
//! 5. teardown: exports, jobs, nodes and fleecing files removed; committed: the old bitmap is
//!    removed; failed: the new one is merged back into the old and removed, so the next
//!    incremental still sees every write.
//!
//! Invariants: a bitmap is trusted only when it is the checkpoint recorded by the previous
//! committed backup of that disk (and QEMU says it is persistent, recording and consistent);
//! anything else is a full read of the allocated extents. A failure at any step leaves QEMU
//! with nothing holdfast created; a kill leaves leftovers that the next run (or
//! `holdfast doctor`) removes.

use super::backup::{backup_locked, DiskSpec, Hooks};
use super::lock::VmLock;
use super::vms::Vm;
use super::{test_point, Progress};
use crate::qmp::{self, ops, Agent, Client};
use crate::repo::{Manifest, Repo};
use crate::source::NbdSource;
use crate::{Error, Result};
use serde::Serialize;
use std::time::Duration;

/// Bound of each QMP step (a command, a job wait).
const STEP: Duration = Duration::from_secs(60);
/// Bound of each guest-agent call.
const AGENT_WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct VmBackupOptions {
    /// Freeze the guest's filesystems around the read point (needs the guest agent).
    pub quiesce: bool,
    /// Ignore the previous checkpoint: read every allocated extent.
    pub full: bool,
}

#[derive(Debug, Serialize)]
pub struct VmBackupReport {
    pub manifest: Manifest,
    /// What an earlier, interrupted run had left in QEMU and was removed first.
    pub cleaned: Vec<String>,
    pub quiesced: bool,
    /// Per disk: why the whole disk was read (no usable checkpoint), if it was.
    pub full_reads: Vec<(String, String)>,
    /// A teardown problem after the commit (the backup is good; `holdfast doctor` cleans up).
    pub teardown_warning: Option<String>,
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the QMP runtime", e))
}

fn describe(l: &ops::Leftovers) -> Vec<String> {
    let mut v = Vec::new();
    v.extend(l.exports.iter().map(|x| format!("NBD export {x}")));
    v.extend(l.jobs.iter().map(|x| format!("block job {x}")));
    v.extend(l.nodes.iter().map(|x| format!("block node {x}")));
    v.extend(
        l.files
            .iter()
            .map(|x| format!("fleecing file {}", x.display())),
    );
    v.extend(
        l.stray_bitmaps
            .iter()
            .map(|(n, b)| format!("bitmap {b} on {n}")),
    );
    v.extend(
        l.frozen_checkpoints.iter().map(|n| {
            format!("frozen checkpoint on {n} (the writes it missed merged in, or removed)")
        }),
    );
    v.extend(
        l.broken_bitmaps
            .iter()
            .map(|(n, b)| format!("inconsistent bitmap {b} on {n} (QEMU did not save it cleanly)")),
    );
    v.extend(
        l.nbd_server
            .iter()
            .map(|s| format!("NBD server on {}", s.display())),
    );
    v
}

/// The checkpoint bitmap of the last committed backup of `vm` (one name for all its disks),
/// and that backup.
fn last_checkpoint(repo: &Repo, vm: &str) -> Result<(Option<Manifest>, Option<String>)> {
    let prev = repo.manifests(Some(vm))?.into_iter().next_back();
    let cp = prev
        .as_ref()
        .and_then(|m| m.disks.iter().find_map(|d| d.checkpoint.clone()));
    Ok((prev, cp))
}

pub(crate) fn connect(rt: &tokio::runtime::Runtime, vm: &Vm) -> Result<Client> {
    Ok(rt.block_on(Client::connect(&vm.qmp, Duration::from_secs(10)))?)
}

fn node_names(vm: &Vm) -> Vec<String> {
    vm.disks.iter().map(|(_, n)| n.clone()).collect()
}

/// Back up every disk of a running VM (see the module docs).
pub fn backup_vm(
    repo: &Repo,
    vm: &Vm,
    opts: &VmBackupOptions,
    hooks: &Hooks,
    progress: &dyn Progress,
) -> Result<VmBackupReport> {
    crate::names::check("VM", &vm.name)?;
    if vm.disks.is_empty() {
        return Err(Error::Invalid(format!(
            "VM {} has no disks to back up; declare them with --disk NAME=NODE",
            vm.name
        )));
    }
    if opts.quiesce && vm.agent.is_none() {
        return Err(Error::Invalid(format!("--quiesce needs VM {}'s guest agent socket: set agent = \"PATH\" for it in the config, or pass --agent PATH", vm.name)));
    }
    let lock = VmLock::acquire(&repo.dir, &vm.name, "backup")?;
    repo.sync()?;
    // After an external snapshot the disk's data goes to the overlay on top of its node.
    let mut active = vm.clone();
    for (_, node) in active.disks.iter_mut() {
        *node = super::snapshot::active_node(repo, &vm.name, node)?;
    }
    let vm = &active;
    std::fs::create_dir_all(&vm.work_dir)
        .map_err(|e| Error::io(format!("create {}", vm.work_dir.display()), e))?;
    let rt = runtime()?;
    let client = connect(&rt, vm)?;
    let (prev, keep) = last_checkpoint(repo, &vm.name)?;
    let nodes = node_names(vm);
    let mut full_reads = Vec::new();
    let mut requests = Vec::new();
    let mut origins = Vec::new();
    let all_nodes = rt.block_on(ops::list_nodes(&client))?;
    let mut infos = Vec::new();
    for (name, node) in &vm.disks {
        let info = rt.block_on(ops::find_disk(&client, node)).map_err(|e| Error::NotFound(format!("VM {} disk {name}: {e}; check the node name (`holdfast vm list`, or query-named-block-nodes)", vm.name)))?;
        // Reading a node that something sits on top of would back up stale data (and QEMU
        // opens such a backing node read-only).
        let top = all_nodes.iter().find(|n| {
            !n.node_name.starts_with(ops::PREFIX)
                && !info.file.is_empty()
                && n.backing_file.as_deref() == Some(info.file.as_str())
                && n.node_name != info.node_name
        });
        if top.is_some() || info.read_only {
            let what = top
                .map(|t| {
                    format!(
                        "has {} ({}) on top of it, an overlay holdfast did not make",
                        t.node_name, t.file
                    )
                })
                .unwrap_or_else(|| {
                    "is read-only: an overlay sits on top of it, or the disk is read-only".into()
                });
            return Err(Error::Invalid(format!("VM {} disk {name}: node {} {what}; declare the top node as the disk (`holdfast vm remove` / `vm add`)", vm.name, info.node_name)));
        }
        infos.push((name.clone(), info));
    }
    let cleaned = rt.block_on(ops::clean_leftovers(
        &client,
        &vm.work_dir,
        keep.as_deref(),
        Some(&nodes),
        STEP,
    ))?;
    let all_qcow2 = infos.iter().all(|(_, i)| i.driver == "qcow2");
    for (name, info) in &infos {
        // Which image this disk is: a checkpoint is trusted only on the same node and file.
        let origin = format!("qemu node {} file {}", info.node_name, info.file);
        let prev_disk = prev
            .as_ref()
            .and_then(|m| m.disks.iter().find(|d| &d.name == name));
        if opts.full {
            // The previous checkpoint is still rotated out (and removed at commit); only its
            // bitmap is not read.
            full_reads.push((name.clone(), "--full".into()));
        }
        let previous = match prev_disk {
            None => {
                full_reads.push((name.clone(), "first backup of this disk".into()));
                None
            }
            Some(d) if d.size != info.virtual_size => {
                full_reads.push((
                    name.clone(),
                    format!(
                        "the disk changed size ({} to {} bytes)",
                        d.size, info.virtual_size
                    ),
                ));
                None
            }
            Some(d) if d.origin.as_deref() != Some(origin.as_str()) => {
                full_reads.push((
                    name.clone(),
                    format!(
                        "the previous backup read it from {}",
                        d.origin.as_deref().unwrap_or("another source")
                    ),
                ));
                None
            }
            // No bitmap can follow the previous one on a raw disk: never freeze it then.
            Some(_) if !all_qcow2 => None,
            Some(d) => {
                if d.checkpoint.is_none() {
                    full_reads.push((
                        name.clone(),
                        "the previous backup left no checkpoint".into(),
                    ));
                }
                d.checkpoint.clone()
            }
        };
        requests.push(ops::DiskRequest {
            disk: info.node_name.clone(),
            previous_bitmap: previous,
        });
        origins.push((info.node_name.clone(), origin));
    }
    let new_bitmap = all_qcow2.then(|| {
        let mut r = [0u8; 2];
        let _ = getrandom::fill(&mut r);
        format!(
            "{}cp-{}-{}",
            ops::PREFIX,
            crate::timefmt::compact(crate::timefmt::now_secs()),
            hex::encode(r)
        )
    });
    if !all_qcow2 {
        for (name, _) in &vm.disks {
            if !full_reads.iter().any(|(n, _)| n == name) {
                full_reads.push((name.clone(), "the VM has a raw disk, which cannot hold the persistent dirty bitmap every disk's checkpoint needs".into()));
            }
        }
    }
    let req = ops::ReadPointRequest {
        work_dir: vm.work_dir.clone(),
        disks: requests,
        new_bitmap,
        nbd: vm
            .nbd_socket
            .clone()
            .map(ops::NbdServer::Existing)
            .unwrap_or(ops::NbdServer::Own),
        timeout: STEP,
    };
    let agent = vm
        .agent
        .as_ref()
        .filter(|_| opts.quiesce)
        .map(|p| Agent::new(p, AGENT_WAIT));
    let rp = rt.block_on(ops::create_read_point(&client, &req, agent.as_ref())).map_err(|e| match e {
        e @ (qmp::QmpError::AgentTimeout { .. } | qmp::QmpError::AgentConnect { .. }) => Error::Invalid(format!("{e}; no read point was made (holdfast sent a thaw after any freeze): retry without --quiesce for a crash-consistent backup")),
        e => e.into(),
    })?;
    for d in rp.disks.iter().filter(|_| !opts.full) {
        if d.previous_bitmap.is_some() && d.exported_bitmap.is_none() {
            let name = vm
                .disks
                .iter()
                .find(|(_, n)| *n == d.disk)
                .map(|(n, _)| n.clone())
                .unwrap_or_default();
            full_reads.push((
                name,
                d.bitmap_note
                    .clone()
                    .unwrap_or_else(|| "QEMU does not offer the previous checkpoint".into()),
            ));
        }
    }
    let result = test_point("after-read-point").and_then(|_| {
        read_and_commit(
            repo,
            vm,
            &lock,
            &rp,
            &origins,
            prev.as_ref(),
            opts.full,
            hooks,
            progress,
        )
    });
    let outcome = if result.is_ok() {
        ops::Outcome::Committed
    } else {
        ops::Outcome::Failed
    };
    if result.is_ok() {
        let _ = test_point("after-commit"); // the commit stands: only the kill hook applies
    }
    let torn = rt.block_on(ops::teardown(&client, &rp, outcome, STEP));
    rt.block_on(client.close());
    match (result, torn) {
        (Ok(manifest), torn) => Ok(VmBackupReport {
            manifest,
            cleaned: describe(&cleaned),
            quiesced: rp.quiesced,
            full_reads,
            teardown_warning: torn
                .err()
                .map(|e| format!("{e}; `holdfast doctor {}` cleans up", vm.name)),
        }),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(t)) => Err(Error::Invalid(format!(
            "{e} (and the cleanup in QEMU failed: {t}; run `holdfast doctor {}`)",
            vm.name
        ))),
    }
}

/// Read every disk of the read point (dirty segments only, where a checkpoint was exported)
/// and commit the backup.
#[allow(clippy::too_many_arguments)]
fn read_and_commit(
    repo: &Repo,
    vm: &Vm,
    lock: &VmLock,
    rp: &ops::ReadPoint,
    origins: &[(String, String)],
    prev: Option<&Manifest>,
    full: bool,
    hooks: &Hooks,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let mut specs = Vec::new();
    for d in &rp.disks {
        let name = vm
            .disks
            .iter()
            .find(|(_, n)| *n == d.disk)
            .map(|(n, _)| n.clone())
            .ok_or_else(|| Error::Invalid(format!("read point has unknown disk {}", d.disk)))?;
        let origin = origins
            .iter()
            .find(|(n, _)| *n == d.node)
            .map(|(_, o)| o.clone());
        let bitmap = d.exported_bitmap.as_deref().filter(|_| !full);
        let source = NbdSource::connect(&d.uri, bitmap)?;
        let since = bitmap.and(prev).map(|m| m.id.clone());
        specs.push(DiskSpec {
            name,
            source: Box::new(source),
            since,
            checkpoint: rp.new_bitmap.clone(),
            origin,
        });
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    backup_locked(repo, &vm.name, lock, specs, hooks, progress)
}

/// What holdfast left in a VM's QEMU (and its work directory); removed unless `dry_run`.
pub fn doctor(repo: &Repo, vm: &Vm, dry_run: bool) -> Result<Vec<String>> {
    let _lock = VmLock::acquire(&repo.dir, &vm.name, "doctor")?;
    repo.sync()?;
    let mut active = vm.clone();
    for (_, node) in active.disks.iter_mut() {
        *node = super::snapshot::active_node(repo, &vm.name, node)?;
    }
    let vm = &active;
    let rt = runtime()?;
    let client = connect(&rt, vm)?;
    let (_, keep) = last_checkpoint(repo, &vm.name)?;
    let nodes = node_names(vm);
    let found = if dry_run {
        rt.block_on(ops::find_leftovers(
            &client,
            &vm.work_dir,
            keep.as_deref(),
            Some(&nodes),
        ))?
    } else {
        rt.block_on(ops::clean_leftovers(
            &client,
            &vm.work_dir,
            keep.as_deref(),
            Some(&nodes),
            STEP,
        ))?
    };
    rt.block_on(client.close());
    Ok(describe(&found))
}
