//! Repository statistics: what is stored, how well it dedupes and compresses, what it costs.

use crate::chunk::BlobKind;
use crate::repo::Repo;
use crate::Result;
use serde::Serialize;
use std::collections::HashSet;

#[derive(Debug, Serialize)]
pub struct Stats {
    /// The store: a directory, or s3://BUCKET/PREFIX.
    pub store: String,
    /// The store's format version: 1 unencrypted, 2 encrypted.
    pub format_version: u32,
    /// `none`, `repokey` or `keyfile`.
    pub encryption: String,
    pub vms: u64,
    pub backups: u64,
    /// Sum of the disk sizes of every backup.
    pub logical_bytes: u64,
    /// Sum of the data (non-hole) bytes of every backup.
    pub data_bytes: u64,
    /// Raw bytes of the unique chunks.
    pub unique_bytes: u64,
    /// Bytes of the chunks as stored (compressed).
    pub chunk_stored_bytes: u64,
    /// Bytes of all packs (chunks, metadata, footers).
    pub stored_bytes: u64,
    pub chunks: u64,
    pub packs: u64,
    /// data_bytes / unique_bytes
    pub dedup_ratio: f64,
    /// unique_bytes / chunk_stored_bytes
    pub compression_ratio: f64,
    /// data_bytes / stored_bytes
    pub total_ratio: f64,
    pub price_per_gb_month: f64,
    pub cost_per_month: f64,
    /// S3 stores: requests made through this repository directory so far, by type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_requests: Option<crate::store::s3::RequestCounts>,
    /// S3 stores: PUT requests per GB (10^9 bytes) of new data, over the backups that counted them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_puts_per_gb: Option<f64>,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

pub fn stats(repo: &Repo, price_per_gb_month: f64) -> Result<Stats> {
    let ms = repo.manifests(None)?;
    let vms: HashSet<&str> = ms.iter().map(|m| m.vm.as_str()).collect();
    let (mut chunks, mut unique, mut stored_chunks) = (0u64, 0u64, 0u64);
    repo.catalog.for_each_chunk(|_, loc| {
        if loc.kind == BlobKind::Chunk as u8 {
            chunks += 1;
            unique += u64::from(loc.raw_len);
            stored_chunks += u64::from(loc.stored_len);
        }
        true
    })?;
    let packs = repo.catalog.packs()?;
    let stored: u64 = packs.iter().map(|(_, p)| p.size).sum();
    let data: u64 = ms.iter().map(|m| m.stats.data_bytes).sum();
    let counted: Vec<_> = ms
        .iter()
        .filter_map(|m| {
            m.stats
                .store_requests
                .map(|r| (r.put, m.stats.new_raw_bytes))
        })
        .collect();
    let (puts, new_bytes) = counted
        .iter()
        .fold((0u64, 0u64), |(p, b), (pp, bb)| (p + pp, b + bb));
    Ok(Stats {
        store: repo.store_url(),
        format_version: repo.config.version,
        encryption: repo
            .config
            .encryption
            .as_ref()
            .map_or("none".into(), |e| format!("{} ({})", e.mode, e.aead)),
        vms: vms.len() as u64,
        backups: ms.len() as u64,
        logical_bytes: ms.iter().map(|m| m.stats.logical_bytes).sum(),
        data_bytes: data,
        unique_bytes: unique,
        chunk_stored_bytes: stored_chunks,
        stored_bytes: stored,
        chunks,
        packs: packs.len() as u64,
        dedup_ratio: ratio(data, unique),
        compression_ratio: ratio(unique, stored_chunks),
        total_ratio: ratio(data, stored),
        price_per_gb_month,
        cost_per_month: stored as f64 / 1e9 * price_per_gb_month,
        s3_requests: repo.requests(),
        backup_puts_per_gb: (new_bytes > 0).then(|| puts as f64 / (new_bytes as f64 / 1e9)),
    })
}

/// What one backup takes: its sizes, and the stored bytes that it alone references (what
/// forgetting it, then gc, would free).
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct BackupUsage {
    pub vm: String,
    pub id: String,
    pub logical_bytes: u64,
    pub data_bytes: u64,
    /// Stored (compressed) bytes of the blobs no other backup uses.
    pub exclusive_bytes: u64,
}

/// What one VM's backups take together: the stored bytes no other VM's backups use.
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct VmUsage {
    pub vm: String,
    pub backups: u64,
    pub logical_bytes: u64,
    pub exclusive_bytes: u64,
}

#[derive(Debug, Serialize, Default)]
pub struct Usage {
    pub backups: Vec<BackupUsage>,
    pub vms: Vec<VmUsage>,
}

/// Every blob a backup references (indexes, segment lists, chunks).
fn blobs_of(repo: &Repo, m: &crate::repo::Manifest) -> Result<HashSet<[u8; 32]>> {
    let mut out = HashSet::new();
    for d in &m.disks {
        for h in &d.index {
            out.insert(crate::chunk::BlobId::parse(h)?.0);
        }
        let seg = u64::from(d.segment_size);
        for (i, s) in repo.disk_segments(d)?.iter().enumerate() {
            let Some(id) = s else { continue };
            if !out.insert(id.0) {
                continue;
            }
            for e in repo.seglist(id, seg.min(d.size - i as u64 * seg))? {
                if let crate::repo::format::SegEntry::Chunk(c, _) = e {
                    out.insert(c.0);
                }
            }
        }
    }
    Ok(out)
}

/// Who uses what: per backup and per VM, the stored bytes only they reference. Reads every
/// backup's metadata once (like gc).
pub fn usage(repo: &Repo) -> Result<Usage> {
    let ms = repo.manifests(None)?;
    let sets: Vec<HashSet<[u8; 32]>> = ms
        .iter()
        .map(|m| blobs_of(repo, m))
        .collect::<Result<_>>()?;
    // blob → (backups using it, the VM if all of them are one VM's)
    let mut users: std::collections::HashMap<[u8; 32], (u32, Option<&str>)> = Default::default();
    for (m, set) in ms.iter().zip(&sets) {
        for id in set {
            let e = users.entry(*id).or_insert((0, Some(m.vm.as_str())));
            e.0 += 1;
            if e.1 != Some(m.vm.as_str()) {
                e.1 = None;
            }
        }
    }
    let stored = |id: &[u8; 32]| {
        repo.catalog
            .chunk(id)
            .ok()
            .flatten()
            .map_or(0, |l| u64::from(l.stored_len))
    };
    let mut out = Usage::default();
    let mut per_vm: std::collections::BTreeMap<&str, VmUsage> = Default::default();
    for (m, set) in ms.iter().zip(&sets) {
        let exclusive = set.iter().filter(|id| users[*id].0 == 1).map(stored).sum();
        out.backups.push(BackupUsage {
            vm: m.vm.clone(),
            id: m.id.clone(),
            logical_bytes: m.stats.logical_bytes,
            data_bytes: m.stats.data_bytes,
            exclusive_bytes: exclusive,
        });
        let v = per_vm.entry(m.vm.as_str()).or_insert_with(|| VmUsage {
            vm: m.vm.clone(),
            backups: 0,
            logical_bytes: 0,
            exclusive_bytes: 0,
        });
        v.backups += 1;
        v.logical_bytes += m.stats.logical_bytes;
    }
    for (id, (_, only)) in &users {
        if let Some(vm) = only {
            if let Some(v) = per_vm.get_mut(vm) {
                v.exclusive_bytes += stored(id);
            }
        }
    }
    out.vms = per_vm.into_values().collect();
    Ok(out)
}
