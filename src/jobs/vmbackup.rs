//! Backups of a running VM through QEMU: a consistent read point, changed-block tracking, and
//! a teardown that always runs (DESIGN §6).
//!
//! The cycle, under the VM's task (and lock), which the caller holds:
//! 1. connect to QMP; remove what an earlier, killed holdfast left in QEMU (keeping the
//!    checkpoint bitmap of the last committed backup);
//! 2. optional quiesce through the guest agent (thaw always follows), around
//! 3. one QMP `transaction`: the read point (image fleecing) of every disk, the next persistent
//!    dirty bitmap (the new checkpoint) and the freeze of the previous one;
//! 4. an NBD export per disk carrying the previous checkpoint's bitmap; the incremental read of
//!    the NBD source (only dirty segments are read); commit;
//! 5. teardown: exports, jobs, nodes and fleecing files removed; committed: the old bitmap is
//!    removed; failed or cancelled: the new one is merged back into the old and removed, so
//!    the next incremental still sees every write.
//!
//! Invariants: a bitmap is trusted only when it is the checkpoint recorded by the previous
//! committed backup of that disk, read from the same image ([`plan_disk`]), and QEMU says it
//! is persistent, recording and consistent; anything else is a full read of the allocated
//! extents. A failure at any step leaves QEMU with nothing holdfast created; a kill leaves
//! leftovers that the next run (or `holdfast doctor`) removes.

use super::backup::{backup, DiskSpec};
use super::snapshot::records::active_node;
use super::vms::Vm;
use super::vmsession::VmSession;
use crate::qmp::{ops, Agent, QmpError};
use crate::repo::{DiskEntry, Manifest, Repo};
use crate::source::NbdSource;
use crate::task::Ctx;
use crate::{Error, Result};
use serde::Serialize;
use std::time::Duration;

/// Bound of each QMP step (a command, a job wait).
const STEP: Duration = Duration::from_secs(60);
/// Bound of each guest-agent call.
const AGENT_WAIT: Duration = Duration::from_secs(10);

#[derive(Default, Clone, Copy)]
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

/// The VM with each disk's node replaced by the node its data goes to now: after an external
/// snapshot, the overlay on top.
fn with_active_nodes(repo: &Repo, vm: &Vm) -> Result<Vm> {
    let mut active = vm.clone();
    for (_, node) in active.disks.iter_mut() {
        *node = active_node(repo, &vm.name, node)?;
    }
    Ok(active)
}

/// What one disk's read builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// The checkpoint bitmap to export and read dirty segments from (and to rotate out).
    pub previous_bitmap: Option<String>,
    /// Why the whole disk is read, when it is.
    pub full_read: Option<String>,
}

/// Which checkpoint a disk's incremental may trust (pure: the rule of the module docs).
/// `prev` is the disk in the newest committed backup of the VM; `size` and `origin` (QEMU node
/// and image file) describe the disk now; `all_qcow2` says whether every disk of the VM can
/// hold the persistent bitmap a checkpoint needs.
pub fn plan_disk(
    prev: Option<&DiskEntry>,
    size: u64,
    origin: &str,
    all_qcow2: bool,
    full: bool,
) -> DiskPlan {
    let (previous_bitmap, why) = match prev {
        None => (None, Some("first backup of this disk".to_string())),
        Some(d) if d.size != size => (
            None,
            Some(format!(
                "the disk changed size ({} to {size} bytes)",
                d.size
            )),
        ),
        Some(d) if d.origin.as_deref() != Some(origin) => (
            None,
            Some(format!(
                "the previous backup read it from {}",
                d.origin.as_deref().unwrap_or("another source")
            )),
        ),
        // No bitmap can follow the previous one on a raw disk: never freeze it then.
        Some(_) if !all_qcow2 => (
            None,
            Some(
                "the VM has a raw disk, which cannot hold the persistent dirty bitmap every \
                 disk's checkpoint needs"
                    .to_string(),
            ),
        ),
        Some(d) => match &d.checkpoint {
            None => (
                None,
                Some("the previous backup left no checkpoint".to_string()),
            ),
            Some(cp) => (Some(cp.clone()), None),
        },
    };
    // With --full the previous checkpoint is still rotated out (and removed at commit); only
    // its bitmap is not read.
    let full_read = if full {
        Some("--full".to_string())
    } else {
        why
    };
    DiskPlan {
        previous_bitmap,
        full_read,
    }
}

