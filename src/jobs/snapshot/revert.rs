//! Returning a VM to a snapshot: memory snapshots while it runs, disk-only ones (internal or
//! external) only while it is shut down, as QEMU allows.

use super::offline::{drop_checkpoints, holds_tag, path, qemu_img};
use super::records::{record, records, Kind, Snapshot};
use super::JOB_WAIT;
use crate::jobs::vms::Vm;
use crate::jobs::vmsession::VmSession;
use crate::qmp::ops;
use crate::repo::Repo;
use crate::{Error, Result};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Serialize)]
pub struct RevertReport {
    pub snapshot: Snapshot,
    /// The VM was running and reverted in place (memory snapshots), or its images were reverted
    /// while it was shut down.
    pub online: bool,
    pub running_after: Option<bool>,
}

/// Revert `vm` to its snapshot `name`. The caller holds the VM's lock.
pub fn revert(repo: &Repo, vm: &Vm, name: &str) -> Result<RevertReport> {
    super::check_name(name)?;
    let s = record(repo, &vm.name, name)?;
    if s.kind == Kind::External {
        if let Some(newer) = records(repo, Some(&vm.name))?
            .into_iter()
            .find(|x| x.kind == Kind::External && x.created_ms > s.created_ms)
        {
            return Err(Error::Conflict(format!(
                "snapshot {} of VM {} was taken on top of {name}: delete it first (`holdfast \
                 snapshot delete {} {}`), then revert",
                newer.name, vm.name, vm.name, newer.name
            )));
        }
    }
    match (VmSession::try_connect(vm)?, &s.kind, &s.vmstate) {
        (Some(session), Kind::Internal, Some(vmstate)) => {
            let running = revert_online(&session, &s, vmstate)?;
            session.close();
            Ok(report(s, true, Some(running)))
        }
        (Some(_), _, _) => Err(Error::Conflict(format!(
            "snapshot {name} of VM {} is disk-only: QEMU cannot revert it while the VM runs; shut \
             the VM down, then run `holdfast snapshot revert {} {name}` again",
            vm.name, vm.name
        ))),
        (None, Kind::Internal, _) => {
            revert_internal_offline(&s)?;
            Ok(report(s, false, None))
        }
        (None, Kind::External, _) => {
            revert_external_offline(&s)?;
            Ok(report(s, false, None))
        }
    }
}

fn report(snapshot: Snapshot, online: bool, running_after: Option<bool>) -> RevertReport {
    RevertReport {
        snapshot,
        online,
        running_after,
    }
}

/// Load a memory snapshot into the running VM; true when it runs afterwards.
fn revert_online(s: &VmSession, snap: &Snapshot, vmstate: &str) -> Result<bool> {
    let nodes: Vec<String> = snap.disks.iter().map(|d| d.node.clone()).collect();
    // QEMU refuses to revert a disk with dirty bitmaps, and a reverted disk differs from the
    // last backup in blocks no bitmap recorded: drop holdfast's checkpoints, so the next
    // backup reads every allocated extent.
    let all = s.run("listing block nodes", ops::list_nodes)?;
    for n in all.iter().filter(|n| nodes.contains(&n.node_name)) {
        for b in n.bitmaps.iter().filter(|b| b.name.starts_with(ops::PREFIX)) {
            s.run("removing a checkpoint bitmap", |c| {
                ops::remove_bitmap(c, &n.node_name, &b.name)
            })?;
        }
    }
    let st = s.run("loading the snapshot", |c| {
        ops::load_internal_snapshot(c, &snap.tag, &nodes, vmstate, true, JOB_WAIT)
    })?;
    Ok(st.running)
}

/// `qemu-img snapshot -a` on every image, all or nothing: every image must hold the tag
/// before any is touched.
fn revert_internal_offline(s: &Snapshot) -> Result<()> {
    for d in &s.disks {
        if !holds_tag(&d.file, &s.tag)? {
            return Err(Error::Conflict(format!(
                "disk {} ({}) no longer holds snapshot {} (tag {}); nothing was reverted",
                d.name, d.file, s.name, s.tag
            )));
        }
    }
    for d in &s.disks {
        drop_checkpoints(&d.file)?;
    }
    for (i, d) in s.disks.iter().enumerate() {
        if let Err(e) = qemu_img(&["snapshot", "-a", &s.tag, &d.file], false) {
            let done: Vec<&str> = s.disks[..i].iter().map(|d| d.name.as_str()).collect();
            if done.is_empty() {
                return Err(e);
            }
            return Err(Error::Tool {
                tool: "qemu-img",
                message: format!("{e}; disks {} were already reverted", done.join(", ")),
            });
        }
    }
    Ok(())
}

/// An empty overlay over each untouched base: the disks as they were at the snapshot.
fn revert_external_offline(s: &Snapshot) -> Result<()> {
    for d in &s.disks {
        let Some(ov) = &d.overlay else { continue };
        let tmp = PathBuf::from(format!("{}.holdfast-revert", ov.file.display()));
        let args = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            &d.format,
            "-b",
            &d.file,
            path(&tmp)?,
        ];
        qemu_img(&args, false)?;
        std::fs::rename(&tmp, &ov.file)
            .map_err(|e| Error::io(format!("replace {}", ov.file.display()), e))?;
    }
    Ok(())
}
