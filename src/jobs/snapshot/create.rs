//! Taking snapshots: of one VM, or of several together (all or none).

use super::records::{active_node, check_name, records, save, Kind, SnapDisk, Snapshot};
use super::remove;
use crate::error::What;
use crate::jobs::vms::Vm;
use crate::jobs::vmsession::VmSession;
use crate::qmp::{ops, Agent, Frozen, QmpError};
use crate::repo::Repo;
use crate::task::Ctx;
use crate::{Error, Result};
use std::path::PathBuf;
use std::time::Duration;

const JOB_WAIT: Duration = Duration::from_secs(600);

pub struct CreateArgs {
    pub name: String,
    pub memory: bool,
    pub quiesce: bool,
    pub description: Option<String>,
    /// None: the VM's configured lifespan.
    pub ttl: Option<Duration>,
}

/// Whether `vm` may take snapshot `name` now, given the snapshots it holds (pure).
pub fn check_room(vm: &Vm, name: &str, have: &[Snapshot]) -> Result<()> {
    if have.iter().any(|s| s.name == name) {
        return Err(Error::exists(
            What::Snapshot,
            format!("{}/{name}", vm.name),
            format!(
                "VM {} already has a snapshot named {name}; pick another name or delete it first",
                vm.name
            ),
        ));
    }
    if vm.snapshot_limit == 0 {
        return Err(Error::Limit {
            what: What::Snapshot,
            limit: 0,
            message: format!(
                "VM {} may hold no snapshots (snapshot_limit = 0 in the config)",
                vm.name
            ),
        });
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
        return Err(Error::Limit {
            what: What::Snapshot,
            limit: u64::from(vm.snapshot_limit),
            message: format!(
                "VM {} already has {} snapshot(s): {}; its limit is {}: delete one first \
                 (`holdfast snapshot delete {} {}`) or raise snapshot_limit in the config",
                vm.name,
                have.len(),
                list.join(", "),
                vm.snapshot_limit,
                vm.name,
                have[0].name
            ),
        });
    }
    Ok(())
}

