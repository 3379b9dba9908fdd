//! Backups: of disks given as files, block devices or NBD exports, and of running VMs through
//! QEMU (declared with `vm add`, or given with a QMP socket and block nodes).

use super::{summary, Appliance};
use crate::jobs::backup::{self, DiskSpec};
use crate::jobs::vmbackup::{self, VmBackupOptions, VmBackupReport};
use crate::jobs::vms::{Vm, VmConfig, VmsFile};
use crate::repo::Manifest;
use crate::source::is_nbd_uri;
use crate::task::{Events, Kind, Outcome};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Debug, Default)]
pub struct BackupRequest {
    pub vm: String,
    /// The disks as (NAME, SOURCE): a raw image, block device or NBD URI; with `qmp`, a QEMU
    /// block node. None at all: the VM declared with `vm add`.
    pub disks: Vec<(String, String)>,
    /// Read changed blocks from the NBD context `qemu:dirty-bitmap:NAME` (NBD disks only).
    pub bitmap: Option<String>,
    /// The backup the bitmap started from (default: the latest backup of the VM).
    pub since: Option<String>,
    /// Back up a running VM through this QMP socket (disks as NAME → block node).
    pub qmp: Option<PathBuf>,
    /// The VM's guest agent socket (for `quiesce`).
    pub agent: Option<PathBuf>,
    /// Freeze the guest's filesystems around the read point.
    pub quiesce: bool,
    /// Read every allocated extent, ignoring the dirty bitmap (a VM in QEMU).
    pub full: bool,
    /// Started by a schedule: a VM whose slots are full rotates unless its policy says
    /// `on_full = "refuse"` (a manual backup is refused unless it says `rotate`).
    pub scheduled: bool,
}

#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub manifest: Manifest,
    /// A VM backed up through QEMU: what was cleaned up first, why disks were read whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmBackupReport>,
}

fn backup_outcome(m: &Manifest) -> Outcome {
    let s = &m.stats;
    Outcome {
        backup: Some(format!("{}@{}", m.vm, m.id)),
        summary: Some(format!(
            "backup {}@{} committed: {} read, {} new, {} stored",
            m.vm,
            m.id,
            indicatif::HumanBytes(s.read_bytes),
            indicatif::HumanBytes(s.new_raw_bytes),
            indicatif::HumanBytes(s.new_stored_bytes)
        )),
        error: None,
        sizes: Some(crate::notify::Sizes {
            read_bytes: s.read_bytes,
            new_bytes: s.new_raw_bytes,
            stored_bytes: s.new_stored_bytes,
        }),
    }
}

/// Retention after a commit: a failure there is a warning in the task's log, never the
/// backup's failure (the backup is committed).
fn rotate(
    repo: &crate::repo::Repo,
    file: &VmsFile,
    m: &Manifest,
    scheduled: bool,
    ctx: &crate::task::Ctx,
) {
    if let Err(e) = super::prune::after_commit(repo, file, m, scheduled, ctx) {
        ctx.warn(&format!("retention after {}@{} failed: {e}", m.vm, m.id));
    }
}

impl Appliance {
    /// Back up a VM: its disks as files, block devices or NBD exports, or the running VM
    /// through QEMU. Returns the committed backup.
    pub fn backup(&self, req: BackupRequest, events: &dyn Events) -> Result<BackupReport> {
        crate::names::check("VM", &req.vm)?;
        if req.qmp.is_some() || req.disks.is_empty() {
            return self.backup_vm(req, events);
        }
        if req.quiesce || req.full || req.agent.is_some() {
            return Err(Error::usage(
                "--quiesce, --full and --agent are for VMs in QEMU (declared, or with --qmp)",
            ));
        }
        let names: Vec<&str> = req.disks.iter().map(|(n, _)| n.as_str()).collect();
        backup::check_disks(&names)?;
        if req.bitmap.is_some() {
            if let Some((name, p)) = req.disks.iter().find(|(_, p)| !is_nbd_uri(p)) {
                return Err(Error::usage(format!(
                    "--bitmap needs NBD disks, but disk {name} is the file {p}; give an nbd:// \
                     or nbd+unix:// URI"
                )));
            }
        }
        let file = self.vms_file()?;
        let eff = file.policy.effective(&req.vm);
        let repo = self.open()?;
        let target = req
            .disks
            .iter()
            .map(|(n, p)| format!("{n}={p}"))
            .collect::<Vec<_>>()
            .join(" ");
        let manifest = self.run(
            Kind::Backup,
            vec![req.vm.clone()],
            target,
            events,
            |_, ctx| {
                super::prune::check_slots(&repo, &req.vm, &eff, req.scheduled)?;
                let mut specs = Vec::new();
                for (name, source) in &req.disks {
                    specs.push(DiskSpec {
                        name: name.clone(),
                        source: crate::source::open(source, req.bitmap.as_deref())?,
                        since: req.since.clone(),
                        checkpoint: None,
                        origin: None,
                    });
                }
                let m = backup::backup(&repo, &req.vm, specs, ctx)?;
                rotate(&repo, &file, &m, req.scheduled, ctx);
                Ok(m)
            },
            backup_outcome,
        )?;
        Ok(BackupReport { manifest, vm: None })
    }

