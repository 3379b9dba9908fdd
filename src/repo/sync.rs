//! Keeping the catalog in step with the store, and rebuilding it from the store alone.

use super::{Manifest, Repo};
use crate::catalog::{Batch, Catalog, PackId, PackInfo};
use crate::chunk::{BlobId, BlobKind, Codec};
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
    /// Backups the catalog knows whose manifests are gone from the store (`VM@ID`). They are
    /// kept, and their data too: a backup is never forgotten behind the operator's back.
    pub missing: Vec<String>,
    /// Manifests in the store that cannot be read (`VM@ID`): gc stops until they are removed.
    pub damaged_manifests: Vec<String>,
    /// What could not be imported, and why (packs and manifests).
    pub damaged: Vec<String>,
}

impl SyncReport {
    /// One warning line per backup that is missing or damaged.
    pub fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self
            .missing
            .iter()
            .map(|b| {
                format!(
                    "backup {b}: its manifest is gone from the store (the catalog keeps it, and \
                     gc keeps its data; `holdfast forget {b}` or `gc --accept-missing` lets it go)"
                )
            })
            .collect();
        w.extend(self.damaged_manifests.iter().map(|b| {
            format!(
                "backup {b}: its manifest in the store is damaged; gc will not run until it is \
                 removed (`holdfast forget {b} --damaged`, which loses the backup)"
            )
        }));
        w
    }
}

/// Every manifest in the store, read and checked against the catalog.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct ManifestCheck {
    pub checked: u64,
    /// `(VM@ID, why)` of manifests in the store that cannot be read or differ from the
    /// catalog's copy.
    pub damaged: Vec<(String, String)>,
    /// Backups the catalog knows whose manifests are gone from the store.
    pub missing: Vec<String>,
}

/// The backups (`(vm, id)`) whose manifests the store holds.
fn store_manifests(repo: &Repo) -> Result<HashSet<(String, String)>> {
    let mut out = HashSet::new();
    for key in repo.store.list("backups/")? {
        let mut parts = key.splitn(3, '/').skip(1);
        if let (Some(vm), Some(id)) = (parts.next(), parts.next()) {
            out.insert((vm.to_string(), id.to_string()));
        }
    }
    Ok(out)
}

/// Why manifest bytes `raw` stored for `vm@id` are not that backup's manifest, if they are not.
fn altered(m: &Manifest, why: &str) -> Error {
    Error::damaged(
        "manifest",
        format!(
            "the store's manifest of {}@{} is damaged ({why}); nothing was restored: `holdfast \
             verify --repair` writes the catalog's good copy back",
            m.vm, m.id
        ),
    )
}

fn manifest_problem(vm: &str, id: &str, raw: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Manifest>(raw) {
        Ok(m) if m.vm == vm && m.id == id => None,
        Ok(m) => Some(format!("it names backup {}@{}", m.vm, m.id)),
        Err(e) => Some(format!("it does not parse ({e})")),
    }
}

const BATCH_OPS: usize = 20_000;

fn flush(repo: &Repo, batch: &mut Batch, force: bool) -> Result<()> {
    if force || batch.len() >= BATCH_OPS {
        repo.catalog.write(std::mem::take(batch))?;
    }
    Ok(())
}

impl Repo {
    /// Import what the store has and the catalog lacks; drop packs the store no longer has.
    /// Backups whose manifests vanished are kept and reported (`missing`), never dropped.
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
        let entries = match pack::read_footer(self.store.as_ref(), &key, self.keys.as_deref()) {
            Ok(e) => e,
            Err(StoreError::NotFound(_)) => return Ok(()), // deleted meanwhile
            Err(e @ StoreError::Corrupt { .. }) => {
                let (found, bad) = self.salvage(&key)?;
                rep.damaged.push(format!(
                    "{e}: salvaged {} intact blob(s) by their headers{}; the rest of the pack is lost",
                    found.len(),
                    if bad > 0 { format!(", {bad} more failed their hashes") } else { String::new() }
                ));
                if found.is_empty() {
                    return Ok(());
                }
                found
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

    /// The intact blobs of a pack whose footer is gone, found by its blob headers and each
    /// checked against its id; and how many failed that check.
    fn salvage(&self, key: &str) -> Result<(Vec<pack::PackEntry>, usize)> {
        let bytes = match self.store.get(key) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e.into()),
        };
        let mut good = Vec::new();
        let mut bad = 0;
        for e in pack::scan_blobs(&bytes) {
            let (Some(kind), Some(codec)) = (BlobKind::from_u8(e.kind), Codec::from_u8(e.codec))
            else {
                bad += 1;
                continue;
            };
            let stored = &bytes[e.offset as usize..e.offset as usize + e.stored_len as usize];
            match crate::chunk::decode(
                &self.keyer,
                kind,
                &BlobId(e.id),
                codec,
                stored,
                e.raw_len as usize,
            ) {
                Ok(_) => good.push(e),
                Err(_) => bad += 1,
            }
        }
        Ok((good, bad))
    }

