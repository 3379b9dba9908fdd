//! Forget and garbage collection.
//!
//! GC may run beside backups (DESIGN §5 invariant 2). A backup's task record says `running`
//! before the backup looks at the catalog, and it may reuse any blob the catalog lists. So GC works in two
//! steps:
//! 1. *condemn*: blobs no committed backup references, in packs created before every backup now
//!    in flight started, are removed from the catalog (no later lookup can find them), and their
//!    packs are marked condemned (mostly-dead packs first have their live blobs copied out);
//! 2. *delete*: a condemned pack is deleted only when no backup that was in flight at the moment
//!    of condemnation is still running. Before deleting, the references are computed again: a
//!    backup that reused a blob before it was condemned has committed by then, and its blobs are
//!    put back into the catalog instead of being deleted.
//!
//! With no backup in flight both steps happen in one run.

use super::packs::{NewBlobRef, PackSink};
use crate::catalog::{Batch, ChunkLoc, PackId};
use crate::chunk::{self, BlobKind, Codec};
use crate::repo::format::SegEntry;
use crate::repo::{Manifest, Repo};
use crate::store::pack;
use crate::task::Ctx;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Backups whose manifests are gone from the store, kept with their data (`VM@ID`).
    pub missing_kept: Vec<String>,
    /// Backups whose manifests were gone and were let go (`--accept-missing`).
    pub missing_dropped: Vec<String>,
    pub referenced_blobs: u64,
    pub packs_condemned: u64,
    pub packs_rewritten: u64,
    pub packs_deleted: u64,
    pub packs_deferred: u64,
    pub bytes_freed: u64,
    pub blobs_restored: u64,
    /// Condemned packs that could not be read at all: kept.
    pub packs_damaged_kept: u64,
    pub temp_files_removed: u64,
}

/// Remove backup `m` (the caller holds its VM's lock). Its data goes at the next gc. A
/// protected backup is refused.
pub fn forget(repo: &Repo, m: &Manifest) -> Result<()> {
    if repo.protected(&m.vm)?.contains(&m.id) {
        return Err(Error::Protected(format!(
            "backup {}@{} is protected; unprotect it first",
            m.vm, m.id
        )));
    }
    repo.store.delete(&Manifest::key(&m.vm, &m.id))?;
    let mut b = Batch::default();
    b.delete_backup(&m.vm, &m.id);
    Ok(repo.catalog.write(b)?)
}

/// Every blob id that committed backups reference (indexes, segment lists, chunks).
fn referenced(repo: &Repo) -> Result<HashSet<[u8; 32]>> {
    let mut refs = HashSet::new();
    let mut seen_seglists = HashSet::new();
    for m in repo.manifests(None)? {
        for d in &m.disks {
            for h in &d.index {
                refs.insert(chunk::BlobId::parse(h)?.0);
            }
            let segs = repo.disk_segments(d).map_err(refuse)?;
            let seg = u64::from(d.segment_size);
            for (i, s) in segs.iter().enumerate() {
                let Some(id) = s else { continue };
                refs.insert(id.0);
                if !seen_seglists.insert(*id) {
                    continue;
                }
                let len = seg.min(d.size - i as u64 * seg);
                for e in repo.seglist(id, len).map_err(refuse)? {
                    if let SegEntry::Chunk(c, _) = e {
                        refs.insert(c.0);
                    }
                }
            }
        }
    }
    Ok(refs)
}

/// gc stops, before deleting anything, at anything it cannot read: what it cannot read might
/// reference blobs it would otherwise free.
fn refuse(e: Error) -> Error {
    Error::damaged(
        "store",
        format!("gc stopped without deleting anything: {e}"),
    )
}

struct PackUse {
    live: Vec<([u8; 32], ChunkLoc)>,
    live_bytes: u64,
    dead: Vec<[u8; 32]>,
}

/// What gc does with a pack it may condemn (pure): the rule that decides what is freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackFate {
    /// Enough of it is live: leave it.
    Keep,
    /// Less than half of it is live: copy the live blobs out, then condemn it.
    Rewrite,
    /// Nothing in it is live: condemn it.
    Condemn,
}

/// The fate of a pack of `size` bytes holding `live_blobs` referenced blobs of `live_bytes`.
pub fn pack_fate(live_blobs: usize, live_bytes: u64, size: u64) -> PackFate {
    match live_blobs {
        0 => PackFate::Condemn,
        _ if live_bytes.saturating_mul(2) < size => PackFate::Rewrite,
        _ => PackFate::Keep,
    }
}

/// Packs created before `cutoff` (Unix ms) may be condemned: a backup that started after a
/// pack was created may reuse its blobs, so gc looks only at packs older than every backup
/// in flight (pure). `running` are the start times of the backups in flight.
pub fn condemn_cutoff(running: &[u64], now_ms: u64) -> u64 {
    running.iter().copied().min().unwrap_or(now_ms).min(now_ms)
}

