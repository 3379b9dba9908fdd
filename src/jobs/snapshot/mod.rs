//! VM snapshots: the rollback points users take before risky changes. Created, listed,
//! reverted, renamed, deleted and expired through QEMU; described by a small record in the
//! store (`snapshots/<vm>/<name>`, [`records`]), so they survive a lost catalog like the
//! backups do.
//!
//! Which kind (docs/snapshots.md has the whole story):
//! - every disk qcow2 → QEMU internal snapshots: `snapshot-save` with `--memory` (RAM and device
//!   state; revert resumes the VM where it was), else one `transaction` of
//!   `blockdev-snapshot-internal-sync` (disk-only; QEMU reverts those only offline, so holdfast
//!   runs `qemu-img snapshot -a` once the VM is shut down);
//! - any raw disk → external qcow2 overlays (`blockdev-snapshot-sync`, disk-only): delete
//!   commits the overlay back (`block-commit`), revert (offline) empties it again.
//!
//! Invariants: names are `[A-Za-z0-9_-]`; QEMU's tag is an immutable `holdfast-snap-…`, so
//! rename touches only the record; a VM holds at most its limit of snapshots; a group
//! snapshot of several VMs is all or nothing (created ones are deleted again on failure);
//! every operation runs under the VM's lock, which the caller (the task) holds.

mod clone;
mod create;
mod offline;
pub mod records;
mod revert;

pub use clone::{check_format as check_clone_format, clone, CloneReport};
pub use create::{check_room, create, CreateArgs};
pub use records::{check_name, record, records, Kind, SnapDisk, Snapshot};
pub use revert::{revert, RevertReport};

use super::vms::Vm;
use super::vmsession::VmSession;
use crate::error::What;
use crate::qmp::ops;
use crate::repo::Repo;
use crate::{Error, Result};
use offline::{path, qemu_img};
use serde::Serialize;
use std::time::Duration;

const JOB_WAIT: Duration = Duration::from_secs(600);

/// Remove the snapshot in QEMU (online) or in the image files (offline), then its record.
fn remove(repo: &Repo, vm: &Vm, s: &Snapshot) -> Result<()> {
    match VmSession::try_connect(vm)? {
        Some(session) => {
            match s.kind {
                Kind::Internal => {
                    let nodes: Vec<String> = s.disks.iter().map(|d| d.node.clone()).collect();
                    session.run("deleting the snapshot", |c| {
                        ops::delete_internal_snapshot(c, &s.tag, &nodes, JOB_WAIT)
                    })?;
                }
                Kind::External => {
                    for ov in s.disks.iter().filter_map(|d| d.overlay.as_ref()) {
                        session.run("committing the overlay", |c| {
                            ops::commit_overlay(c, ov, JOB_WAIT)
                        })?;
                    }
                }
            }
            session.close();
        }
        None => match s.kind {
            Kind::Internal => {
                for d in &s.disks {
                    qemu_img(&["snapshot", "-d", &s.tag, &d.file], true)?;
                }
            }
            Kind::External => {
                for ov in s.disks.iter().filter_map(|d| d.overlay.as_ref()) {
                    if ov.file.exists() {
                        qemu_img(&["commit", path(&ov.file)?], false)?;
                        std::fs::remove_file(&ov.file)
                            .map_err(|e| Error::io(format!("remove {}", ov.file.display()), e))?;
                    }
                }
            }
        },
    }
    records::remove_record(repo, s)
}

/// Delete a snapshot in QEMU and its record; with `forget`, only holdfast's record (for a
/// snapshot already gone, or one to handle by hand). The caller holds the VM's lock.
pub fn delete(repo: &Repo, vm: &Vm, name: &str, forget: bool) -> Result<Snapshot> {
    check_name(name)?;
    let s = record(repo, &vm.name, name)?;
    if forget {
        records::remove_record(repo, &s)?;
    } else {
        remove(repo, vm, &s)?;
    }
    Ok(s)
}

/// Give snapshot `old` of `vm` the name `new`. The caller holds the VM's lock.
pub fn rename(repo: &Repo, vm: &Vm, old: &str, new: &str) -> Result<Snapshot> {
    check_name(old)?;
    check_name(new)?;
    let mut s = record(repo, &vm.name, old)?;
    if repo.store.exists(&records::key(&vm.name, new))? {
        return Err(Error::exists(
            What::Snapshot,
            format!("{}/{new}", vm.name),
            format!("VM {} already has a snapshot named {new}", vm.name),
        ));
    }
    let before = s.clone();
    s.name = new.to_string();
    records::save(repo, &s)?;
    records::remove_record(repo, &before)?;
    Ok(s)
}

