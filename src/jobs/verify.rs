//! Verify: re-read and re-hash what backups reference, and say what any damage affects.
//!
//! Pass 1 reads every index and segment list of the chosen backups and collects the unique
//! chunk ids; pass 2 re-reads and re-hashes those chunks (all, or a sample) in parallel;
//! pass 3, only when something is damaged, maps each damaged blob to the backups, disks and
//! byte ranges that use it.

use crate::catalog::{ChunkLoc, PackId};
use crate::chunk::{BlobId, BlobKind};
use crate::repo::format::SegEntry;
use crate::repo::{Manifest, Repo};
use crate::task::Ctx;
use crate::Result;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

#[derive(Debug, Serialize, Clone)]
pub struct Affected {
    pub vm: String,
    pub backup: String,
    pub disk: String,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Serialize)]
pub struct Damage {
    pub blob: String,
    pub kind: &'static str,
    pub error: String,
    pub affects: Vec<Affected>,
}

/// A pack whose entry table does not check out (altered, cut, moved from another pack or
/// written with another key): the blobs in it may still authenticate one by one, but the pack
/// was tampered with, restores that read it are refused and `catalog rebuild` cannot list it.
#[derive(Debug, Serialize)]
pub struct DamagedPack {
    pub pack: String,
    pub error: String,
    /// The byte ranges of the checked backups with data in the pack (neighbours merged).
    pub affects: Vec<Affected>,
}

/// A manifest in the store that cannot be trusted.
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct DamagedManifest {
    /// `VM@ID`
    pub backup: String,
    pub error: String,
    /// The catalog holds a good copy: `verify --repair` writes it back.
    pub repairable: bool,
    /// `verify --repair` wrote the catalog's copy back.
    pub repaired: bool,
}

#[derive(Debug, Serialize, Default)]
pub struct VerifyReport {
    pub backups: u64,
    pub chunks_total: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub damaged: Vec<Damage>,
    /// Packs holding the checked blobs whose entry tables were read and checked.
    pub packs_checked: u64,
    pub damaged_packs: Vec<DamagedPack>,
    /// Manifests in the store read and checked.
    pub manifests_checked: u64,
    pub damaged_manifests: Vec<DamagedManifest>,
    /// Backups the catalog knows whose manifests are gone from the store (`VM@ID`); the
    /// catalog's copy is kept (and written back by `--repair`).
    pub missing_manifests: Vec<String>,
    /// Of those, written back from the catalog by `--repair`.
    pub restored_manifests: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is damaged or missing (after any repair).
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
            && self.damaged_packs.is_empty()
            && self.damaged_manifests.iter().all(|d| d.repaired)
            && self.missing_manifests.len() == self.restored_manifests.len()
    }
}

/// Check the manifests in the store of the backups `only` names (`None`: every one) against
/// the catalog; with `repair`, write the catalog's good copy back over a damaged or missing
/// one. Fills the manifest fields of `rep`.
pub fn verify_manifests(
    repo: &Repo,
    only: Option<&str>,
    repair: bool,
    rep: &mut VerifyReport,
) -> Result<()> {
    let check = repo.check_manifests()?;
    let wanted = |b: &str| only.is_none_or(|o| b == o || b.split('@').next() == Some(o));
    rep.manifests_checked = check.checked;
    for (backup, error) in check.damaged.into_iter().filter(|(b, _)| wanted(b)) {
        let copy = catalog_copy(repo, &backup)?;
        let repaired = match (&copy, repair) {
            (Some(json), true) => {
                rewrite_manifest(repo, &backup, json)?;
                true
            }
            _ => false,
        };
        rep.damaged_manifests.push(DamagedManifest {
            backup,
            error,
            repairable: copy.is_some(),
            repaired,
        });
    }
    for backup in check.missing.into_iter().filter(|b| wanted(b)) {
        if repair {
            if let Some(json) = catalog_copy(repo, &backup)? {
                rewrite_manifest(repo, &backup, &json)?;
                rep.restored_manifests.push(backup.clone());
            }
        }
        rep.missing_manifests.push(backup);
    }
    Ok(())
}

