//! A repository: the store, its config and key, the catalog, and blob reads.
//!
//! Layout of a local repository directory:
//! `config`, `packs/`, `backups/` (the store, DESIGN §4), `catalog/` (RocksDB, rebuildable),
//! `locks/` (per-VM operation locks with progress). The catalog is kept in step with the store
//! by `sync`: packs or manifests the catalog does not know (a killed backup, another appliance)
//! are imported, and entries whose objects are gone are dropped.

pub mod config;
pub mod format;
mod sync;

pub use config::{BackupStats, Config, DiskEntry, Manifest};
pub use sync::{rebuild as rebuild_catalog, SyncReport};

use crate::catalog::{Catalog, ChunkLoc, PackId};
use crate::chunk::{self, BlobId, BlobKind, Codec, Keyer};
use crate::store::{pack, LocalStore, ObjectStore, StoreError};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Repo {
    pub dir: PathBuf,
    pub store: Arc<dyn ObjectStore>,
    pub catalog: Catalog,
    pub config: Config,
    pub keyer: Keyer,
}

impl Repo {
    /// Create a new repository in `dir` (empty or missing).
    pub fn init(dir: &Path, chunker: chunk::ChunkerParams, level: i32) -> Result<Repo> {
        chunker.validate()?;
        if dir.join("config").exists() {
            return Err(Error::Invalid(format!("{} already holds a holdfast repository; use it, or pick another directory", dir.display())));
        }
        if let Ok(mut rd) = std::fs::read_dir(dir) {
            if rd.next().is_some() {
                return Err(Error::Invalid(format!("{} is not empty; holdfast init needs an empty or new directory", dir.display())));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| Error::Invalid(format!("no randomness for the store key: {e}")))?;
        let cfg = Config::new(chunker, level, key);
        Catalog::create(&dir.join("catalog"))?;
        let store = LocalStore::new(dir);
        let json = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        // The config goes last: a directory without it is not a repository yet.
        store.put("config", &json)?;
        Repo::open(dir)
    }

    pub fn open(dir: &Path) -> Result<Repo> {
        let store = LocalStore::new(dir);
        let raw = match store.get("config") {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => {
                return Err(Error::NotFound(format!(
                    "{} is not a holdfast repository (no config); create one with `holdfast init --repo {}` or point --repo/HOLDFAST_REPO at an existing one",
                    dir.display(),
                    dir.display()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let (config, key) = Config::parse(&raw).map_err(|e| {
            Error::Invalid(format!("{}/config is damaged: {e}; restore it from a copy (its id key is needed to read the backups)", dir.display()))
        })?;
        let cat_dir = dir.join("catalog");
        if !cat_dir.join("CURRENT").exists() {
            Catalog::create(&cat_dir)?;
        }
        let catalog = Catalog::open(&cat_dir)?;
        let store: Arc<dyn ObjectStore> = Arc::new(store);
        Ok(Repo { dir: dir.to_path_buf(), store, catalog, config, keyer: Keyer::new(key) })
    }

    /// Fetch, decode and verify one blob by id.
    pub fn read_blob(&self, kind: BlobKind, id: &BlobId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        self.read_at(kind, id, &loc)
    }

    pub fn locate(&self, id: &BlobId) -> Result<ChunkLoc> {
        if let Some(loc) = self.catalog.chunk(&id.0)? {
            return Ok(loc);
        }
        // A backup that reused a blob while gc condemned its pack commits a reference the
        // catalog no longer lists; the pack stays until the next gc revives the blob. Look there.
        for (pack_id, _) in self.catalog.condemned()? {
            let key = pack::pack_key(&hex::encode(pack_id));
            let Ok(entries) = pack::read_footer(self.store.as_ref(), &key) else { continue };
            if let Some(e) = entries.iter().find(|e| e.id == id.0) {
                return Ok(ChunkLoc { pack: pack_id, kind: e.kind, codec: e.codec, offset: e.offset, stored_len: e.stored_len, raw_len: e.raw_len });
            }
        }
        Err(Error::Damaged(format!("blob {} is missing from the store; run `holdfast verify` to see what it affects", id.to_hex())))
    }

    pub fn read_at(&self, kind: BlobKind, id: &BlobId, loc: &ChunkLoc) -> Result<Vec<u8>> {
        let stored = self.store.get_range(&pack::pack_key(&hex::encode(loc.pack)), loc.offset, loc.stored_len as usize)?;
        let codec = Codec::from_u8(loc.codec).ok_or_else(|| Error::Damaged(format!("blob {} has an unknown codec {}", id.to_hex(), loc.codec)))?;
        Ok(chunk::decode(&self.keyer, kind, id, codec, &stored, loc.raw_len as usize)?)
    }

    /// All committed manifests, oldest first within each VM.
    pub fn manifests(&self, vm: Option<&str>) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for (_, id, json) in self.catalog.backups(vm)? {
            let m: Manifest = serde_json::from_slice(&json)
                .map_err(|e| Error::Damaged(format!("manifest of backup {id} in the catalog is damaged ({e}); run `holdfast catalog rebuild`")))?;
            out.push(m);
        }
        out.sort_by(|a, b| (a.vm.as_str(), a.time, a.time_ms, a.id.as_str()).cmp(&(b.vm.as_str(), b.time, b.time_ms, b.id.as_str())));
        Ok(out)
    }

    /// Resolve `VM`, `VM@latest`, `VM@ID` or `VM@ID-PREFIX` to one backup.
    pub fn resolve(&self, spec: &str) -> Result<Manifest> {
        let (vm, id) = spec.split_once('@').unwrap_or((spec, "latest"));
        crate::names::check("VM", vm)?;
        let all = self.manifests(Some(vm))?;
        if all.is_empty() {
            return Err(Error::NotFound(format!("no backups of VM {vm:?}; `holdfast backups` lists the VMs that have backups")));
        }
        if id == "latest" || id.is_empty() {
            return Ok(all.into_iter().last().expect("not empty"));
        }
        let hits: Vec<Manifest> = all.into_iter().filter(|m| m.id.starts_with(id)).collect();
        match hits.len() {
            1 => Ok(hits.into_iter().next().expect("one")),
            0 => Err(Error::NotFound(format!("VM {vm} has no backup {id:?}; `holdfast backups {vm}` lists them"))),
            n => Err(Error::Invalid(format!("{id:?} matches {n} backups of {vm}; give more of the id"))),
        }
    }

    /// The segment list ids of one disk, one per segment (None = all hole).
    pub fn disk_segments(&self, disk: &DiskEntry) -> Result<Vec<Option<BlobId>>> {
        let n_segs = disk.size.div_ceil(u64::from(disk.segment_size)) as usize;
        let mut segs = Vec::with_capacity(n_segs);
        for hex_id in &disk.index {
            let id = BlobId::parse(hex_id)?;
            let b = self.read_blob(BlobKind::Index, &id)?;
            let (first, part) = format::decode_index(&b).map_err(|e| Error::Damaged(format!("index blob {}: {e}", id.to_hex())))?;
            if first != segs.len() as u64 {
                return Err(Error::Damaged(format!("index blob {} starts at segment {first}, expected {}", id.to_hex(), segs.len())));
            }
            segs.extend(part);
        }
        if segs.len() != n_segs {
            return Err(Error::Damaged(format!("disk {} has {} segments in its index, expected {n_segs}", disk.name, segs.len())));
        }
        Ok(segs)
    }

    /// Read and check one segment list.
    pub fn seglist(&self, id: &BlobId, segment_len: u64) -> Result<Vec<format::SegEntry>> {
        let b = self.read_blob(BlobKind::SegList, id)?;
        format::decode_seglist(&b, segment_len).map_err(|e| Error::Damaged(format!("segment list {}: {e}", id.to_hex())))
    }

    pub fn new_pack_id() -> Result<PackId> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
        Ok(id)
    }

    pub fn local(&self) -> Option<LocalStore> {
        Some(LocalStore::new(&self.dir))
    }
}