/// A pack condemned at `condemned_at` may be deleted once every backup that was in flight
/// then has ended: every backup running now started after it (pure).
pub fn may_delete(condemned_at: u64, running: &[u64]) -> bool {
    running.iter().all(|start| *start > condemned_at)
}

/// Start times (Unix ms) of the backups running now, from their task records.
fn backups_in_flight(repo: &Repo) -> Vec<u64> {
    crate::task::running(&repo.dir)
        .iter()
        .filter(|t| t.kind == crate::task::Kind::Backup)
        .map(|t| t.started_ms)
        .collect()
}

/// Refuse while the store holds a manifest gc cannot read (its blobs cannot be told apart
/// from garbage); keep backups whose manifests are gone unless `accept_missing`.
fn check_manifests(repo: &Repo, accept_missing: bool, rep: &mut GcReport) -> Result<()> {
    let check = repo.check_manifests()?;
    if let Some((first, why)) = check.damaged.first() {
        let all: Vec<&str> = check.damaged.iter().map(|(b, _)| b.as_str()).collect();
        return Err(Error::damaged(
            "manifest",
            format!(
                "gc deletes nothing while the store holds a manifest it cannot read: {} ({first}: \
                 {why}); `holdfast verify --repair` writes back the catalog's copy, `holdfast \
                 forget {first} --damaged` removes it (that backup is lost)",
                all.join(", ")
            ),
        ));
    }
    if check.missing.is_empty() {
        return Ok(());
    }
    if !accept_missing {
        rep.missing_kept = check.missing;
        return Ok(());
    }
    let mut b = Batch::default();
    for backup in &check.missing {
        if let Some((vm, id)) = backup.split_once('@') {
            b.delete_backup(vm, id);
        }
    }
    repo.catalog.write(b)?;
    rep.missing_dropped = check.missing;
    Ok(())
}

/// Collect garbage (see the module docs); safe beside running backups. Backups whose
/// manifests vanished from the store are kept, data and all, unless `accept_missing`.
pub fn gc(repo: &Repo, accept_missing: bool, ctx: &Ctx) -> Result<GcReport> {
    let mut rep = GcReport::default();
    repo.sync()?;
    check_manifests(repo, accept_missing, &mut rep)?;
    if let Some(local) = repo.local() {
        rep.temp_files_removed = local.sweep_temp() as u64;
    }
    ctx.events.phase("gc", 0);
    // Step 2 for packs condemned by an earlier run.
    delete_condemned(repo, &mut rep)?;
    ctx.check()?;
    // Step 1.
    let cutoff = condemn_cutoff(&backups_in_flight(repo), crate::timefmt::now_millis());
    let refs = referenced(repo)?;
    rep.referenced_blobs = refs.len() as u64;
    let (packs, usage) = pack_usage(repo, &refs, cutoff)?;
    let mut sink = PackSink::new(repo);
    let mut batch = Batch::default();
    let stamp = crate::timefmt::now_millis();
    for (pid, u) in &usage {
        match pack_fate(u.live.len(), u.live_bytes, packs[pid]) {
            PackFate::Keep => continue,
            PackFate::Rewrite => {
                copy_live(repo, pid, &u.live, &mut sink)?;
                rep.packs_rewritten += 1;
            }
            PackFate::Condemn => {}
        }
        // Live blobs of a rewritten pack now point at their new pack (written by the sink).
        for id in &u.dead {
            batch.delete_chunk(id);
        }
        batch.condemn(pid, stamp);
        rep.packs_condemned += 1;
    }
    sink.flush()?; // live blobs are durable in their new packs before the old ones are condemned
    repo.catalog.write(batch)?;
    // Nothing in flight now that could have seen the condemned blobs: delete at once.
    delete_condemned(repo, &mut rep)?;
    Ok(rep)
}

/// The packs gc may condemn (created before `cutoff`, not condemned yet) with their sizes, and
/// which of their blobs are live.
#[allow(clippy::type_complexity)]
fn pack_usage(
    repo: &Repo,
    refs: &HashSet<[u8; 32]>,
    cutoff: u64,
) -> Result<(HashMap<PackId, u64>, HashMap<PackId, PackUse>)> {
    let condemned: HashSet<PackId> = repo
        .catalog
        .condemned()?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let packs: HashMap<PackId, u64> = repo
        .catalog
        .packs()?
        .into_iter()
        .filter(|(id, info)| info.created < cutoff && !condemned.contains(id))
        .map(|(id, info)| (id, info.size))
        .collect();
    let mut usage: HashMap<PackId, PackUse> = packs
        .keys()
        .map(|p| {
            let u = PackUse {
                live: vec![],
                live_bytes: 0,
                dead: vec![],
            };
            (*p, u)
        })
        .collect();
    repo.catalog.for_each_chunk(|id, loc| {
        if let Some(u) = usage.get_mut(&loc.pack) {
            if refs.contains(&id) {
                u.live_bytes += u64::from(loc.stored_len);
                u.live.push((id, loc));
            } else {
                u.dead.push(id);
            }
        }
        true
    })?;
    Ok((packs, usage))
}

