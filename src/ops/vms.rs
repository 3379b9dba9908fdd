//! VMs in QEMU: declarations, `doctor`, and snapshots.

use super::{summary, Appliance};
use crate::error::What;
use crate::jobs::snapshot::{self, CreateArgs, Listed, RevertReport, Snapshot};
use crate::jobs::vms::{parse_duration, Vm, VmConfig};
use crate::jobs::vmsession::VmSession;
use crate::qmp::ops;
use crate::task::{Events, Kind, Outcome};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct VmAddRequest {
    pub name: String,
    /// QEMU's QMP unix socket.
    pub qmp: PathBuf,
    /// The disks as (NAME, NODE): QEMU block node names.
    pub disks: Vec<(String, String)>,
    pub agent: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
    pub nbd_socket: Option<PathBuf>,
    /// Lifespan of snapshots, e.g. `10d`.
    pub snapshot_ttl: Option<String>,
    pub snapshot_limit: Option<u32>,
    /// Check the socket and the nodes now.
    pub check: bool,
}

#[derive(Debug, Serialize)]
pub struct VmList {
    pub config: PathBuf,
    pub vms: BTreeMap<String, VmConfig>,
}

#[derive(Debug, Serialize)]
pub struct VmRemoved {
    pub name: String,
    pub config: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct DoctorReport {
    pub vm: String,
    pub leftovers: Vec<String>,
    pub cleaned: bool,
}

#[derive(Clone, Debug)]
pub struct SnapshotCreateRequest {
    /// One VM, or several snapshotted together (all or none).
    pub vms: Vec<String>,
    pub name: String,
    /// Also save RAM and device state.
    pub memory: bool,
    pub quiesce: bool,
    pub description: Option<String>,
    /// None: the VM's lifespan.
    pub ttl: Option<Duration>,
}

/// `snapshot clone`: one disk of a snapshot written to a new image.
#[derive(Clone, Debug)]
pub struct SnapshotCloneRequest {
    pub vm: String,
    pub name: String,
    /// None: the snapshot's only disk.
    pub disk: Option<String>,
    pub to: PathBuf,
    /// `raw` or `qcow2`; None: qcow2 for a `.qcow2` path, else raw.
    pub format: Option<String>,
    pub force: bool,
}

#[derive(Debug, Serialize)]
pub struct ExpireReport {
    pub deleted: Vec<Snapshot>,
    /// `VM/NAME: why` for each one that could not be deleted.
    pub failed: Vec<String>,
}

impl Appliance {
    /// The VM `name` as declared in the config.
    pub fn declared(&self, name: &str) -> Result<Vm> {
        crate::names::check("VM", name)?;
        self.vms_file()?.vm(name, &self.dir, &self.config)
    }

    fn all_declared(&self) -> Result<Vec<Vm>> {
        let f = self.vms_file()?;
        f.vm.iter()
            .map(|(n, c)| f.resolve(n, c, &self.dir))
            .collect()
    }

    /// Declare a VM that runs in QEMU (checking its socket and nodes unless told not to).
    pub fn vm_add(&self, req: VmAddRequest, events: &dyn Events) -> Result<Vm> {
        crate::names::check("VM", &req.name)?;
        let f = self.vms_file()?;
        if f.vm.contains_key(&req.name) {
            return Err(Error::exists(
                What::Vm,
                req.name.clone(),
                format!(
                    "VM {} is already declared in {}; `holdfast vm remove {}` first to change it",
                    req.name,
                    self.config.display(),
                    req.name
                ),
            ));
        }
        if let Some(t) = &req.snapshot_ttl {
            parse_duration(t).map_err(Error::Usage)?;
        }
        let mut disks = BTreeMap::new();
        for (n, node) in &req.disks {
            crate::names::check("disk", n)?;
            if disks.insert(n.clone(), node.clone()).is_some() {
                return Err(Error::usage(format!("disk {n} is given twice")));
            }
        }
        let c = VmConfig {
            qmp: req.qmp,
            agent: req.agent,
            work_dir: req.work_dir,
            nbd_socket: req.nbd_socket,
            snapshot_ttl: req.snapshot_ttl,
            snapshot_limit: req.snapshot_limit,
            disks,
        };
        let vm = f.resolve(&req.name, &c, &self.dir)?;
        let target = self.config.display().to_string();
        self.run(
            Kind::VmAdd,
            vec![req.name.clone()],
            target,
            events,
            |_, _| {
                if req.check {
                    check_nodes(&vm)?;
                }
                // Under the config's lock, on the file as it is now (an admin may have
                // changed a policy meanwhile).
                self.edit_config(|now| {
                    now.vm.insert(req.name.clone(), c);
                    Ok(())
                })?;
                Ok(vm)
            },
            |v| {
                summary(format!(
                    "declared VM {} in {}",
                    v.name,
                    self.config.display()
                ))
            },
        )
    }