/// A disk of the VM as QEMU has it now, checked to be the one its data is written to.
struct LiveDisk {
    name: String,
    info: ops::BlockNode,
}

/// Look every disk up; refuse a node that something sits on top of (reading it would back up
/// stale data, and QEMU opens such a backing node read-only).
fn live_disks(s: &VmSession, vm: &Vm) -> Result<Vec<LiveDisk>> {
    let all = s.run("listing block nodes", ops::list_nodes)?;
    let mut out = Vec::new();
    for (name, node) in &vm.disks {
        let info = s
            .block_on(ops::find_disk(s.client(), node))
            .map_err(|e| match e {
                QmpError::NotFound(_) => Error::not_found(
                    crate::error::What::QemuNode,
                    node.clone(),
                    format!(
                        "VM {} disk {name}: {e}; check the node name (`holdfast vm list`, or \
                         query-named-block-nodes)",
                        vm.name
                    ),
                ),
                e => Error::qemu(&vm.name, "looking up the disks")(e),
            })?;
        let top = all.iter().find(|n| {
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
            return Err(Error::Conflict(format!(
                "VM {} disk {name}: node {} {what}; declare the top node as the disk (`holdfast \
                 vm remove` / `vm add`)",
                vm.name, info.node_name
            )));
        }
        out.push(LiveDisk {
            name: name.clone(),
            info,
        });
    }
    Ok(out)
}

fn new_checkpoint_name() -> String {
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    format!(
        "{}cp-{}-{}",
        ops::PREFIX,
        crate::timefmt::compact(crate::timefmt::now_secs()),
        hex::encode(r)
    )
}

/// Check what can be checked before QEMU is touched.
fn check_request(vm: &Vm, opts: &VmBackupOptions) -> Result<()> {
    crate::names::check("VM", &vm.name)?;
    if vm.disks.is_empty() {
        return Err(Error::usage(format!(
            "VM {} has no disks to back up; declare them with --disk NAME=NODE",
            vm.name
        )));
    }
    if opts.quiesce && vm.agent.is_none() {
        return Err(Error::usage(format!(
            "--quiesce needs VM {}'s guest agent socket: set agent = \"PATH\" for it in the \
             config, or pass --agent PATH",
            vm.name
        )));
    }
    Ok(())
}

/// What the read point asks of QEMU, which image each node is, and why disks are read whole.
struct Planned {
    req: ops::ReadPointRequest,
    origins: Vec<(String, String)>,
    full_reads: Vec<(String, String)>,
}

fn plan(vm: &Vm, disks: &[LiveDisk], prev: Option<&Manifest>, opts: &VmBackupOptions) -> Planned {
    let all_qcow2 = disks.iter().all(|d| d.info.driver == "qcow2");
    let mut full_reads = Vec::new();
    let mut requests = Vec::new();
    let mut origins = Vec::new();
    for d in disks {
        // Which image this disk is: a checkpoint is trusted only on the same node and file.
        let origin = format!("qemu node {} file {}", d.info.node_name, d.info.file);
        let prev_disk = prev.and_then(|m| m.disks.iter().find(|x| x.name == d.name));
        let p = plan_disk(
            prev_disk,
            d.info.virtual_size,
            &origin,
            all_qcow2,
            opts.full,
        );
        full_reads.extend(p.full_read.map(|why| (d.name.clone(), why)));
        requests.push(ops::DiskRequest {
            disk: d.info.node_name.clone(),
            previous_bitmap: p.previous_bitmap,
        });
        origins.push((d.info.node_name.clone(), origin));
    }
    let nbd = vm
        .nbd_socket
        .clone()
        .map(ops::NbdServer::Existing)
        .unwrap_or(ops::NbdServer::Own);
    let req = ops::ReadPointRequest {
        work_dir: vm.work_dir.clone(),
        disks: requests,
        new_bitmap: all_qcow2.then(new_checkpoint_name),
        nbd,
        timeout: STEP,
    };
    Planned {
        req,
        origins,
        full_reads,
    }
}

/// Back up every disk of a running VM (see the module docs).
pub fn backup_vm(
    repo: &Repo,
    vm: &Vm,
    opts: &VmBackupOptions,
    ctx: &Ctx,
) -> Result<VmBackupReport> {
    check_request(vm, opts)?;
    repo.sync()?;
    let vm = &with_active_nodes(repo, vm)?;
    std::fs::create_dir_all(&vm.work_dir)
        .map_err(|e| Error::io(format!("create {}", vm.work_dir.display()), e))?;
    let s = VmSession::connect(vm)?;
    let (prev, keep) = last_checkpoint(repo, &vm.name)?;
    let disks = live_disks(&s, vm)?;
    let nodes: Vec<String> = vm.disks.iter().map(|(_, n)| n.clone()).collect();
    let cleaned = describe(&s.run("removing what an interrupted run left", |c| {
        ops::clean_leftovers(c, &vm.work_dir, keep.as_deref(), Some(&nodes), STEP)
    })?);
    for c in &cleaned {
        ctx.info(&format!("removed a leftover of an interrupted run: {c}"));
    }
    let mut planned = plan(vm, &disks, prev.as_ref(), opts);
    let rp = create_read_point(&s, vm, &planned.req, opts.quiesce)?;
    for d in rp.disks.iter().filter(|_| !opts.full) {
        if d.previous_bitmap.is_some() && d.exported_bitmap.is_none() {
            let why = d.bitmap_note.clone();
            planned.full_reads.push((
                disk_name(vm, &d.disk).unwrap_or_default(),
                why.unwrap_or_else(|| "QEMU does not offer the previous checkpoint".into()),
            ));
        }
    }
    for (disk, why) in &planned.full_reads {
        ctx.info(&format!("disk {disk}: full read ({why})"));
    }
    let result = crate::hooks::point("after-read-point").and_then(|_| {
        read_and_commit(
            repo,
            vm,
            &rp,
            &planned.origins,
            prev.as_ref(),
            opts.full,
            ctx,
        )
    });
    let outcome = match result {
        Ok(_) => {
            let _ = crate::hooks::point("after-commit"); // the commit stands: only a kill applies
            ops::Outcome::Committed
        }
        Err(_) => ops::Outcome::Failed,
    };
    let torn = s.run("tearing the read point down", |c| {
        ops::teardown(c, &rp, outcome, STEP)
    });
    s.close();
    let (manifest, teardown_warning) = settle(vm, result, torn, ctx)?;
    Ok(VmBackupReport {
        manifest,
        cleaned,
        quiesced: rp.quiesced,
        full_reads: planned.full_reads,
        teardown_warning,
    })
}

/// The backup's result after teardown: a teardown failure after a commit is a warning (the
/// backup is good; `holdfast doctor` cleans up), after a failure it is logged beside the error.
fn settle(
    vm: &Vm,
    result: Result<Manifest>,
    torn: Result<()>,
    ctx: &Ctx,
) -> Result<(Manifest, Option<String>)> {
    match (result, torn) {
        (Ok(m), Ok(())) => Ok((m, None)),
        (Ok(m), Err(e)) => {
            let w = format!("{e}; `holdfast doctor {}` cleans up", vm.name);
            ctx.warn(&w);
            Ok((m, Some(w)))
        }
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(t)) => {
            ctx.warn(&format!(
                "the cleanup in QEMU failed too: {t}; run `holdfast doctor {}`",
                vm.name
            ));
            Err(e)
        }
    }
}