/// Copy the live blobs of a pack into new packs (verified; stored bytes kept as they are).
fn copy_live(
    repo: &Repo,
    pid: &PackId,
    live: &[([u8; 32], ChunkLoc)],
    sink: &mut PackSink,
) -> Result<()> {
    let key = pack::pack_key(&hex::encode(pid));
    for (id, loc) in live {
        let kind = BlobKind::from_u8(loc.kind).ok_or_else(|| {
            Error::damaged(
                "blob",
                format!("blob {} has unknown kind {}", hex::encode(id), loc.kind),
            )
        })?;
        let bid = chunk::BlobId(*id);
        repo.read_at(kind, &bid, loc).map_err(refuse)?;
        let stored = repo
            .store
            .get_range(&key, loc.offset, loc.stored_len as usize)?;
        // Sealed again in the new pack (a fresh nonce), so opened here.
        let stored = repo.open_stored(kind, &bid, &stored)?;
        let codec = Codec::from_u8(loc.codec).unwrap_or(Codec::Raw);
        // The old location is still in the catalog, so add directly (not through the dedup check).
        sink.add_unchecked(NewBlobRef {
            id: bid,
            kind,
            codec,
            stored: &stored,
            raw_len: loc.raw_len,
            sealed: false,
        })?;
    }
    Ok(())
}

fn delete_condemned(repo: &Repo, rep: &mut GcReport) -> Result<()> {
    let condemned = repo.catalog.condemned()?;
    if condemned.is_empty() {
        return Ok(());
    }
    let running = backups_in_flight(repo);
    let total = condemned.len() as u64;
    let ready: Vec<(PackId, u64)> = condemned
        .into_iter()
        .filter(|(_, at)| may_delete(*at, &running))
        .collect();
    rep.packs_deferred = total - ready.len() as u64;
    if ready.is_empty() {
        return Ok(());
    }
    let refs = referenced(repo)?;
    let mut batch = Batch::default();
    for (pid, _) in ready {
        let key = pack::pack_key(&hex::encode(pid));
        let entries = match pack::read_footer(repo.store.as_ref(), &key, repo.keys.as_deref()) {
            Ok(e) => e,
            Err(crate::store::StoreError::NotFound(_)) => vec![],
            // A pack whose footer is gone (salvaged by a rebuild): its blob headers tell what
            // it holds; a pack that tells nothing is kept, never deleted blind.
            Err(crate::store::StoreError::Corrupt { .. }) => {
                let found = pack::scan_blobs(&repo.store.get(&key)?);
                if found.is_empty() {
                    rep.packs_damaged_kept += 1;
                    continue;
                }
                found
            }
            Err(e) => return Err(refuse(e.into())),
        };
        let mut revived = false;
        for e in entries.iter().filter(|e| refs.contains(&e.id)) {
            if repo.catalog.chunk(&e.id)?.is_none() {
                let loc = crate::repo::loc_of(pid, e);
                batch.put_chunk(&e.id, &loc);
                rep.blobs_restored += 1;
                revived = true;
            } else if repo.catalog.chunk(&e.id)?.is_some_and(|l| l.pack == pid) {
                revived = true;
            }
        }
        if revived {
            batch.uncondemn(&pid);
            continue;
        }
        let size = repo.store.size(&key).unwrap_or(0);
        repo.store.delete(&key)?;
        for e in &entries {
            if repo.catalog.chunk(&e.id)?.is_some_and(|l| l.pack == pid) {
                batch.delete_chunk(&e.id);
            }
        }
        batch.delete_pack(&pid);
        rep.packs_deleted += 1;
        rep.bytes_freed += size;
    }
    Ok(repo.catalog.write(batch)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_is_condemned_when_dead_and_rewritten_when_mostly_dead() {
        assert_eq!(pack_fate(0, 0, 1000), PackFate::Condemn);
        assert_eq!(pack_fate(3, 499, 1000), PackFate::Rewrite);
        assert_eq!(pack_fate(3, 500, 1000), PackFate::Keep);
        assert_eq!(pack_fate(1, 1000, 1000), PackFate::Keep);
        assert_eq!(pack_fate(1, u64::MAX, 10), PackFate::Keep, "no overflow");
    }

    #[test]
    fn only_packs_older_than_every_backup_in_flight_may_be_condemned() {
        assert_eq!(condemn_cutoff(&[], 1000), 1000);
        assert_eq!(condemn_cutoff(&[700, 400, 900], 1000), 400);
        assert_eq!(
            condemn_cutoff(&[2000], 1000),
            1000,
            "a clock step never widens it"
        );
    }

    #[test]
    fn a_condemned_pack_waits_for_every_backup_that_was_running_when_it_was_condemned() {
        assert!(may_delete(500, &[]));
        assert!(may_delete(500, &[501, 900]));
        assert!(
            !may_delete(500, &[400, 900]),
            "a backup from before may still reuse it"
        );
        assert!(!may_delete(500, &[500]), "same millisecond: not after");
    }
}
