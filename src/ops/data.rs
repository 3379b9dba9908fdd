//! The repository and its data: init, restore, verify, gc, stats, catalog rebuild.

use super::{summary, Appliance};
use crate::chunk::ChunkerParams;
use crate::jobs::gc::GcReport;
use crate::jobs::restore::{pick_disk, RestoreReport};
use crate::jobs::stats::Stats;
use crate::jobs::verify::VerifyReport;
use crate::repo::{Manifest, Repo, SyncReport};
use crate::store::s3::S3Location;
use crate::task::{Events, Kind, Outcome};
use crate::{Error, Result};
use indicatif::HumanBytes;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct S3Init {
    /// `s3://BUCKET/PREFIX`
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    /// Local read-cache budget.
    pub cache_bytes: u64,
    /// Attach to a repository that exists in the bucket (the catalog is rebuilt from it).
    pub existing: bool,
    /// Attaching to a store encrypted with a key file: the copy `key export` printed.
    pub key_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct InitRequest {
    pub chunker: ChunkerParams,
    pub compression_level: i32,
    /// Keep the store in an S3 bucket instead of the repository directory.
    pub s3: Option<S3Init>,
    /// How the store is encrypted (a new store; attaching reads it from the store).
    pub encryption: crate::repo::keys::Choice,
}

#[derive(Debug, Serialize)]
pub struct InitReport {
    pub repo: PathBuf,
    pub store: String,
    pub chunker: ChunkerParams,
    pub compression: crate::repo::config::Compression,
    /// The local read cache of an S3 store, in bytes.
    #[serde(skip)]
    pub cache_bytes: Option<u64>,
    /// `repokey`, `keyfile` or `none`.
    pub encryption: String,
    /// The store's format version (1 unencrypted, 2 encrypted).
    pub format_version: u32,
}

#[derive(Clone, Debug)]
pub struct RestoreRequest {
    /// `VM` or `VM@ID` (default: the newest backup).
    pub spec: String,
    /// The disk (may be left out when the backup has one).
    pub disk: Option<String>,
    pub to: PathBuf,
    /// Overwrite an existing file.
    pub force: bool,
    /// `qcow2`: write a new qcow2 image (a file path only); None or `raw`: a raw image.
    pub format: Option<String>,
    /// Overwrite the declared VM's own disks (`to` is not used).
    pub in_place: bool,
}

#[derive(Clone, Debug)]
pub struct VerifyRequest {
    /// `VM` or `VM@ID`; None: every backup.
    pub spec: Option<String>,
    /// Check this percentage of the chunks (a stable sample).
    pub sample: f64,
    /// Write the catalog's good copy back over a damaged or missing manifest in the store.
    pub repair: bool,
}

impl Appliance {
    /// Create a repository in the appliance's directory.
    pub fn init(&self, req: &InitRequest) -> Result<InitReport> {
        let repo = match &req.s3 {
            Some(s3) => {
                let mut loc = S3Location::parse(&s3.url).map_err(Error::Usage)?;
                (loc.endpoint, loc.region, loc.path_style) =
                    (s3.endpoint.clone(), s3.region.clone(), s3.path_style);
                Repo::init_s3(
                    &self.dir,
                    loc,
                    req.chunker,
                    req.compression_level,
                    s3.cache_bytes,
                    match s3.existing {
                        true => crate::repo::Attach::Existing {
                            key_file: s3.key_file.as_deref(),
                        },
                        false => crate::repo::Attach::New(req.encryption),
                    },
                )?
            }
            None => Repo::init_with(
                &self.dir,
                req.chunker,
                req.compression_level,
                req.encryption,
            )?,
        };
        Ok(InitReport {
            repo: repo.dir.clone(),
            store: repo.store_url(),
            chunker: repo.config.chunker,
            compression: repo.config.compression.clone(),
            cache_bytes: repo.remote.as_ref().map(|r| r.cache_bytes),
            encryption: repo
                .config
                .encryption
                .as_ref()
                .map_or("none".into(), |e| e.mode.clone()),
            format_version: repo.config.version,
        })
    }

    /// Restore one disk of a backup to a sparse image or a block device.
    pub fn restore(&self, req: &RestoreRequest, events: &dyn Events) -> Result<RestoreReport> {
        if req.in_place {
            return self.restore_in_place(req, events);
        }
        let repo = self.open_synced()?;
        let m = repo.resolve(&req.spec)?;
        repo.check_manifest(&m)?;
        let disk = pick_disk(&m, req.disk.as_deref())?.clone();
        let qcow2 = match req.format.as_deref() {
            None | Some("raw") => false,
            Some("qcow2") if crate::jobs::restore::is_nbd(&req.to) => {
                return Err(Error::usage(
                    "--format is for a new image file; an NBD target keeps the format its server \
                     serves",
                ))
            }
            Some("qcow2") => true,
            Some(f) => return Err(Error::usage(format!("--format {f:?}: raw or qcow2"))),
        };
        crate::jobs::restore::check_target(&req.to, req.force)?;
        let target = format!(
            "{}@{} disk {} to {}",
            m.vm,
            m.id,
            disk.name,
            req.to.display()
        );
        let mut spec = self.spec(Kind::Restore, vec![m.vm.clone()], target);
        if !crate::jobs::restore::is_nbd(&req.to) {
            spec.output = Some(std::path::absolute(&req.to).unwrap_or_else(|_| req.to.clone()));
        }
        self.run_spec(
            spec,
            events,
            |_, ctx| match qcow2 {
                true => crate::jobs::restore_vm::restore_qcow2(
                    &repo, &m, &disk, &req.to, req.force, ctx,
                ),
                false => crate::jobs::restore::restore(&repo, &m, &disk, &req.to, req.force, ctx),
            },
            |r| {
                summary(format!(
                    "restored {}@{} disk {} to {} ({} data)",
                    r.vm,
                    r.backup,
                    r.disk,
                    r.to,
                    HumanBytes(r.data_bytes)
                ))
            },
        )
    }

    /// Restore a backup over its declared VM's own disks (the VM shut down).
    fn restore_in_place(&self, req: &RestoreRequest, events: &dyn Events) -> Result<RestoreReport> {
        if req.disk.is_some() || req.format.is_some() {
            return Err(Error::usage(
                "--in-place restores every disk of the VM into its own images: no --disk or --format",
            ));
        }
        let repo = self.open_synced()?;
        let m = repo.resolve(&req.spec)?;
        repo.check_manifest(&m)?;
        let vm = self.declared(&m.vm)?;
        let target = format!("{}@{} in place", m.vm, m.id);
        self.run(
            Kind::Restore,
            vec![m.vm.clone()],
            target,
            events,
            |_, ctx| {
                let rs = crate::jobs::restore_vm::restore_in_place(&repo, &vm, &m, ctx)?;
                Ok(RestoreReport {
                    vm: m.vm.clone(),
                    backup: m.id.clone(),
                    disk: rs
                        .iter()
                        .map(|r| r.disk.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    to: rs
                        .iter()
                        .map(|r| r.to.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    size: rs.iter().map(|r| r.size).sum(),
                    data_bytes: rs.iter().map(|r| r.data_bytes).sum(),
                    seconds: rs.iter().map(|r| r.seconds).sum(),
                    nbd: None,
                })
            },
            |r| {
                summary(format!(
                    "restored {}@{} in place: disk(s) {} ({} data)",
                    r.vm,
                    r.backup,
                    r.disk,
                    HumanBytes(r.data_bytes)
                ))
            },
        )
    }

    /// The backups `spec` names: `VM@ID` one, `VM` all of that VM's, None all.
    fn backups_of(&self, repo: &Repo, spec: Option<&str>) -> Result<Vec<Manifest>> {
        match spec {
            Some(s) if s.contains('@') => Ok(vec![repo.resolve(s)?]),
            Some(vm) => {
                let ms = repo.manifests(Some(vm))?;
                if ms.is_empty() {
                    repo.resolve(vm)?; // the not-found error
                }
                Ok(ms)
            }
            None => repo.manifests(None),
        }
    }

    /// Re-read and re-hash what backups reference; the report names any damage (and the
    /// task records it as failed with `damaged`).
    pub fn verify(&self, req: &VerifyRequest, events: &dyn Events) -> Result<VerifyReport> {
        if !(req.sample > 0.0 && req.sample <= 100.0) {
            return Err(Error::usage(format!(
                "--sample {} must be a percentage above 0 and at most 100",
                req.sample
            )));
        }
        let repo = self.open_synced()?;
        let ms = self.backups_of(&repo, req.spec.as_deref())?;
        let mut vms: Vec<String> = Vec::new();
        if let Some(m) = ms.first().filter(|_| req.spec.is_some()) {
            vms.push(m.vm.clone());
        }
        let target = req.spec.clone().unwrap_or_else(|| "every backup".into());
        // Listed under the VM it checks, which it does not lock: verify only reads.
        let mut spec = self.spec(Kind::Verify, vms, target);
        spec.lock = false;
        self.run_spec(
            spec,
            events,
            |_, ctx| {
                let mut r = crate::jobs::verify::verify(&repo, &ms, req.sample, ctx)?;
                let only = req.spec.as_deref();
                crate::jobs::verify::verify_manifests(&repo, only, req.repair, &mut r)?;
                Ok(r)
            },
            verify_outcome,
        )
    }

    /// Free what no backup uses; safe beside running backups. Backups whose manifests are
    /// gone from the store are kept unless `accept_missing`.
    pub fn gc(&self, accept_missing: bool, events: &dyn Events) -> Result<GcReport> {
        let repo = self.open()?;
        self.run(
            Kind::Gc,
            Vec::new(),
            String::new(),
            events,
            |_, ctx| crate::jobs::gc::gc(&repo, accept_missing, ctx),
            |r| {
                summary(format!(
                    "freed {} in {} pack(s)",
                    HumanBytes(r.bytes_freed),
                    r.packs_deleted
                ))
            },
        )
    }

    /// Stored bytes, dedup and compression, what the storage costs.
    pub fn stats(&self, price_per_gb_month: f64) -> Result<Stats> {
        if !(price_per_gb_month.is_finite() && price_per_gb_month >= 0.0) {
            return Err(Error::usage(format!(
                "--price {price_per_gb_month} must be a price in dollars per GB-month, 0 or more"
            )));
        }
        crate::jobs::stats::stats(&*self.open_synced()?, price_per_gb_month)
    }

    /// Throw the catalog away and rebuild it from the store alone (refused while any
    /// operation runs).
    pub fn catalog_rebuild(&self, events: &dyn Events) -> Result<SyncReport> {
        crate::task::refuse_if_running(&self.dir, "rebuild the catalog")?;
        self.run(
            Kind::CatalogRebuild,
            Vec::new(),
            String::new(),
            events,
            |_, _| crate::repo::rebuild_catalog(&self.dir),
            rebuild_outcome,
        )
    }
}

fn verify_outcome(r: &VerifyReport) -> Outcome {
    let line = format!(
        "verified {} backup(s): {} of {} chunks re-hashed, {} pack(s) and {} manifest(s) read",
        r.backups, r.chunks_checked, r.chunks_total, r.packs_checked, r.manifests_checked
    );
    if r.is_clean() {
        return summary(format!("{line}: OK"));
    }
    let e = Error::damaged(
        "blob",
        format!(
            "{line}: {} damaged blob(s), {} damaged pack(s), {} damaged and {} missing \
             manifest(s)",
            r.damaged.len(),
            r.damaged_packs.len(),
            r.damaged_manifests.iter().filter(|d| !d.repaired).count(),
            r.missing_manifests.len() - r.restored_manifests.len()
        ),
    );
    Outcome {
        summary: Some(e.to_string()),
        error: Some(e.to_body()),
        ..Outcome::default()
    }
}

fn rebuild_outcome(r: &SyncReport) -> Outcome {
    let line = format!(
        "catalog rebuilt: {} pack(s), {} backup(s)",
        r.packs_added, r.backups_added
    );
    if r.damaged.is_empty() {
        return summary(line);
    }
    let e = Error::damaged(
        "store",
        format!(
            "{line}; skipped {} damaged object(s): {}",
            r.damaged.len(),
            r.damaged.join("; ")
        ),
    );
    Outcome {
        summary: Some(line),
        error: Some(e.to_body()),
        ..Outcome::default()
    }
}