    pub fn vm_list(&self) -> Result<VmList> {
        Ok(VmList {
            config: self.config.clone(),
            vms: self.vms_file()?.vm,
        })
    }

    /// Forget a VM's declaration (its backups and snapshots stay).
    pub fn vm_remove(&self, name: &str, events: &dyn Events) -> Result<VmRemoved> {
        let f = self.vms_file()?;
        if !f.vm.contains_key(name) {
            return Err(Error::not_found(
                What::Vm,
                name,
                format!("VM {name:?} is not declared in {}", self.config.display()),
            ));
        }
        self.run(
            Kind::VmRemove,
            vec![name.to_string()],
            self.config.display().to_string(),
            events,
            |_, _| {
                self.edit_config(|now| {
                    now.vm.remove(name);
                    Ok(())
                })?;
                Ok(VmRemoved {
                    name: name.to_string(),
                    config: self.config.clone(),
                })
            },
            |r| summary(format!("removed VM {} from {}", r.name, r.config.display())),
        )
    }

    /// Find (and unless `dry_run`, remove) what an interrupted holdfast left in a VM's QEMU.
    pub fn doctor(&self, name: &str, dry_run: bool, events: &dyn Events) -> Result<DoctorReport> {
        let vm = self.declared(name)?;
        let repo = self.open()?;
        self.run(
            Kind::Doctor,
            vec![vm.name.clone()],
            String::new(),
            events,
            |_, _| {
                let leftovers = crate::jobs::vmbackup::doctor(&repo, &vm, dry_run)?;
                Ok(DoctorReport {
                    vm: vm.name.clone(),
                    leftovers,
                    cleaned: !dry_run,
                })
            },
            |r| summary(format!("{} leftover(s) found", r.leftovers.len())),
        )
    }

    /// Find (and unless `dry_run`, remove) what killed restores left outside the repository:
    /// partial images beside their targets, temporary trees in restore-files targets, as the
    /// task records of restores that did not finish name them.
    pub fn doctor_repo(&self, dry_run: bool, events: &dyn Events) -> Result<DoctorReport> {
        let records = crate::task::list(&self.dir)?;
        self.run(
            Kind::Doctor,
            Vec::new(),
            "leftovers of restores".into(),
            events,
            |_, _| {
                let mut found: Vec<PathBuf> = Vec::new();
                for t in records.iter().filter(|t| !t.is_running()) {
                    let Some(out) = &t.output else { continue };
                    let stale = match t.kind {
                        Kind::Restore => crate::jobs::restore::stale_partials(out),
                        Kind::RestoreFiles => crate::jobs::files::stale_trees(out),
                        _ => Vec::new(),
                    };
                    found.extend(
                        stale
                            .into_iter()
                            .filter(|p| !found.contains(p))
                            .collect::<Vec<_>>(),
                    );
                }
                if !dry_run {
                    for p in &found {
                        let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
                    }
                }
                Ok(DoctorReport {
                    vm: String::new(),
                    leftovers: found
                        .iter()
                        .map(|p| format!("partial restore {}", p.display()))
                        .collect(),
                    cleaned: !dry_run,
                })
            },
            |r| {
                summary(format!(
                    "{} leftover(s) of restores found",
                    r.leftovers.len()
                ))
            },
        )
    }

