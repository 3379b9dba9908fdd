//! Reading backups in place: NBD exports, FUSE mounts, single files and trees.

use super::{summary, Appliance};
use crate::browse::{Browser, FileSpec};
use crate::error::What;
use crate::jobs::export::{ExportConfig, ExportReport, Listen};
use crate::jobs::files::FilesReport;
use crate::jobs::restore::pick_disk;
use crate::task::{Events, Kind};
use crate::{Error, Result};
use serde::Serialize;
use std::path::PathBuf;

pub struct ExportRequest {
    /// `VM` or `VM@ID` (default: the newest backup).
    pub spec: String,
    /// The disk (may be left out when the backup has one).
    pub disk: Option<String>,
    pub listen: Listen,
    /// Accept writes, into a local overlay (never the store).
    pub writable: bool,
    /// Keep the overlay at this path (and its map at PATH.map) on exit.
    pub keep_overlay: Option<PathBuf>,
    /// Memory for decoded chunks.
    pub cache_bytes: u64,
    /// Close a client idle this long (none: never).
    pub idle_timeout: Option<std::time::Duration>,
}

pub struct MountRequest {
    pub mountpoint: PathBuf,
    /// Only this VM's backups.
    pub vm: Option<String>,
    /// Only root may browse.
    pub private: bool,
}

pub struct CatRequest {
    /// `VM[@ID]:DISK/PART/PATH`
    pub spec: String,
}

pub struct RestoreFilesRequest {
    /// `VM[@ID]:DISK/PART/PATH`
    pub spec: String,
    /// An existing directory to restore into.
    pub to: PathBuf,
    /// Recreate device nodes too (as root).
    pub devices: bool,
}

#[derive(Debug, Serialize)]
pub struct UmountReport {
    pub mountpoint: PathBuf,
    /// The mount's process had died: its stale mount was removed.
    pub stale: bool,
}

/// Decoded chunks kept by `cat` and `restore-files` (64 KiB on average: 16 MiB).
const FILE_CACHE_CHUNKS: usize = 256;

impl Appliance {
    /// Serve a backup's disk over NBD until cancelled (the store is never written).
    pub fn export(&self, req: ExportRequest, events: &dyn Events) -> Result<ExportReport> {
        let cfg = ExportConfig {
            listen: req.listen,
            writable: req.writable,
            keep_overlay: req.keep_overlay,
            cache_bytes: req.cache_bytes,
            idle_timeout: req.idle_timeout,
        };
        cfg.check()?;
        let repo = self.open_synced()?;
        let m = repo.resolve(&req.spec)?;
        let disk = pick_disk(&m, req.disk.as_deref())?.clone();
        let target = format!("{}@{} disk {}", m.vm, m.id, disk.name);
        // Exports take no VM lock: they only read a committed backup, which `forget` cannot
        // remove without gc, and gc never deletes what a committed backup references.
        let mut spec = self.spec(Kind::Export, vec![m.vm.clone()], target);
        spec.lock = false;
        self.run_spec(
            spec,
            events,
            |_, ctx| crate::jobs::export::serve(repo.clone(), &m, &disk, &cfg, ctx),
            |r| summary(format!("served {} until stopped", r.uri)),
        )
    }

    /// Mount every backup (of one VM) as a read-only filesystem until unmounted or cancelled.
    pub fn mount(&self, req: MountRequest, events: &dyn Events) -> Result<()> {
        if let Some(v) = &req.vm {
            crate::names::check("VM", v)?;
        }
        let repo = self.open_synced()?;
        if let Some(v) = &req.vm {
            if repo.manifests(Some(v))?.is_empty() {
                return Err(Error::not_found(
                    What::Backup,
                    v.clone(),
                    format!("no backups of VM {v:?}; `holdfast backups` lists every VM's backups"),
                ));
            }
        }
        let cfg = crate::fuse::MountConfig {
            vm: req.vm.clone(),
            allow_other: !req.private,
            threads: 4,
        };
        let mut spec = self.spec(
            Kind::Mount,
            req.vm.iter().cloned().collect(),
            req.mountpoint.display().to_string(),
        );
        spec.lock = false;
        self.run_spec(
            spec,
            events,
            |_, ctx| crate::fuse::serve(repo.clone(), &req.mountpoint, cfg, ctx),
            |_| summary(format!("unmounted {}", req.mountpoint.display())),
        )
    }

    /// Unmount a `holdfast mount` (or remove a stale one whose process died).
    pub fn umount(&self, mountpoint: PathBuf, lazy: bool) -> Result<UmountReport> {
        let stale = crate::fuse::clean_stale(&mountpoint)?;
        if !stale {
            crate::fuse::unmount(&mountpoint, lazy)?;
        }
        Ok(UmountReport { mountpoint, stale })
    }

    fn browser(&self) -> Result<Browser> {
        Ok(Browser::new(self.open_synced()?, FILE_CACHE_CHUNKS, false))
    }

    /// Write one file out of a backup to `out`; returns its length.
    pub fn cat(&self, req: &CatRequest, out: &mut dyn std::io::Write) -> Result<u64> {
        let spec = FileSpec::parse(&req.spec)?;
        crate::jobs::files::cat(&self.browser()?, &spec, out)
    }

    /// Copy a file or a tree out of a backup, with owners, modes, times and links.
    pub fn restore_files(
        &self,
        req: &RestoreFilesRequest,
        events: &dyn Events,
    ) -> Result<FilesReport> {
        let spec = FileSpec::parse(&req.spec)?;
        let b = self.browser()?;
        let vm = spec
            .backup
            .split('@')
            .next()
            .unwrap_or_default()
            .to_string();
        crate::names::check("VM", &vm)?;
        let target = format!("{} to {}", req.spec, req.to.display());
        let mut task = self.spec(Kind::RestoreFiles, vec![vm], target);
        task.lock = false;
        task.output = Some(std::path::absolute(&req.to).unwrap_or_else(|_| req.to.clone()));
        self.run_spec(
            task,
            events,
            |_, ctx| crate::jobs::files::restore_files(&b, &spec, &req.to, req.devices, ctx),
            |r| summary(format!("restored {} ({} files)", r.path.display(), r.files)),
        )
    }
}
