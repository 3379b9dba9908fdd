//! Keeping the catalog in step with the store, and rebuilding it from the store alone.

use super::{Manifest, Repo};
use crate::catalog::{Batch, Catalog, PackId, PackInfo};
use crate::store::{pack, StoreError};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct SyncReport {
    pub packs_added: u64,
    pub packs_dropped: u64,
    pub blobs_added: u64,
    pub backups_added: u64,
    pub backups_dropped: u64,
    pub damaged: Vec<String>,
}

const BATCH_OPS: usize = 20_000;

fn flush(repo: &Repo, batch: &mut Batch, force: bool) -> Result<()> {
    if force || batch.len() >= BATCH_OPS {
        repo.catalog.write(std::mem::take(batch))?;
    }
    Ok(())
}

impl Repo {
    /// Import what the store has and the catalog lacks; drop what the store no longer has.
    pub fn sync(&self) -> Result<SyncReport> {
        self.catalog.refresh()?;
        let mut rep = SyncReport::default();
        let mut batch = Batch::default();
        let in_store: HashSet<PackId> = self
            .store
            .list("packs/")?
            .iter()
            .filter_map(|k| pack::pack_id_of_key(k))
            .filter_map(|id| hex::decode(id).ok()?.try_into().ok())
            .collect();
        let known: HashSet<PackId> = self
            .catalog
            .packs()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for id in in_store.difference(&known) {
            self.import_pack(id, &in_store, &mut batch, &mut rep)?;
            flush(self, &mut batch, false)?;
        }
        let gone: HashSet<PackId> = known.difference(&in_store).copied().collect();
        if !gone.is_empty() {
            for id in &gone {
                batch.delete_pack(id);
                rep.packs_dropped += 1;
            }
            let mut dead = Vec::new();
            self.catalog.for_each_chunk(|id, loc| {
                if gone.contains(&loc.pack) {
                    dead.push(id);
                }
                true
            })?;
            for id in dead {
                batch.delete_chunk(&id);
            }
        }
        self.sync_manifests(&mut batch, &mut rep)?;
        flush(self, &mut batch, true)?;
        Ok(rep)
    }

    fn import_pack(
        &self,
        id: &PackId,
        live: &HashSet<PackId>,
        batch: &mut Batch,
        rep: &mut SyncReport,
    ) -> Result<()> {
        let key = pack::pack_key(&hex::encode(id));
        let entries = match pack::read_footer(self.store.as_ref(), &key) {
            Ok(e) => e,
            Err(StoreError::NotFound(_)) => return Ok(()), // deleted meanwhile
            Err(e @ StoreError::Corrupt { .. }) => {
                rep.damaged.push(e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let size = self.store.size(&key)?;
        for e in &entries {
            if let Some(old) = self.catalog.chunk(&e.id)? {
                if live.contains(&old.pack) {
                    continue; // already stored elsewhere; keep the existing location
                }
            }
            let loc = super::loc_of(*id, e);
            batch.put_chunk(&e.id, &loc);
            rep.blobs_added += 1;
        }
        batch.put_pack(
            id,
            &PackInfo {
                created: crate::timefmt::now_millis(),
                size,
                entries: entries.len() as u32,
            },
        );
        rep.packs_added += 1;
        Ok(())
    }

    fn sync_manifests(&self, batch: &mut Batch, rep: &mut SyncReport) -> Result<()> {
        let mut in_store = HashSet::new();
        for key in self.store.list("backups/")? {
            let mut parts = key.splitn(3, '/').skip(1);
            let (Some(vm), Some(id)) = (parts.next(), parts.next()) else {
                continue;
            };
            in_store.insert((vm.to_string(), id.to_string()));
        }
        let known: HashSet<(String, String)> = self
            .catalog
            .backups(None)?
            .into_iter()
            .map(|(vm, id, _)| (vm, id))
            .collect();
        for (vm, id) in in_store.difference(&known) {
            let key = Manifest::key(vm, id);
            let raw = match self.store.get(&key) {
                Ok(r) => r,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            match serde_json::from_slice::<Manifest>(&raw) {
                Ok(m) if &m.vm == vm && &m.id == id => {
                    batch.put_backup(vm, id, &raw);
                    rep.backups_added += 1;
                }
                _ => rep.damaged.push(format!("manifest {key} is damaged")),
            }
        }
        for (vm, id) in known.difference(&in_store) {
            batch.delete_backup(vm, id);
            rep.backups_dropped += 1;
        }
        Ok(())
    }
}

/// Throw the catalog away and rebuild it from the store alone.
pub fn rebuild(dir: &Path) -> Result<SyncReport> {
    let cat = dir.join("catalog");
    if !super::is_repo(dir) {
        return Repo::open(dir).map(|_| SyncReport::default());
    }
    if cat.exists() {
        std::fs::remove_dir_all(&cat)
            .map_err(|e| Error::io(format!("remove {}", cat.display()), e))?;
    }
    let _ = std::fs::remove_dir_all(cat.with_extension("readers"));
    Catalog::create(&cat)?;
    let repo = Repo::open(dir)?;
    repo.sync()
}
