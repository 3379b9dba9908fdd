//! VM snapshots: the rollback points users take before risky changes. Created, listed,
//! reverted, renamed, deleted and expired through QEMU; described by a small record in the
//! store (`snapshots/<vm>/<name>`), so they survive a lost catalog like the backups do.
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
//! every operation holds the VM's lock.

use super::lock::VmLock;
use super::vmbackup::runtime;
use super::vms::Vm;
use crate::qmp::{ops, Agent, Client, QmpError};
use crate::repo::Repo;
use crate::store::StoreError;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

const JOB_WAIT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Kind {
    /// qcow2 internal snapshots (with or without memory).
    Internal,
    /// qcow2 overlays on top of the disks.
    External,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapDisk {
    pub name: String,
    /// The node the snapshot was taken of.
    pub node: String,
    /// Its image file and format (for offline revert and delete).
    pub file: String,
    pub format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<ops::Overlay>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub version: u32,
    pub vm: String,
    pub name: String,
    /// QEMU's tag (internal snapshots); never changes.
    pub tag: String,
    pub kind: Kind,
    pub memory: bool,
    pub quiesced: bool,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The node holding the memory state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmstate: Option<String>,
    pub disks: Vec<SnapDisk>,
    /// VMs snapshotted together (a group snapshot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<String>,
}

fn key(vm: &str, name: &str) -> String {
    format!("snapshots/{vm}/{name}")
}

/// Snapshot names: 1–64 of `[A-Za-z0-9_-]`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        return Ok(());
    }
    let mut example: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    if example.is_empty() {
        example = "PreUpdate".into();
    }
    Err(Error::Invalid(format!("invalid snapshot name {name:?}: use letters, digits, '-' and '_' only (e.g. {example}, not {name:?})")))
}

/// Every snapshot record of `vm` (all VMs when None), oldest first.
pub fn records(repo: &Repo, vm: Option<&str>) -> Result<Vec<Snapshot>> {
    let prefix = match vm {
        Some(v) => format!("snapshots/{v}/"),
        None => "snapshots/".into(),
    };
    let mut out = Vec::new();
    for k in repo.store.list(&prefix)? {
        let raw = repo.store.get(&k)?;
        let s: Snapshot = serde_json::from_slice(&raw).map_err(|e| {
            Error::Damaged(format!(
                "snapshot record {k} is damaged ({e}); delete it from the store"
            ))
        })?;
        out.push(s);
    }
    out.sort_by_key(|s| (s.created_ms, s.name.clone()));
    Ok(out)
}