    /// The VM a QEMU backup works on: given with a QMP socket and nodes, or declared.
    fn vm_to_back_up(&self, req: &BackupRequest) -> Result<Vm> {
        let Some(qmp) = &req.qmp else {
            let mut v = self.declared(&req.vm)?;
            if req.agent.is_some() {
                v.agent = req.agent.clone();
            }
            return Ok(v);
        };
        if req.disks.is_empty() {
            return Err(Error::usage(
                "--qmp needs the disks as --disk NAME=NODE (QEMU block node names)",
            ));
        }
        let mut disks = BTreeMap::new();
        for (name, node) in &req.disks {
            crate::names::check("disk", name)?;
            if disks.insert(name.clone(), node.clone()).is_some() {
                return Err(Error::usage(format!("disk {name} is given twice")));
            }
        }
        let c = VmConfig {
            qmp: qmp.clone(),
            agent: req.agent.clone(),
            work_dir: None,
            nbd_socket: None,
            snapshot_ttl: None,
            snapshot_limit: None,
            disks,
        };
        VmsFile::default().resolve(&req.vm, &c, &self.dir)
    }

    fn backup_vm(&self, req: BackupRequest, events: &dyn Events) -> Result<BackupReport> {
        let vm = self.vm_to_back_up(&req)?;
        let file = self.vms_file()?;
        let eff = file.policy.effective(&vm.name);
        let repo = self.open()?;
        let opts = VmBackupOptions {
            quiesce: req.quiesce,
            full: req.full,
        };
        let target = format!("QEMU {}", vm.qmp.display());
        let r = self.run(
            Kind::Backup,
            vec![vm.name.clone()],
            target,
            events,
            |_, ctx| {
                super::prune::check_slots(&repo, &vm.name, &eff, req.scheduled)?;
                let r = vmbackup::backup_vm(&repo, &vm, &opts, ctx)?;
                rotate(&repo, &file, &r.manifest, req.scheduled, ctx);
                Ok(r)
            },
            |r| backup_outcome(&r.manifest),
        )?;
        Ok(BackupReport {
            manifest: r.manifest.clone(),
            vm: Some(r),
        })
    }

    /// Backups, oldest first (of one VM: at least one, else not found).
    pub fn backups(&self, vm: Option<&str>) -> Result<Vec<Manifest>> {
        if let Some(v) = vm {
            crate::names::check("VM", v)?;
        }
        let repo = self.open_synced()?;
        let ms = repo.manifests(vm)?;
        if let (true, Some(v)) = (ms.is_empty(), vm) {
            return Err(Error::not_found(
                crate::error::What::Backup,
                v,
                format!("no backups of VM {v:?}; `holdfast backups` lists every VM's backups"),
            ));
        }
        Ok(ms)
    }

    /// One backup: `VM`, `VM@latest`, `VM@ID` or an id prefix.
    pub fn show(&self, spec: &str) -> Result<Manifest> {
        self.open_synced()?.resolve(spec)
    }

    /// Forget backup `spec` (`VM@ID`); `gc` then frees what nothing else uses.
    pub fn forget(&self, spec: &str, events: &dyn Events) -> Result<Manifest> {
        if !spec.contains('@') {
            return Err(Error::usage(format!(
                "{spec:?}: give VM@ID (`holdfast backups VM` lists the ids)"
            )));
        }
        let repo = self.open_synced()?;
        let m = match repo.resolve(spec) {
            Ok(m) => m,
            Err(e @ Error::NotFound { .. }) => {
                let (vm, id) = spec.split_once('@').unwrap_or((spec, ""));
                return Err(match repo.store.exists(&Manifest::key(vm, id))? {
                    true => Error::damaged(
                        "manifest",
                        format!(
                            "backup {spec} is in the store, but its manifest is damaged; `holdfast \
                             forget {spec} --damaged` removes it (the backup is lost)"
                        ),
                    ),
                    false => e,
                });
            }
            Err(e) => return Err(e),
        };
        let target = format!("{}@{}", m.vm, m.id);
        self.run(
            Kind::Forget,
            vec![m.vm.clone()],
            target,
            events,
            |_, _| crate::jobs::gc::forget(&repo, &m),
            |_| summary(format!("forgot {}@{}", m.vm, m.id)),
        )?;
        Ok(m)
    }

    /// Remove the damaged manifest of backup `VM@ID` from the store: that backup is lost (gc
    /// then frees what only it used). Refused for a manifest that reads well.
    pub fn forget_damaged(&self, spec: &str, events: &dyn Events) -> Result<String> {
        let Some((vm, id)) = spec.split_once('@').filter(|(_, id)| !id.is_empty()) else {
            return Err(Error::usage(format!(
                "{spec:?}: give the whole VM@ID of the damaged backup (`holdfast verify` names it)"
            )));
        };
        crate::names::check("VM", vm)?;
        let repo = self.open_synced()?;
        let check = repo.check_manifests()?;
        if !check.damaged.iter().any(|(b, _)| b == spec) {
            return Err(match repo.store.exists(&Manifest::key(vm, id))? {
                true => Error::Conflict(format!(
                    "the manifest of {spec} reads well; forget it without --damaged"
                )),
                false => Error::not_found(
                    crate::error::What::Backup,
                    spec,
                    format!("the store holds no manifest of {spec}"),
                ),
            });
        }
        self.run(
            Kind::Forget,
            vec![vm.to_string()],
            format!("{spec} (damaged)"),
            events,
            |_, _| {
                repo.store.delete(&Manifest::key(vm, id))?;
                let mut b = crate::catalog::Batch::default();
                b.delete_backup(vm, id);
                repo.catalog.write(b)?;
                Ok(spec.to_string())
            },
            |_| {
                summary(format!(
                    "removed the damaged manifest of {spec}: that backup is lost"
                ))
            },
        )
    }
}