    /// Take snapshot `req.name` of one VM, or of several together.
    pub fn snapshot_create(
        &self,
        req: SnapshotCreateRequest,
        events: &dyn Events,
    ) -> Result<Vec<Snapshot>> {
        snapshot::check_name(&req.name)?;
        let targets: Vec<Vm> = req
            .vms
            .iter()
            .map(|n| self.declared(n))
            .collect::<Result<_>>()?;
        if let Some(ttl) = req.ttl {
            if let Some(v) = targets.iter().find(|v| ttl > v.snapshot_max_lifespan) {
                return Err(Error::usage(format!(
                    "--ttl {} is longer than a snapshot of {} may live ({},                      snapshot.max_lifespan in the policy; at most 10 days)",
                    crate::policy::show_duration(ttl),
                    v.name,
                    crate::policy::show_duration(v.snapshot_max_lifespan)
                )));
            }
        }
        let repo = self.open()?;
        let args = CreateArgs {
            name: req.name.clone(),
            memory: req.memory,
            quiesce: req.quiesce,
            description: req.description,
            ttl: req.ttl,
        };
        self.run(
            Kind::SnapshotCreate,
            req.vms.clone(),
            req.name.clone(),
            events,
            |_, ctx| snapshot::create(&repo, &targets, &args, ctx),
            |made| {
                summary(format!(
                    "took snapshot {} of {} VM(s)",
                    args.name,
                    made.len()
                ))
            },
        )
    }

    /// Every snapshot (of one VM), with what QEMU says of it.
    pub fn snapshot_list(&self, vm: Option<&str>) -> Result<Vec<Listed>> {
        if let Some(v) = vm {
            crate::names::check("VM", v)?;
        }
        let vms = self.all_declared()?;
        snapshot::list(&*self.open()?, &vms, vm)
    }

    /// Return a VM to a snapshot.
    pub fn snapshot_revert(
        &self,
        vm: &str,
        name: &str,
        events: &dyn Events,
    ) -> Result<RevertReport> {
        let v = self.declared(vm)?;
        let repo = self.open()?;
        self.run(
            Kind::SnapshotRevert,
            vec![v.name.clone()],
            name.to_string(),
            events,
            |_, _| snapshot::revert(&repo, &v, name),
            |_| summary(format!("reverted VM {vm} to snapshot {name}")),
        )
    }

    /// Write one disk of a snapshot to a new image, beside the running (or stopped) VM.
    pub fn snapshot_clone(
        &self,
        req: &SnapshotCloneRequest,
        events: &dyn Events,
    ) -> Result<snapshot::CloneReport> {
        let v = self.declared(&req.vm)?;
        snapshot::check_name(&req.name)?;
        let format = match req.format.as_deref() {
            Some(f) => f,
            None if req.to.extension().is_some_and(|e| e == "qcow2") => "qcow2",
            None => "raw",
        };
        snapshot::check_clone_format(format)?;
        crate::jobs::restore::check_target(&req.to, req.force)?;
        let repo = self.open()?;
        let mut spec = self.spec(
            Kind::SnapshotClone,
            vec![v.name.clone()],
            format!("{} to {}", req.name, req.to.display()),
        );
        spec.output = Some(std::path::absolute(&req.to).unwrap_or_else(|_| req.to.clone()));
        self.run_spec(
            spec,
            events,
            |_, ctx| {
                snapshot::clone(
                    &repo,
                    &v,
                    &req.name,
                    req.disk.as_deref(),
                    &req.to,
                    format,
                    req.force,
                    ctx,
                )
            },
            |r| {
                summary(format!(
                    "wrote disk {} of snapshot {} of VM {} to {} ({})",
                    r.disk, r.snapshot, r.vm, r.to, r.format
                ))
            },
        )
    }