/// The catalog's copy of backup `VM@ID`'s manifest, when it has a good one.
fn catalog_copy(repo: &Repo, backup: &str) -> Result<Option<Vec<u8>>> {
    let Some((vm, id)) = backup.split_once('@') else {
        return Ok(None);
    };
    Ok(repo
        .catalog
        .backups(Some(vm))?
        .into_iter()
        .find(|(_, i, _)| i == id)
        .map(|(_, _, json)| json)
        .filter(|json| serde_json::from_slice::<Manifest>(json).is_ok()))
}

/// Replace the store's manifest of `VM@ID` with `json` (keys are write-once: delete, then
/// write; a crash between leaves it missing, which the catalog's copy and `--repair` cover).
fn rewrite_manifest(repo: &Repo, backup: &str, json: &[u8]) -> Result<()> {
    let (vm, id) = backup.split_once('@').unwrap_or((backup, ""));
    let key = Manifest::key(vm, id);
    repo.store.delete(&key)?;
    Ok(repo.store.put(&key, json)?)
}

fn kind_name(k: BlobKind) -> &'static str {
    match k {
        BlobKind::Chunk => "chunk",
        BlobKind::SegList => "segment list",
        BlobKind::Index => "disk index",
    }
}

/// Whether a chunk is in the sample: a stable function of its id, so reruns check the same set.
fn sampled(id: &BlobId, percent: f64) -> bool {
    if percent >= 100.0 {
        return true;
    }
    (sample_key(id) as f64) / 10_000.0 < percent
}

/// Where a chunk falls in the stable sample order (0..1_000_000).
fn sample_key(id: &BlobId) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().unwrap_or([0; 8])) % 1_000_000
}

/// Damaged blobs found so far: id → (kind, error).
type Bad = BTreeMap<BlobId, (BlobKind, String)>;

/// Verify `backups`: every chunk they reference, or a stable `sample_percent` of them.
pub fn verify(
    repo: &Repo,
    backups: &[Manifest],
    sample_percent: f64,
    ctx: &Ctx,
) -> Result<VerifyReport> {
    let mut rep = VerifyReport {
        backups: backups.len() as u64,
        ..Default::default()
    };
    let mut bad = Bad::new();
    let (seglists, chunks) = read_metadata(repo, backups, &mut bad);
    rep.chunks_total = chunks.len() as u64;
    // Pass 2: chunks, grouped by pack and offset for sequential reads.
    let mut todo: Vec<(ChunkLoc, BlobId)> = Vec::new();
    let mut sample: Vec<&BlobId> = chunks
        .iter()
        .filter(|id| sampled(id, sample_percent))
        .collect();
    // A sample too small for even one chunk checks one (the first in the stable order), so
    // that a small --sample never silently checks nothing.
    if sample.is_empty() {
        sample.extend(chunks.iter().min_by_key(|id| sample_key(id)));
    }
    for id in sample {
        match repo.locate(id) {
            Ok(loc) => todo.push((loc, *id)),
            Err(e) => {
                bad.insert(*id, (BlobKind::Chunk, e.to_string()));
            }
        }
    }
    todo.sort_by_key(|(l, _)| (l.pack, l.offset));
    rep.chunks_checked = todo.len() as u64;
    rep.bytes_checked = todo.iter().map(|(l, _)| u64::from(l.raw_len)).sum();
    ctx.events.phase("verify", rep.bytes_checked);
    for (id, e) in check_chunks(repo, &todo, ctx)? {
        bad.insert(id, (BlobKind::Chunk, e));
    }
    // The entry tables of every pack holding a checked blob: metadata and chunks.
    let mut packs: BTreeSet<PackId> = todo.iter().map(|(l, _)| l.pack).collect();
    let meta = seglists.keys().copied().chain(
        backups
            .iter()
            .flat_map(|m| &m.disks)
            .flat_map(|d| &d.index)
            .filter_map(|h| BlobId::parse(h).ok()),
    );
    packs.extend(meta.filter_map(|id| repo.locate(&id).ok()).map(|l| l.pack));
    rep.packs_checked = packs.len() as u64;
    let bad_packs = repo.check_pack_tables(repo.uncached.as_ref(), &packs);
    if !bad_packs.is_empty() {
        rep.damaged_packs = pack_damage(repo, backups, &seglists, bad_packs);
    }
    if !bad.is_empty() {
        rep.damaged = locate_damage(repo, backups, &seglists, bad);
    }
    Ok(rep)
}