/// One snapshot as `snapshot list` shows it.
#[derive(Debug, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// Bytes: saved memory state (internal) or overlay data (external); None if unknown.
    pub size: Option<u64>,
    /// "ok", "missing" (QEMU no longer has it), or "vm not running".
    pub state: String,
}

/// Size and state of snapshot `s` given the VM's block nodes (None: not running).
fn state_of(s: &Snapshot, nodes: Option<&[ops::BlockNode]>) -> (Option<u64>, String) {
    let Some(nodes) = nodes else {
        return (None, "vm not running".to_string());
    };
    let state = |present: bool| if present { "ok" } else { "missing" }.to_string();
    match s.kind {
        Kind::Internal => {
            let found = nodes
                .iter()
                .find(|n| n.node_name == s.disks[0].node)
                .and_then(|n| n.snapshots.iter().find(|x| x.tag == s.tag));
            (found.map(|x| x.vm_state_size), state(found.is_some()))
        }
        Kind::External => {
            let overlays = || s.disks.iter().filter_map(|d| d.overlay.as_ref());
            let present = overlays().all(|ov| nodes.iter().any(|n| n.node_name == ov.overlay_node));
            let bytes = overlays()
                .filter_map(|ov| std::fs::metadata(&ov.file).ok())
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .sum();
            (Some(bytes), state(present))
        }
    }
}

/// Every snapshot (of VM `only`), with what QEMU says about it when the VM runs.
pub fn list(repo: &Repo, vms: &[Vm], only: Option<&str>) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    let all = records(repo, only)?;
    let vm_names: std::collections::BTreeSet<&str> = all.iter().map(|s| s.vm.as_str()).collect();
    for name in vm_names {
        let nodes = vms
            .iter()
            .find(|v| v.name == name)
            .and_then(|vm| VmSession::try_connect(vm).ok().flatten())
            .and_then(|s| s.run("listing block nodes", ops::list_nodes).ok());
        for s in all.iter().filter(|s| s.vm == name) {
            let (size, state) = state_of(s, nodes.as_deref());
            out.push(Listed {
                snapshot: s.clone(),
                size,
                state,
            });
        }
    }
    Ok(out)
}

/// True once snapshot `s` has outlived its lifespan at `now_ms` (pure).
pub fn is_expired(s: &Snapshot, now_ms: u64) -> bool {
    s.expires_ms.is_some_and(|t| t <= now_ms)
}

/// The snapshots past their lifespan at `now_ms`, oldest first.
pub fn expired(repo: &Repo, now_ms: u64) -> Result<Vec<Snapshot>> {
    Ok(records(repo, None)?
        .into_iter()
        .filter(|s| is_expired(s, now_ms))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, created_ms: u64, expires_ms: Option<u64>) -> Snapshot {
        Snapshot {
            version: 1,
            vm: "web".into(),
            name: name.into(),
            tag: "holdfast-snap-1".into(),
            kind: Kind::Internal,
            memory: false,
            quiesced: false,
            created_ms,
            expires_ms,
            description: None,
            vmstate: None,
            disks: vec![],
            group: vec![],
            took_ms: None,
        }
    }

    fn vm(limit: u32) -> Vm {
        Vm {
            name: "web".into(),
            qmp: "/q".into(),
            agent: None,
            work_dir: "/w".into(),
            nbd_socket: None,
            disks: vec![],
            snapshot_ttl: Duration::from_secs(10),
            snapshot_limit: limit,
            snapshot_max_lifespan: crate::policy::MAX_LIFESPAN,
        }
    }

    #[test]
    fn lifespans_end_at_their_expiry_and_never_without_one() {
        assert!(!is_expired(&snap("a", 0, Some(100)), 99));
        assert!(is_expired(&snap("a", 0, Some(100)), 100));
        assert!(!is_expired(&snap("a", 0, None), u64::MAX));
    }

    #[test]
    fn the_limit_and_names_decide_whether_a_snapshot_may_be_taken() {
        let one = [snap("PreUpdate", 0, None)];
        assert!(check_room(&vm(1), "Other", &[]).is_ok());
        assert_eq!(
            check_room(&vm(2), "PreUpdate", &one).unwrap_err().code(),
            "exists"
        );
        let e = check_room(&vm(1), "Other", &one).unwrap_err();
        assert_eq!(e.code(), "limit-reached");
        assert!(e.to_string().contains("its limit is 1"), "{e}");
        assert_eq!(
            check_room(&vm(0), "Other", &[]).unwrap_err().code(),
            "limit-reached"
        );
    }
}