    fn sync_manifests(&self, batch: &mut Batch, rep: &mut SyncReport) -> Result<()> {
        let in_store = store_manifests(self)?;
        let known: HashSet<(String, String)> = self
            .catalog
            .backups(None)?
            .into_iter()
            .map(|(vm, id, _)| (vm, id))
            .collect();
        let mut new: Vec<&(String, String)> = in_store.difference(&known).collect();
        new.sort();
        for (vm, id) in new {
            let key = Manifest::key(vm, id);
            let raw = match self.store.get(&key) {
                Ok(r) => r,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            match manifest_problem(vm, id, &raw) {
                None => {
                    batch.put_backup(vm, id, &raw);
                    rep.backups_added += 1;
                }
                Some(why) => {
                    rep.damaged
                        .push(format!("manifest {key} is damaged: {why}"));
                    rep.damaged_manifests.push(format!("{vm}@{id}"));
                }
            }
        }
        let mut gone: Vec<String> = known
            .difference(&in_store)
            .map(|(vm, id)| format!("{vm}@{id}"))
            .collect();
        gone.sort();
        rep.missing = gone;
        Ok(())
    }

    /// Read every manifest in the store and check it against the catalog (verify does; gc
    /// does before it deletes anything).
    /// Before a restore: the store's copy of `m`'s manifest is whole and says what the
    /// catalog says. One that was altered is damage (exit 3): `verify --repair` writes the
    /// catalog's good copy back. One that is gone from the store is not checked.
    pub fn check_manifest(&self, m: &Manifest) -> Result<()> {
        let raw = match self.store.get(&Manifest::key(&m.vm, &m.id)) {
            Ok(r) => r,
            Err(StoreError::NotFound(_)) => return Ok(()),
            Err(StoreError::Corrupt { what, .. }) => return Err(altered(m, &what)),
            Err(e) => return Err(e.into()),
        };
        let ours = self
            .catalog
            .backups(Some(&m.vm))?
            .into_iter()
            .find(|(_, id, _)| *id == m.id)
            .map(|(_, _, json)| json);
        let problem = manifest_problem(&m.vm, &m.id, &raw).or_else(|| {
            (ours.as_deref() != Some(raw.as_slice()))
                .then(|| "it differs from the catalog's copy".into())
        });
        match problem {
            Some(why) => Err(altered(m, &why)),
            None => Ok(()),
        }
    }

    pub fn check_manifests(&self) -> Result<ManifestCheck> {
        let in_store = store_manifests(self)?;
        let catalog: std::collections::HashMap<(String, String), Vec<u8>> = self
            .catalog
            .backups(None)?
            .into_iter()
            .map(|(vm, id, json)| ((vm, id), json))
            .collect();
        let mut rep = ManifestCheck::default();
        let mut keys: Vec<&(String, String)> = in_store.iter().collect();
        keys.sort();
        for (vm, id) in keys {
            let raw = match self.store.get(&Manifest::key(vm, id)) {
                Ok(r) => r,
                Err(StoreError::NotFound(_)) => continue, // forgotten meanwhile
                // Sealed and altered (or written with another key): damaged, not fatal.
                Err(StoreError::Corrupt { what, .. }) => {
                    rep.checked += 1;
                    rep.damaged.push((format!("{vm}@{id}"), what));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            rep.checked += 1;
            let problem = manifest_problem(vm, id, &raw).or_else(|| {
                let ours = catalog.get(&(vm.clone(), id.clone()))?;
                (ours.as_slice() != raw.as_slice())
                    .then(|| "it differs from the catalog's copy".into())
            });
            if let Some(why) = problem {
                rep.damaged.push((format!("{vm}@{id}"), why));
            }
        }
        let mut missing: Vec<String> = catalog
            .keys()
            .filter(|k| !in_store.contains(*k))
            .map(|(vm, id)| format!("{vm}@{id}"))
            .collect();
        missing.sort();
        rep.missing = missing;
        Ok(rep)
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