fn disk_name(vm: &Vm, node: &str) -> Option<String> {
    vm.disks
        .iter()
        .find(|(_, n)| n == node)
        .map(|(name, _)| name.clone())
}

/// The read point, quiesced through the guest agent when asked.
fn create_read_point(
    s: &VmSession,
    vm: &Vm,
    req: &ops::ReadPointRequest,
    quiesce: bool,
) -> Result<ops::ReadPoint> {
    let agent = vm
        .agent
        .as_ref()
        .filter(|_| quiesce)
        .map(|p| Agent::new(p, AGENT_WAIT));
    s.block_on(ops::create_read_point(s.client(), req, agent.as_ref()))
        .map_err(|e| match e {
            e @ (QmpError::AgentTimeout { .. } | QmpError::AgentConnect { .. }) => {
                Error::qemu(&vm.name, "quiescing the guest (no read point was made; holdfast sent a thaw after any freeze: retry without --quiesce for a crash-consistent backup)")(e)
            }
            e => Error::qemu(&vm.name, "creating the read point")(e),
        })
}

/// Read every disk of the read point (dirty segments only, where a checkpoint was exported)
/// and commit the backup.
fn read_and_commit(
    repo: &Repo,
    vm: &Vm,
    rp: &ops::ReadPoint,
    origins: &[(String, String)],
    prev: Option<&Manifest>,
    full: bool,
    ctx: &Ctx,
) -> Result<Manifest> {
    let mut specs = Vec::new();
    for d in &rp.disks {
        let name = disk_name(vm, &d.disk)
            .ok_or_else(|| Error::internal(format!("read point has unknown disk {}", d.disk)))?;
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
    backup(repo, &vm.name, specs, ctx)
}

/// What holdfast left in a VM's QEMU (and its work directory); removed unless `dry_run`.
pub fn doctor(repo: &Repo, vm: &Vm, dry_run: bool) -> Result<Vec<String>> {
    repo.sync()?;
    let vm = &with_active_nodes(repo, vm)?;
    let s = VmSession::connect(vm)?;
    let (_, keep) = last_checkpoint(repo, &vm.name)?;
    let nodes: Vec<String> = vm.disks.iter().map(|(_, n)| n.clone()).collect();
    let found = if dry_run {
        s.run("looking for leftovers", |c| {
            ops::find_leftovers(c, &vm.work_dir, keep.as_deref(), Some(&nodes))
        })?
    } else {
        s.run("removing leftovers", |c| {
            ops::clean_leftovers(c, &vm.work_dir, keep.as_deref(), Some(&nodes), STEP)
        })?
    };
    s.close();
    Ok(describe(&found))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64, origin: &str, checkpoint: Option<&str>) -> DiskEntry {
        DiskEntry {
            name: "root".into(),
            size,
            segment_size: 4 << 20,
            index: vec![],
            source: "nbd".into(),
            data_bytes: 0,
            bitmap: None,
            since: None,
            checkpoint: checkpoint.map(String::from),
            origin: Some(origin.into()),
            grew_to: None,
        }
    }

    const O: &str = "qemu node disk0 file /vm/a.qcow2";

    #[test]
    fn only_the_previous_backups_checkpoint_of_the_same_image_is_trusted() {
        let prev = disk(100, O, Some("holdfast-cp-1"));
        let trusted = plan_disk(Some(&prev), 100, O, true, false);
        assert_eq!(trusted.previous_bitmap.as_deref(), Some("holdfast-cp-1"));
        assert_eq!(trusted.full_read, None);
        let why = |p: DiskPlan| (p.previous_bitmap, p.full_read.unwrap_or_default());
        let (bm, w) = why(plan_disk(None, 100, O, true, false));
        assert!(bm.is_none() && w == "first backup of this disk");
        let (bm, w) = why(plan_disk(Some(&prev), 200, O, true, false));
        assert!(
            bm.is_none() && w.contains("changed size (100 to 200"),
            "{w}"
        );
        let (bm, w) = why(plan_disk(
            Some(&prev),
            100,
            "qemu node disk0 file /b",
            true,
            false,
        ));
        assert!(
            bm.is_none() && w.contains("read it from qemu node disk0 file /vm/a"),
            "{w}"
        );
        let (bm, w) = why(plan_disk(Some(&prev), 100, O, false, false));
        assert!(bm.is_none() && w.contains("raw disk"), "{w}");
        let (bm, w) = why(plan_disk(Some(&disk(100, O, None)), 100, O, true, false));
        assert!(bm.is_none() && w.contains("left no checkpoint"), "{w}");
    }

    #[test]
    fn full_reads_everything_but_still_rotates_the_checkpoint_out() {
        let prev = disk(100, O, Some("holdfast-cp-1"));
        let p = plan_disk(Some(&prev), 100, O, true, true);
        assert_eq!(p.previous_bitmap.as_deref(), Some("holdfast-cp-1"));
        assert_eq!(p.full_read.as_deref(), Some("--full"));
    }
}