/// Take snapshot `args.name` of every VM in `vms` (each VM's disks in one step); all or none.
/// The caller holds every VM's lock.
pub fn create(repo: &Repo, vms: &[Vm], args: &CreateArgs, ctx: &Ctx) -> Result<Vec<Snapshot>> {
    check_name(&args.name)?;
    if vms.is_empty() {
        return Err(Error::usage("name at least one VM"));
    }
    for vm in vms {
        crate::names::check("VM", &vm.name)?;
        if args.quiesce && vm.agent.is_none() {
            return Err(Error::usage(format!(
                "--quiesce needs VM {}'s guest agent socket: set agent = \"PATH\" for it in the \
                 config",
                vm.name
            )));
        }
        check_room(vm, &args.name, &records(repo, Some(&vm.name))?)?;
    }
    let group: Vec<String> = if vms.len() > 1 {
        vms.iter().map(|v| v.name.clone()).collect()
    } else {
        Vec::new()
    };
    let mut made: Vec<(Snapshot, &Vm)> = Vec::new();
    for vm in vms {
        match create_one(repo, vm, args, &group, ctx) {
            Ok(s) => made.push((s, vm)),
            Err(e) => {
                for (s, vm) in &made {
                    if let Err(u) = remove(repo, vm, s) {
                        ctx.warn(&format!(
                            "could not undo snapshot {} of VM {}: {u}",
                            s.name, vm.name
                        ));
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(made.into_iter().map(|(s, _)| s).collect())
}

/// The VM's disks as QEMU has them now (the top of any holdfast overlay).
fn inspect(repo: &Repo, s: &VmSession, vm: &Vm) -> Result<Vec<SnapDisk>> {
    let mut disks = Vec::new();
    for (name, node) in &vm.disks {
        let node = active_node(repo, &vm.name, node)?;
        let n = s.run("looking up the disks", |c| ops::find_disk(c, &node))?;
        disks.push(SnapDisk {
            name: name.clone(),
            node: n.node_name,
            file: n.file,
            format: n.driver,
            overlay: None,
        });
    }
    Ok(disks)
}

/// Internal snapshots need every disk in qcow2 and no holdfast overlay on top (an internal
/// snapshot inside an overlay would be lost when that overlay is committed or reverted).
fn choose_kind(repo: &Repo, vm: &Vm, disks: &[SnapDisk], memory: bool) -> Result<Kind> {
    let under_overlay = records(repo, Some(&vm.name))?
        .iter()
        .any(|s| s.kind == Kind::External);
    let internal = !under_overlay && disks.iter().all(|d| d.format == "qcow2");
    if memory && !internal {
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
        return Err(Error::Unsupported(format!(
            "--memory needs qcow2 disks (QEMU keeps memory state inside one): {why}; take a \
             disk-only snapshot instead"
        )));
    }
    Ok(if internal {
        Kind::Internal
    } else {
        Kind::External
    })
}

fn new_record(
    vm: &Vm,
    args: &CreateArgs,
    kind: Kind,
    disks: Vec<SnapDisk>,
    group: &[String],
) -> Result<Snapshot> {
    let mut r = [0u8; 4];
    getrandom::fill(&mut r).map_err(|e| Error::internal(format!("no randomness: {e}")))?;
    let now = crate::timefmt::now_millis();
    let ttl = args.ttl.unwrap_or(vm.snapshot_ttl);
    let vmstate = (args.memory && kind == Kind::Internal).then(|| disks[0].node.clone());
    Ok(Snapshot {
        version: 1,
        vm: vm.name.clone(),
        name: args.name.clone(),
        tag: format!("{}snap-{}", ops::PREFIX, hex::encode(r)),
        kind,
        memory: args.memory,
        quiesced: false,
        created_ms: now,
        expires_ms: Some(now.saturating_add(ttl.as_millis() as u64)),
        description: args.description.clone(),
        vmstate,
        disks,
        group: group.to_vec(),
        took_ms: None,
    })
}

/// The QEMU step: internal snapshots of every disk (and memory), or overlays on top of them.
/// Fills in the overlays of `snap`.
async fn take(
    client: &crate::qmp::Client,
    snap: &mut Snapshot,
) -> std::result::Result<(), QmpError> {
    let nodes: Vec<String> = snap.disks.iter().map(|d| d.node.clone()).collect();
    match snap.kind {
        Kind::Internal => {
            let vmstate = snap.vmstate.as_deref();
            ops::save_internal_snapshot(client, &snap.tag, &nodes, vmstate, JOB_WAIT).await
        }
        Kind::External => {
            let reqs: Vec<ops::OverlayRequest> = snap
                .disks
                .iter()
                .map(|d| ops::OverlayRequest {
                    node: d.node.clone(),
                    file: PathBuf::from(format!("{}.{}.qcow2", d.file, snap.tag)),
                })
                .collect();
            let ovs = ops::create_overlays(client, &reqs).await?;
            for (d, ov) in snap.disks.iter_mut().zip(ovs) {
                d.overlay = Some(ov);
            }
            Ok(())
        }
    }
}

fn take_error(vm: &Vm, e: QmpError) -> Error {
    if e.class() == Some("CommandNotFound") {
        return Error::Unsupported(format!(
            "--memory needs a full VM (qemu-system); this QEMU cannot save memory state: {e}"
        ));
    }
    Error::qemu(&vm.name, "taking the snapshot")(e)
}

/// How taking the snapshot went: `exists` is true when QEMU has it, even if `result` failed
/// afterwards (a thaw that failed): then its record must still be kept.
struct Taken {
    result: Result<()>,
    exists: bool,
}

/// [`take`], with the guest's filesystems frozen around it when asked.
fn take_quiesced(s: &VmSession, vm: &Vm, snap: &mut Snapshot, quiesce: bool) -> Taken {
    let agent = vm
        .agent
        .as_ref()
        .filter(|_| quiesce)
        .map(|p| Agent::new(p, Duration::from_secs(10)));
    let Some(a) = agent else {
        let result = s
            .block_on(take(s.client(), snap))
            .map_err(|e| take_error(vm, e));
        let exists = result.is_ok();
        return Taken { result, exists };
    };
    let failed = |result| Taken {
        result,
        exists: false,
    };
    match s.block_on(a.frozen(take(s.client(), snap))) {
        Frozen::NoAgent(e) => failed(Err(Error::qemu(
            &vm.name,
            "reaching the guest agent (the VM was not changed: retry without --quiesce)",
        )(e))),
        Frozen::FreezeFailed { error, thaw } => {
            let thaw = thaw
                .err()
                .map(|t| {
                    format!(
                        "; the thaw failed too ({t}): the guest's filesystems may still be frozen"
                    )
                })
                .unwrap_or_default();
            let step = format!(
                "freezing the guest's filesystems (no snapshot was taken{thaw}; retry without \
                 --quiesce)"
            );
            failed(Err(Error::qemu(&vm.name, &step)(error)))
        }
        Frozen::Ran { result, thaw } => {
            let taken = result.map_err(|e| take_error(vm, e));
            let exists = taken.is_ok();
            match thaw {
                Ok(()) => {
                    snap.quiesced = exists;
                    Taken {
                        result: taken,
                        exists,
                    }
                }
                Err(e) => {
                    let what = if exists {
                        "the snapshot was taken, but thawing"
                    } else {
                        "thawing"
                    };
                    let step = format!(
                        "{what} the guest's filesystems failed: they may still be frozen; check \
                         the guest"
                    );
                    Taken {
                        result: Err(Error::qemu(&vm.name, &step)(e)),
                        exists,
                    }
                }
            }
        }
    }
}

fn create_one(
    repo: &Repo,
    vm: &Vm,
    args: &CreateArgs,
    group: &[String],
    ctx: &Ctx,
) -> Result<Snapshot> {
    if vm.disks.is_empty() {
        return Err(Error::usage(format!(
            "VM {} has no disks declared",
            vm.name
        )));
    }
    let s = VmSession::connect(vm)?;
    let disks = inspect(repo, &s, vm)?;
    let kind = choose_kind(repo, vm, &disks, args.memory)?;
    let mut snap = new_record(vm, args, kind, disks, group)?;
    let taken = take_quiesced(&s, vm, &mut snap, args.quiesce);
    s.close(); // one QMP client at a time: free it before any undo
    if let Err(e) = taken.result {
        if taken.exists {
            let _ = save(repo, &snap);
        }
        return Err(e);
    }
    snap.took_ms = Some(crate::timefmt::now_millis().saturating_sub(snap.created_ms));
    if let Err(e) = save(repo, &snap) {
        if let Err(u) = remove(repo, vm, &snap) {
            ctx.warn(&format!(
                "undoing the snapshot in QEMU failed too ({u}): tag {} is left without a record",
                snap.tag
            ));
        }
        return Err(e);
    }
    Ok(snap)
}