/// Which backups, disks and byte ranges have data in each damaged pack (adjacent ranges of a
/// disk merged).
fn pack_damage(
    repo: &Repo,
    backups: &[Manifest],
    seglists: &HashMap<BlobId, Vec<SegEntry>>,
    bad: Vec<(PackId, String)>,
) -> Vec<DamagedPack> {
    let bad_packs: HashSet<PackId> = bad.iter().map(|(p, _)| *p).collect();
    let mut affects: HashMap<PackId, Vec<Affected>> = HashMap::new();
    uses(repo, backups, seglists, |id, a| {
        let Some(p) = repo.locate(id).ok().map(|l| l.pack) else {
            return false;
        };
        if !bad_packs.contains(&p) {
            return false;
        }
        let list = affects.entry(p).or_default();
        match list.last_mut() {
            Some(last)
                if (&last.vm, &last.backup, &last.disk) == (&a.vm, &a.backup, &a.disk)
                    && last.offset + last.len == a.offset =>
            {
                last.len += a.len
            }
            _ => list.push(a),
        }
        true
    });
    bad.into_iter()
        .map(|(p, error)| DamagedPack {
            pack: hex::encode(p),
            error,
            affects: affects.remove(&p).unwrap_or_default(),
        })
        .collect()
}

/// Every blob `backups` use, with the byte range it covers: a disk index covers the whole
/// disk, a segment list its segment, a chunk its bytes. `hit` says whether the blob is one
/// looked for; a segment list that is is not descended into.
fn uses(
    repo: &Repo,
    backups: &[Manifest],
    seglists: &HashMap<BlobId, Vec<SegEntry>>,
    mut hit: impl FnMut(&BlobId, Affected) -> bool,
) {
    for m in backups {
        for d in &m.disks {
            let at = |offset: u64, len: u64| Affected {
                vm: m.vm.clone(),
                backup: m.id.clone(),
                disk: d.name.clone(),
                offset,
                len,
            };
            for id in d.index.iter().filter_map(|h| BlobId::parse(h).ok()) {
                hit(&id, at(0, d.size));
            }
            let Ok(segs) = repo.disk_segments(d) else {
                continue;
            };
            let seg = u64::from(d.segment_size);
            for (i, s) in segs.iter().enumerate() {
                let Some(sid) = s else { continue };
                let start = i as u64 * seg;
                if hit(sid, at(start, seg.min(d.size - start))) {
                    continue;
                }
                let mut pos = start;
                for e in seglists.get(sid).map(|v| v.as_slice()).unwrap_or(&[]) {
                    if let SegEntry::Chunk(c, l) = e {
                        hit(c, at(pos, u64::from(*l)));
                    }
                    pos += u64::from(e.len());
                }
            }
        }
    }
}

/// Pass 1: every index and segment list of `backups`; the segment lists read and the unique
/// chunk ids they name. What cannot be read goes into `bad`.
fn read_metadata(
    repo: &Repo,
    backups: &[Manifest],
    bad: &mut Bad,
) -> (HashMap<BlobId, Vec<SegEntry>>, HashSet<BlobId>) {
    let mut seglists: HashMap<BlobId, Vec<SegEntry>> = HashMap::new();
    let mut chunks = HashSet::new();
    for d in backups.iter().flat_map(|m| &m.disks) {
        let segs = match repo.disk_segments(d) {
            Ok(s) => s,
            Err(e) => {
                for id in d.index.iter().filter_map(|h| BlobId::parse(h).ok()) {
                    bad.entry(id).or_insert((BlobKind::Index, e.to_string()));
                }
                continue;
            }
        };
        for (i, s) in segs.iter().enumerate() {
            let Some(id) = s else { continue };
            if seglists.contains_key(id) || bad.contains_key(id) {
                continue;
            }
            let seg = u64::from(d.segment_size);
            match repo.seglist(id, seg.min(d.size - i as u64 * seg)) {
                Ok(es) => {
                    chunks.extend(es.iter().filter_map(|e| match e {
                        SegEntry::Chunk(c, _) => Some(*c),
                        SegEntry::Hole(_) => None,
                    }));
                    seglists.insert(*id, es);
                }
                Err(e) => {
                    bad.insert(*id, (BlobKind::SegList, e.to_string()));
                }
            }
        }
    }
    (seglists, chunks)
}