fn record(repo: &Repo, vm: &str, name: &str) -> Result<Snapshot> {
    match repo.store.get(&key(vm, name)) {
        Ok(raw) => serde_json::from_slice(&raw).map_err(|e| {
            Error::Damaged(format!(
                "snapshot record {} is damaged ({e})",
                key(vm, name)
            ))
        }),
        Err(StoreError::NotFound(_)) => {
            let have: Vec<String> = records(repo, Some(vm))?
                .into_iter()
                .map(|s| s.name)
                .collect();
            let have = if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            };
            Err(Error::NotFound(format!(
                "VM {vm} has no snapshot {name:?} (its snapshots: {have})"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

fn save(repo: &Repo, s: &Snapshot) -> Result<()> {
    let json = serde_json::to_vec_pretty(s).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(repo.store.put(&key(&s.vm, &s.name), &json)?)
}

pub struct CreateArgs {
    pub name: String,
    pub memory: bool,
    pub quiesce: bool,
    pub description: Option<String>,
    /// None: the VM's configured lifespan.
    pub ttl: Option<Duration>,
}

/// Take snapshot `args.name` of every VM in `vms` (each VM's disks in one step); all or none.
pub fn create(repo: &Repo, vms: &[Vm], args: &CreateArgs) -> Result<Vec<Snapshot>> {
    check_name(&args.name)?;
    if vms.is_empty() {
        return Err(Error::Invalid("name at least one VM".into()));
    }
    let mut locks = Vec::new();
    for vm in vms {
        crate::names::check("VM", &vm.name)?;
        if args.quiesce && vm.agent.is_none() {
            return Err(Error::Invalid(format!("--quiesce needs VM {}'s guest agent socket: set agent = \"PATH\" for it in the config", vm.name)));
        }
        locks.push(VmLock::acquire(&repo.dir, &vm.name, "snapshot")?);
        let have = records(repo, Some(&vm.name))?;
        if have.iter().any(|s| s.name == args.name) {
            return Err(Error::Invalid(format!(
                "VM {} already has a snapshot named {}; pick another name or delete it first",
                vm.name, args.name
            )));
        }
        if vm.snapshot_limit == 0 {
            return Err(Error::Invalid(format!(
                "VM {} may hold no snapshots (snapshot_limit = 0 in the config)",
                vm.name
            )));
        }
        if have.len() >= vm.snapshot_limit as usize {
            let list: Vec<String> = have
                .iter()
                .map(|s| {
                    format!(
                        "{} (taken {})",
                        s.name,
                        crate::timefmt::rfc3339(s.created_ms / 1000)
                    )
                })
                .collect();
            return Err(Error::Invalid(format!(
                "VM {} already has {} snapshot(s): {}; its limit is {}: delete one first (`holdfast snapshot delete {} {}`) or raise snapshot_limit in the config",
                vm.name,
                have.len(),
                list.join(", "),
                vm.snapshot_limit,
                vm.name,
                have[0].name
            )));
        }
    }
    let group: Vec<String> = if vms.len() > 1 {
        vms.iter().map(|v| v.name.clone()).collect()
    } else {
        Vec::new()
    };
    let rt = runtime()?;
    let mut made: Vec<(Snapshot, &Vm)> = Vec::new();
    for vm in vms {
        match create_one(repo, &rt, vm, args, &group) {
            Ok(s) => made.push((s, vm)),
            Err(e) => {
                for (s, vm) in &made {
                    if let Err(u) = remove(repo, &rt, vm, s) {
                        tracing::error!(
                            "could not undo snapshot {} of VM {}: {u}",
                            s.name,
                            vm.name
                        );
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(made.into_iter().map(|(s, _)| s).collect())
}

fn create_one(
    repo: &Repo,
    rt: &tokio::runtime::Runtime,
    vm: &Vm,
    args: &CreateArgs,
    group: &[String],
) -> Result<Snapshot> {
    if vm.disks.is_empty() {
        return Err(Error::Invalid(format!(
            "VM {} has no disks declared",
            vm.name
        )));
    }
    let client = super::vmbackup::connect(rt, vm)?;
    let mut disks = Vec::new();
    for (name, node) in &vm.disks {
        let n = rt.block_on(ops::find_disk(&client, &active_node(repo, &vm.name, node)?))?;
        disks.push(SnapDisk {
            name: name.clone(),
            node: n.node_name,
            file: n.file,
            format: n.driver,
            overlay: None,
        });
    }
    // Under an external snapshot the disks are qcow2 overlays; an internal snapshot inside one
    // would be lost when that overlay is committed or reverted, so keep stacking overlays.
    let under_overlay = records(repo, Some(&vm.name))?
        .iter()
        .any(|s| s.kind == Kind::External);
    let internal = !under_overlay && disks.iter().all(|d| d.format == "qcow2");
    if args.memory && !internal {
        let why = if under_overlay {
            "the VM's disks are under an external snapshot (delete it first)".to_string()
        } else {
            let raw: Vec<&str> = disks
                .iter()
                .filter(|d| d.format != "qcow2")
                .map(|d| d.name.as_str())
                .collect();
            format!("VM {}'s disk(s) {} are not qcow2", vm.name, raw.join(", "))
        };
        return Err(Error::Invalid(format!("--memory needs qcow2 disks (QEMU keeps memory state inside one): {why}; take a disk-only snapshot instead")));
    }
    let mut r = [0u8; 4];
    getrandom::fill(&mut r).map_err(|e| Error::Invalid(e.to_string()))?;
    let tag = format!("{}snap-{}", ops::PREFIX, hex::encode(r));
    let now = crate::timefmt::now_millis();
    let ttl = args.ttl.unwrap_or(vm.snapshot_ttl);
    let mut snap = Snapshot {
        version: 1,
        vm: vm.name.clone(),
        name: args.name.clone(),
        tag: tag.clone(),
        kind: if internal {
            Kind::Internal
        } else {
            Kind::External
        },
        memory: args.memory,
        quiesced: false,
        created_ms: now,
        expires_ms: Some(now.saturating_add(ttl.as_millis() as u64)),
        description: args.description.clone(),
        vmstate: None,
        disks,
        group: group.to_vec(),
    };
    let nodes: Vec<String> = snap.disks.iter().map(|d| d.node.clone()).collect();
    let agent = vm
        .agent
        .as_ref()
        .filter(|_| args.quiesce)
        .map(|p| Agent::new(p, Duration::from_secs(10)));
    if let Some(a) = &agent {
        rt.block_on(a.ping()).map_err(|e| {
            Error::Invalid(format!(
                "{e}; the VM was not changed: retry without --quiesce"
            ))
        })?;
        if let Err(e) = rt.block_on(a.fsfreeze_freeze()) {
            // The freeze may still happen late: always thaw.
            let thaw = thaw_hard(rt, a)
                .err()
                .map(|t| {
                    format!(
                        "; the thaw failed too ({t}): the guest's filesystems may still be frozen"
                    )
                })
                .unwrap_or_default();
            return Err(Error::Invalid(format!(
                "{e}; no snapshot was taken{thaw}; retry without --quiesce"
            )));
        }
    }
    let taken = if internal {
        snap.vmstate = args.memory.then(|| nodes[0].clone());
        rt.block_on(ops::save_internal_snapshot(
            &client,
            &tag,
            &nodes,
            snap.vmstate.as_deref(),
            JOB_WAIT,
        ))
        .map_err(|e| match e {
            e if e.class() == Some("CommandNotFound") => Error::Invalid(format!(
                "--memory needs a full VM (qemu-system); this QEMU cannot save memory state: {e}"
            )),
            e => e.into(),
        })
    } else {
        let reqs: Vec<ops::OverlayRequest> = snap
            .disks
            .iter()
            .map(|d| ops::OverlayRequest {
                node: d.node.clone(),
                file: PathBuf::from(format!("{}.{tag}.qcow2", d.file)),
            })
            .collect();
        rt.block_on(ops::create_overlays(&client, &reqs))
            .map_err(Error::from)
            .map(|ovs| {
                for (d, ov) in snap.disks.iter_mut().zip(ovs) {
                    d.overlay = Some(ov);
                }
            })
    };
    if let Some(a) = &agent {
        match thaw_hard(rt, a) {
            Ok(()) => snap.quiesced = taken.is_ok(),
            Err(e) => {
                let what = if taken.is_ok() {
                    "the snapshot was taken, but "
                } else {
                    ""
                };
                rt.block_on(client.close());
                if taken.is_ok() {
                    let _ = save(repo, &snap);
                }
                return Err(Error::Invalid(format!("VM {}: {what}thawing the guest's filesystems failed ({e}): they may still be frozen; check the guest", vm.name)));
            }
        }
    }
    rt.block_on(client.close()); // one QMP client at a time: free it before any undo
    taken?;
    if let Err(e) = save(repo, &snap) {
        return Err(match remove(repo, rt, vm, &snap) {
            Ok(()) => e,
            Err(u) => Error::Invalid(format!("{e}; undoing the snapshot in QEMU failed too ({u}): tag {} is left without a record", snap.tag)),
        });
    }
    Ok(snap)
}

/// Thaw the guest's filesystems, retrying a few times (a thaw that fails leaves the guest
/// unable to write).
fn thaw_hard(rt: &tokio::runtime::Runtime, a: &Agent) -> std::result::Result<(), QmpError> {
    let mut last = None;
    for _ in 0..3 {
        match rt.block_on(a.fsfreeze_thaw()) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| QmpError::Invalid("thaw".into())))
}

/// The node a disk's data is written to now: the newest holdfast overlay over `node`, or
/// `node` itself.
pub fn active_node(repo: &Repo, vm: &str, node: &str) -> Result<String> {
    let mut cur = node.to_string();
    for s in records(repo, Some(vm))? {
        for d in &s.disks {
            if let Some(ov) = &d.overlay {
                if ov.base == cur {
                    cur = ov.overlay_node.clone();
                }
            }
        }
    }
    Ok(cur)
}

/// Remove the snapshot in QEMU (online) or in the image files (offline), then its record.
fn remove(repo: &Repo, rt: &tokio::runtime::Runtime, vm: &Vm, s: &Snapshot) -> Result<()> {
    match try_connect(rt, vm)? {
        Some(client) => {
            match s.kind {
                Kind::Internal => {
                    let nodes: Vec<String> = s.disks.iter().map(|d| d.node.clone()).collect();
                    rt.block_on(ops::delete_internal_snapshot(
                        &client, &s.tag, &nodes, JOB_WAIT,
                    ))?;
                }
                Kind::External => {
                    for ov in s.disks.iter().filter_map(|d| d.overlay.as_ref()) {
                        rt.block_on(ops::commit_overlay(&client, ov, JOB_WAIT))?;
                    }
                }
            }
            rt.block_on(client.close());
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
    match repo.store.delete(&key(&s.vm, &s.name)) {
        Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Invalid(format!("{} is not UTF-8", p.display())))
}

/// The VM's QMP connection, or None when it is not running (no socket, or nobody listening).
fn try_connect(rt: &tokio::runtime::Runtime, vm: &Vm) -> Result<Option<Client>> {
    match rt.block_on(Client::connect(&vm.qmp, Duration::from_secs(10))) {
        Ok(c) => Ok(Some(c)),
        Err(QmpError::Connect { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Remove holdfast's checkpoint bitmaps from a qcow2 file of a VM that is shut down (see
/// `revert`: the next backup then reads every allocated extent).
fn drop_checkpoints_offline(file: &str) -> Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U", file])
        .output()
        .map_err(|e| Error::io("run qemu-img (apt-get install qemu-utils)", e))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "qemu-img info {file} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Invalid(format!("qemu-img info {file}: {e}")))?;
    let names: Vec<String> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str())
        .filter(|n| n.starts_with(ops::PREFIX))
        .map(String::from)
        .collect();
    for n in names {
        qemu_img(&["bitmap", "--remove", file, &n], false)?;
    }
    Ok(())
}

fn qemu_img(args: &[&str], missing_ok: bool) -> Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| Error::io("run qemu-img (apt-get install qemu-utils)", e))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || (missing_ok && err.contains("not found")) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "qemu-img {} failed: {}",
        args.join(" "),
        err.trim().replace('\n', " ")
    )))
}

/// Delete a snapshot in QEMU and its record; with `forget`, only holdfast's record (for a
/// snapshot already gone, or one to handle by hand).
pub fn delete(repo: &Repo, vm: &Vm, name: &str, forget: bool) -> Result<Snapshot> {
    check_name(name)?;
    let _lock = VmLock::acquire(&repo.dir, &vm.name, "snapshot delete")?;
    let s = record(repo, &vm.name, name)?;
    if forget {
        repo.store.delete(&key(&s.vm, &s.name))?;
    } else {
        remove(repo, &runtime()?, vm, &s)?;
    }
    Ok(s)
}

pub fn rename(repo: &Repo, vm: &Vm, old: &str, new: &str) -> Result<Snapshot> {
    check_name(old)?;
    check_name(new)?;
    let _lock = VmLock::acquire(&repo.dir, &vm.name, "snapshot rename")?;
    let mut s = record(repo, &vm.name, old)?;
    if repo.store.exists(&key(&vm.name, new))? {
        return Err(Error::Invalid(format!(
            "VM {} already has a snapshot named {new}",
            vm.name
        )));
    }
    s.name = new.to_string();
    save(repo, &s)?;
    repo.store.delete(&key(&vm.name, old))?;
    Ok(s)
}

#[derive(Debug, Serialize)]
pub struct RevertReport {
    pub snapshot: Snapshot,
    /// The VM was running and reverted in place (memory snapshots), or its images were reverted
    /// while it was shut down.
    pub online: bool,
    pub running_after: Option<bool>,
}

pub fn revert(repo: &Repo, vm: &Vm, name: &str) -> Result<RevertReport> {
    check_name(name)?;
    let _lock = VmLock::acquire(&repo.dir, &vm.name, "snapshot revert")?;
    let s = record(repo, &vm.name, name)?;
    if s.kind == Kind::External {
        if let Some(newer) = records(repo, Some(&vm.name))?
            .into_iter()
            .find(|x| x.kind == Kind::External && x.created_ms > s.created_ms)
        {
            return Err(Error::Invalid(format!("snapshot {} of VM {} was taken on top of {name}: delete it first (`holdfast snapshot delete {} {}`), then revert", newer.name, vm.name, vm.name, newer.name)));
        }
    }
    let rt = runtime()?;
    let nodes: Vec<String> = s.disks.iter().map(|d| d.node.clone()).collect();
    match (try_connect(&rt, vm)?, &s.kind, &s.vmstate) {
        (Some(client), Kind::Internal, Some(vmstate)) => {
            // QEMU refuses to revert a disk with dirty bitmaps, and a reverted disk differs
            // from the last backup in blocks no bitmap recorded: drop holdfast's checkpoints,
            // so the next backup reads every allocated extent.
            for n in rt.block_on(ops::list_nodes(&client))?.iter().filter(|n| nodes.contains(&n.node_name)) {
                for b in n.bitmaps.iter().filter(|b| b.name.starts_with(ops::PREFIX)) {
                    rt.block_on(ops::remove_bitmap(&client, &n.node_name, &b.name))?;
                }
            }
            let st = rt.block_on(ops::load_internal_snapshot(&client, &s.tag, &nodes, vmstate, true, JOB_WAIT))?;
            rt.block_on(client.close());
            Ok(RevertReport { snapshot: s, online: true, running_after: Some(st.running) })
        }
        (Some(_), _, _) => Err(Error::Invalid(format!(
            "snapshot {name} of VM {} is disk-only: QEMU cannot revert it while the VM runs; shut the VM down, then run `holdfast snapshot revert {} {name}` again",
            vm.name, vm.name
        ))),
        (None, Kind::Internal, _) => {
            // All or nothing: every image must hold the tag before any is touched.
            for d in &s.disks {
                let list = std::process::Command::new("qemu-img").args(["snapshot", "-l", "-U", &d.file]).output().map_err(|e| Error::io("run qemu-img (apt-get install qemu-utils)", e))?;
                if !String::from_utf8_lossy(&list.stdout).split_whitespace().any(|w| w == s.tag) {
                    return Err(Error::Invalid(format!("disk {} ({}) no longer holds snapshot {name} (tag {}); nothing was reverted", d.name, d.file, s.tag)));
                }
            }
            for d in &s.disks {
                drop_checkpoints_offline(&d.file)?;
            }
            for (i, d) in s.disks.iter().enumerate() {
                qemu_img(&["snapshot", "-a", &s.tag, &d.file], false).map_err(|e| {
                    let done: Vec<&str> = s.disks[..i].iter().map(|d| d.name.as_str()).collect();
                    if done.is_empty() { e } else { Error::Invalid(format!("{e}; disks {} were already reverted", done.join(", "))) }
                })?;
            }
            Ok(RevertReport { snapshot: s, online: false, running_after: None })
        }
        (None, Kind::External, _) => {
            for d in &s.disks {
                let Some(ov) = &d.overlay else { continue };
                // An empty overlay over the untouched base: the disk as it was at the snapshot.
                let tmp = PathBuf::from(format!("{}.holdfast-revert", ov.file.display()));
                qemu_img(&["create", "-q", "-f", "qcow2", "-F", &d.format, "-b", &d.file, path(&tmp)?], false)?;
                std::fs::rename(&tmp, &ov.file).map_err(|e| Error::io(format!("replace {}", ov.file.display()), e))?;
            }
            Ok(RevertReport { snapshot: s, online: false, running_after: None })
        }
    }
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

pub fn list(repo: &Repo, vms: &[Vm], only: Option<&str>) -> Result<Vec<Listed>> {
    let rt = runtime()?;
    let mut out = Vec::new();
    let all = records(repo, only)?;
    let vm_names: std::collections::BTreeSet<&str> = all.iter().map(|s| s.vm.as_str()).collect();
    for name in vm_names {
        let nodes = match vms.iter().find(|v| v.name == name) {
            Some(vm) => match try_connect(&rt, vm) {
                Ok(Some(c)) => {
                    let n = rt.block_on(ops::list_nodes(&c)).ok();
                    rt.block_on(c.close());
                    n
                }
                _ => None,
            },
            None => None,
        };
        for s in all.iter().filter(|s| s.vm == name) {
            let (size, state) = match &nodes {
                None => (None, "vm not running".to_string()),
                Some(nodes) => match s.kind {
                    Kind::Internal => {
                        let found = nodes
                            .iter()
                            .find(|n| n.node_name == s.disks[0].node)
                            .and_then(|n| n.snapshots.iter().find(|x| x.tag == s.tag));
                        (
                            found.map(|x| x.vm_state_size),
                            if found.is_some() { "ok" } else { "missing" }.to_string(),
                        )
                    }
                    Kind::External => {
                        let present = s
                            .disks
                            .iter()
                            .filter_map(|d| d.overlay.as_ref())
                            .all(|ov| nodes.iter().any(|n| n.node_name == ov.overlay_node));
                        let bytes = s
                            .disks
                            .iter()
                            .filter_map(|d| d.overlay.as_ref())
                            .filter_map(|ov| std::fs::metadata(&ov.file).ok())
                            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                            .sum();
                        (
                            Some(bytes),
                            if present { "ok" } else { "missing" }.to_string(),
                        )
                    }
                },
            };
            out.push(Listed {
                snapshot: s.clone(),
                size,
                state,
            });
        }
    }
    Ok(out)
}

/// Delete every snapshot past its lifespan (of the VMs given). Returns (deleted, failures).
pub fn expire(repo: &Repo, vms: &[Vm], now_ms: u64) -> Result<(Vec<Snapshot>, Vec<String>)> {
    let (mut gone, mut failed) = (Vec::new(), Vec::new());
    for s in records(repo, None)? {
        if s.expires_ms.is_none_or(|t| t > now_ms) {
            continue;
        }
        let Some(vm) = vms.iter().find(|v| v.name == s.vm) else {
            failed.push(format!(
                "{}/{}: VM {} is not declared in the config",
                s.vm, s.name, s.vm
            ));
            continue;
        };
        match delete(repo, vm, &s.name, false) {
            Ok(s) => gone.push(s),
            Err(e) => failed.push(format!("{}/{}: {e}", s.vm, s.name)),
        }
    }
    Ok((gone, failed))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        for good in ["PreUpdate", "pre-update_2", "a"] {
            assert!(super::check_name(good).is_ok(), "{good}");
        }
        let e = super::check_name("Pre Update").unwrap_err().to_string();
        assert!(e.contains("e.g. PreUpdate, not \"Pre Update\""), "{e}");
        assert!(super::check_name("").is_err());
        assert!(super::check_name("a/b").is_err());
        assert!(super::check_name(&"x".repeat(65)).is_err());
    }
}
