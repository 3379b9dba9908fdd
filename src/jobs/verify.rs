//! Verify: re-read and re-hash what backups reference, and say what any damage affects.
//!
//! Pass 1 reads every index and segment list of the chosen backups and collects the unique
//! chunk ids; pass 2 re-reads and re-hashes those chunks (all, or a sample) in parallel;
//! pass 3, only when something is damaged, maps each damaged blob to the backups, disks and
//! byte ranges that use it.

use super::Progress;
use crate::chunk::{BlobId, BlobKind};
use crate::repo::format::SegEntry;
use crate::repo::{Manifest, Repo};
use crate::Result;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
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

#[derive(Debug, Serialize, Default)]
pub struct VerifyReport {
    pub backups: u64,
    pub chunks_total: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub damaged: Vec<Damage>,
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
    let v = u64::from_le_bytes(id.0[..8].try_into().unwrap_or([0; 8]));
    (v % 1_000_000) as f64 / 10_000.0 < percent
}

pub fn verify(
    repo: &Repo,
    backups: &[Manifest],
    sample_percent: f64,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut rep = VerifyReport {
        backups: backups.len() as u64,
        ..Default::default()
    };
    let mut bad: BTreeMap<BlobId, (BlobKind, String)> = BTreeMap::new();
    let mut seglists: HashMap<BlobId, Vec<SegEntry>> = HashMap::new();
    let mut chunks: HashMap<BlobId, u32> = HashMap::new();
    // Pass 1: metadata.
    for m in backups {
        for d in &m.disks {
            let segs = match repo.disk_segments(d) {
                Ok(s) => s,
                Err(e) => {
                    for id in &d.index {
                        if let Ok(id) = BlobId::parse(id) {
                            bad.entry(id).or_insert((BlobKind::Index, e.to_string()));
                        }
                    }
                    continue;
                }
            };
            for (i, s) in segs.iter().enumerate() {
                let Some(id) = s else { continue };
                if seglists.contains_key(id) || bad.contains_key(id) {
                    continue;
                }
                let len =
                    u64::from(d.segment_size).min(d.size - i as u64 * u64::from(d.segment_size));
                match repo.seglist(id, len) {
                    Ok(es) => {
                        for e in &es {
                            if let SegEntry::Chunk(c, l) = e {
                                chunks.insert(*c, *l);
                            }
                        }
                        seglists.insert(*id, es);
                    }
                    Err(e) => {
                        bad.insert(*id, (BlobKind::SegList, e.to_string()));
                    }
                }
            }
        }
    }
    rep.chunks_total = chunks.len() as u64;
    // Pass 2: chunks, grouped by pack and offset for sequential reads.
    let mut todo: Vec<(crate::catalog::ChunkLoc, BlobId)> = Vec::new();
    for (id, _) in chunks.iter().filter(|(id, _)| sampled(id, sample_percent)) {
        match repo.locate(id) {
            Ok(loc) => todo.push((loc, *id)),
            Err(e) => {
                bad.insert(*id, (BlobKind::Chunk, e.to_string()));
            }
        }
    }
    todo.sort_by_key(|(l, _)| (l.pack, l.offset));
    progress.begin(
        "verify",
        todo.iter().map(|(l, _)| u64::from(l.raw_len)).sum(),
    );
    // Work in batches of neighbours in one pack (one request each on a remote store), read
    // past the read cache: verify checks what the store holds.
    let mut batches: Vec<&[(crate::catalog::ChunkLoc, BlobId)]> = Vec::new();
    let mut from = 0;
    for i in 1..=todo.len() {
        let split = i == todo.len()
            || todo[i].0.pack != todo[from].0.pack
            || todo[i - 1].0.offset + u64::from(todo[i - 1].0.stored_len) - todo[from].0.offset
                >= VERIFY_BATCH;
        if split && i > from {
            batches.push(&todo[from..i]);
            from = i;
        }
    }
    let found = Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..repo.io_workers() {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(batch) = batches.get(i) else { break };
                let items: Vec<(BlobId, crate::catalog::ChunkLoc)> =
                    batch.iter().map(|(l, id)| (*id, *l)).collect();
                for ((id, loc), r) in items.iter().zip(repo.read_located(
                    repo.uncached.as_ref(),
                    BlobKind::Chunk,
                    &items,
                )) {
                    if let Err(e) = r {
                        found
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((*id, e.to_string()));
                    }
                    progress.add(u64::from(loc.raw_len));
                }
            });
        }
    });
    progress.end();
    rep.chunks_checked = todo.len() as u64;
    rep.bytes_checked = todo.iter().map(|(l, _)| u64::from(l.raw_len)).sum();
    for (id, e) in found.into_inner().unwrap_or_else(|p| p.into_inner()) {
        bad.insert(id, (BlobKind::Chunk, e));
    }
    if !bad.is_empty() {
        rep.damaged = locate_damage(repo, backups, &seglists, bad);
    }
    Ok(rep)
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
    let bad_ids: HashSet<BlobId> = bad.keys().copied().collect();
    for m in backups {
        for d in &m.disks {
            let hit = |offset: u64, len: u64| Affected {
                vm: m.vm.clone(),
                backup: m.id.clone(),
                disk: d.name.clone(),
                offset,
                len,
            };
            for id in d.index.iter().filter_map(|h| BlobId::parse(h).ok()) {
                if bad_ids.contains(&id) {
                    affects.entry(id).or_default().push(hit(0, d.size));
                }
            }
            let Ok(segs) = repo.disk_segments(d) else {
                continue;
            };
            let seg = u64::from(d.segment_size);
            for (i, s) in segs.iter().enumerate() {
                let Some(sid) = s else { continue };
                let start = i as u64 * seg;
                if bad_ids.contains(sid) {
                    affects
                        .entry(*sid)
                        .or_default()
                        .push(hit(start, seg.min(d.size - start)));
                    continue;
                }
                let mut at = start;
                for e in seglists.get(sid).map(|v| v.as_slice()).unwrap_or(&[]) {
                    if let SegEntry::Chunk(c, l) = e {
                        if bad_ids.contains(c) {
                            affects.entry(*c).or_default().push(hit(at, u64::from(*l)));
                        }
                    }
                    at += u64::from(e.len());
                }
            }
        }
    }
    bad.into_iter()
        .map(|(id, (kind, error))| Damage {
            blob: id.to_hex(),
            kind: kind_name(kind),
            error,
            affects: affects.remove(&id).unwrap_or_default(),
        })
        .collect()
}