/// Split blobs sorted by (pack, offset) into units of work: runs of neighbours in one pack,
/// each closed once it spans `limit` bytes (one request each on a remote store). Returns
/// index ranges into `locs` (pure).
pub fn batches(locs: &[ChunkLoc], limit: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut from = 0;
    for i in 1..=locs.len() {
        let split = i == locs.len()
            || locs[i].pack != locs[from].pack
            || locs[i - 1].offset + u64::from(locs[i - 1].stored_len) - locs[from].offset >= limit;
        if split && i > from {
            out.push(from..i);
            from = i;
        }
    }
    out
}

/// Pass 2: re-read and re-hash `todo` in parallel, past the read cache (verify checks what
/// the store holds). Returns the damaged ones with their errors; stops when cancelled.
fn check_chunks(
    repo: &Repo,
    todo: &[(ChunkLoc, BlobId)],
    ctx: &Ctx,
) -> Result<Vec<(BlobId, String)>> {
    let locs: Vec<ChunkLoc> = todo.iter().map(|(l, _)| *l).collect();
    let work = batches(&locs, VERIFY_BATCH);
    let found = Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..repo.io_workers() {
            s.spawn(|| loop {
                if ctx.cancel.is_cancelled() {
                    break;
                }
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(range) = work.get(i) else { break };
                let items: Vec<(BlobId, ChunkLoc)> = todo[range.clone()]
                    .iter()
                    .map(|(l, id)| (*id, *l))
                    .collect();
                let read = repo.read_located(repo.uncached.as_ref(), BlobKind::Chunk, &items);
                for ((id, loc), r) in items.iter().zip(read) {
                    if let Err(e) = r {
                        crate::sys::lock(&found).push((*id, e.to_string()));
                    }
                    ctx.events.progress(u64::from(loc.raw_len));
                }
            });
        }
    });
    ctx.check()?;
    Ok(found.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Bytes of neighbouring blobs verified as one unit of work.
const VERIFY_BATCH: u64 = 8 << 20;

/// Pass 3: which backups, disks and byte ranges each damaged blob affects.
fn locate_damage(
    repo: &Repo,
    backups: &[Manifest],
    seglists: &HashMap<BlobId, Vec<SegEntry>>,
    bad: BTreeMap<BlobId, (BlobKind, String)>,
) -> Vec<Damage> {
    let mut affects: HashMap<BlobId, Vec<Affected>> = HashMap::new();
    uses(repo, backups, seglists, |id, a| {
        let found = bad.contains_key(id);
        if found {
            affects.entry(*id).or_default().push(a);
        }
        found
    });
    bad.into_iter()
        .map(|(id, (kind, error))| Damage {
            blob: id.to_hex(),
            kind: kind_name(kind),
            error,
            affects: affects.remove(&id).unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(pack: u8, offset: u64, stored_len: u32) -> ChunkLoc {
        ChunkLoc {
            pack: [pack; 16],
            kind: 0,
            codec: 0,
            offset,
            stored_len,
            raw_len: stored_len,
        }
    }

    #[test]
    fn batches_are_runs_of_one_pack_closed_at_the_limit() {
        let locs = [
            loc(1, 0, 10),
            loc(1, 10, 10),
            loc(1, 20, 10),
            loc(1, 30, 10),
            loc(2, 0, 50),
            loc(3, 0, 5),
        ];
        // A run closes with the blob that takes it to the limit.
        assert_eq!(batches(&locs, 25), vec![0..3, 3..4, 4..5, 5..6]);
        assert_eq!(batches(&locs, 20), vec![0..2, 2..4, 4..5, 5..6]);
        assert_eq!(batches(&locs, 1000), vec![0..4, 4..5, 5..6]);
        // A blob larger than the limit is a batch of its own, never dropped.
        assert_eq!(batches(&locs[4..5], 10), vec![0..1]);
        assert!(batches(&[], 10).is_empty());
        let covered: usize = batches(&locs, 1).iter().map(|r| r.len()).sum();
        assert_eq!(covered, locs.len(), "every blob is in exactly one batch");
    }

    #[test]
    fn the_sample_is_stable_and_roughly_the_share_asked() {
        let ids: Vec<BlobId> = (0..10_000u32)
            .map(|i| BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .collect();
        let n = ids.iter().filter(|id| sampled(id, 10.0)).count();
        assert!((800..1200).contains(&n), "{n}");
        assert!(ids.iter().all(|id| sampled(id, 100.0)));
        let again = ids.iter().filter(|id| sampled(id, 10.0)).count();
        assert_eq!(n, again);
    }
}