    pub fn snapshot_rename(
        &self,
        vm: &str,
        old: &str,
        new: &str,
        events: &dyn Events,
    ) -> Result<Snapshot> {
        let v = self.declared(vm)?;
        let repo = self.open()?;
        self.run(
            Kind::SnapshotRename,
            vec![v.name.clone()],
            format!("{old} to {new}"),
            events,
            |_, _| snapshot::rename(&repo, &v, old, new),
            |_| summary(format!("snapshot {old} of VM {vm} is now {new}")),
        )
    }

    /// Return several VMs to one group snapshot: every VM is checked to have it first (so
    /// nothing is reverted when one lacks it), then each is reverted in turn; a failure names
    /// the VM and the ones already reverted.
    pub fn snapshot_revert_group(
        &self,
        vms: &[String],
        name: &str,
        events: &dyn Events,
    ) -> Result<Vec<RevertReport>> {
        if let [one] = vms {
            return self.snapshot_revert(one, name, events).map(|r| vec![r]);
        }
        snapshot::check_name(name)?;
        let targets: Vec<Vm> = vms
            .iter()
            .map(|n| self.declared(n))
            .collect::<Result<_>>()?;
        let repo = self.open()?;
        self.run(
            Kind::SnapshotRevert,
            vms.to_vec(),
            name.to_string(),
            events,
            |_, ctx| {
                for v in &targets {
                    snapshot::record(&repo, &v.name, name)?;
                }
                let mut done: Vec<RevertReport> = Vec::new();
                for v in &targets {
                    match snapshot::revert(&repo, v, name) {
                        Ok(r) => {
                            ctx.info(&format!("VM {} reverted to {name}", v.name));
                            done.push(r);
                        }
                        Err(e) if done.is_empty() => return Err(e),
                        Err(e) => {
                            return Err(Error::Conflict(format!(
                                "reverting VM {} to snapshot {name} failed ({e}); {} reverted                                  already: fix it and revert VM {} alone",
                                v.name,
                                targets[..done.len()]
                                    .iter()
                                    .map(|t| t.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                v.name
                            )))
                        }
                    }
                }
                Ok(done)
            },
            |r| summary(format!("reverted {} VM(s) to snapshot {name}", r.len())),
        )
    }

    /// Delete one group snapshot from each VM: every one is tried; a failure names the VMs
    /// whose part is left.
    pub fn snapshot_delete_group(
        &self,
        vms: &[String],
        name: &str,
        forget: bool,
        events: &dyn Events,
    ) -> Result<Vec<Snapshot>> {
        if let [one] = vms {
            return self
                .snapshot_delete(one, name, forget, events)
                .map(|s| vec![s]);
        }
        snapshot::check_name(name)?;
        let targets: Vec<Vm> = vms
            .iter()
            .map(|n| self.declared_or_orphan(n, forget))
            .collect::<Result<_>>()?;
        let repo = self.open()?;
        self.run(
            Kind::SnapshotDelete,
            vms.to_vec(),
            name.to_string(),
            events,
            |_, ctx| {
                let (mut done, mut failed) = (Vec::new(), Vec::new());
                for v in &targets {
                    match snapshot::delete(&repo, v, name, forget) {
                        Ok(s) => {
                            ctx.info(&format!("deleted snapshot {name} of VM {}", v.name));
                            done.push(s);
                        }
                        Err(e) => failed.push(format!("VM {}: {e}", v.name)),
                    }
                }
                match failed.is_empty() {
                    true => Ok(done),
                    false => Err(Error::Conflict(format!(
                        "snapshot {name} is left on {} VM(s): {}",
                        failed.len(),
                        failed.join("; ")
                    ))),
                }
            },
            |r| summary(format!("deleted snapshot {name} of {} VM(s)", r.len())),
        )
    }

    /// A declared VM; with `forget`, also one that is no longer declared (its snapshot
    /// records can still be dropped).
    fn declared_or_orphan(&self, vm: &str, forget: bool) -> Result<Vm> {
        match self.declared(vm) {
            Err(Error::NotFound { .. }) if forget => {
                let c = VmConfig {
                    qmp: PathBuf::new(),
                    agent: None,
                    work_dir: None,
                    nbd_socket: None,
                    snapshot_ttl: None,
                    snapshot_limit: None,
                    disks: BTreeMap::new(),
                };
                crate::jobs::vms::VmsFile::default().resolve(vm, &c, &self.dir)
            }
            r => r,
        }
    }

    /// Delete a snapshot (with `forget`: only holdfast's record, also of a VM that is no
    /// longer declared).
    pub fn snapshot_delete(
        &self,
        vm: &str,
        name: &str,
        forget: bool,
        events: &dyn Events,
    ) -> Result<Snapshot> {
        let v = self.declared_or_orphan(vm, forget)?;
        let repo = self.open()?;
        self.run(
            Kind::SnapshotDelete,
            vec![v.name.clone()],
            name.to_string(),
            events,
            |_, _| snapshot::delete(&repo, &v, name, forget),
            |_| summary(format!("deleted snapshot {name} of VM {vm}")),
        )
    }

    /// How many snapshots are past their lifespan now (a query: the sweep runs the task only
    /// when there is something to do).
    pub fn expired_snapshots(&self) -> Result<usize> {
        let repo = self.open()?;
        Ok(snapshot::expired(&repo, crate::timefmt::now_millis())?.len())
    }

    /// Delete every snapshot past its lifespan, each under its VM's lock in turn.
    pub fn snapshot_expire(&self, events: &dyn Events) -> Result<ExpireReport> {
        let vms = self.all_declared()?;
        let repo = self.open()?;
        let now = crate::timefmt::now_millis();
        let rep = self.run(
            Kind::SnapshotExpire,
            Vec::new(),
            String::new(),
            events,
            |task, _| {
                let mut rep = ExpireReport {
                    deleted: Vec::new(),
                    failed: Vec::new(),
                };
                for s in snapshot::expired(&repo, now)? {
                    let Some(vm) = vms.iter().find(|v| v.name == s.vm) else {
                        rep.failed.push(format!(
                            "{}/{}: VM {} is not declared in the config",
                            s.vm, s.name, s.vm
                        ));
                        continue;
                    };
                    let done = task
                        .lock_vm(&vm.name)
                        .and_then(|_| snapshot::delete(&repo, vm, &s.name, false));
                    task.unlock_vm(&vm.name);
                    match done {
                        Ok(s) => rep.deleted.push(s),
                        Err(e) => rep.failed.push(format!("{}/{}: {e}", s.vm, s.name)),
                    }
                }
                Ok(rep)
            },
            expire_outcome,
        )?;
        Ok(rep)
    }
}

fn expire_outcome(r: &ExpireReport) -> Outcome {
    let line = format!("{} snapshot(s) expired", r.deleted.len());
    match r.failed.first() {
        None => summary(line),
        Some(f) => {
            let e = expire_error(r.failed.len(), f);
            Outcome {
                summary: Some(line),
                error: Some(e.to_body()),
                ..Outcome::default()
            }
        }
    }
}

/// The error of an expiry run that could not delete `n` snapshots.
pub fn expire_error(n: usize, first: &str) -> Error {
    Error::Conflict(format!(
        "{n} snapshot(s) could not be expired; first: {first}"
    ))
}

/// The VM's QMP socket answers and every declared node exists.
fn check_nodes(vm: &Vm) -> Result<()> {
    let s = VmSession::connect(vm)?;
    for (disk, node) in &vm.disks {
        s.block_on(ops::find_disk(s.client(), node)).map_err(|e| {
            Error::not_found(
                What::QemuNode,
                node.clone(),
                format!(
                    "disk {disk}: {e}; check the node name (query-named-block-nodes lists them)"
                ),
            )
        })?;
    }
    s.close();
    Ok(())
}
