//! Backup: read a disk's allocated segments, cut, hash, dedupe, compress, pack, commit.
//!
//! Pipeline (bounded channels, memory flat in disk size):
//! reader thread → segments → N workers (chunk + keyed hash + lookup + zstd) → this thread
//! (packs, index). Commit protocol (DESIGN §5): every pack is durable in the store and recorded
//! in the catalog before the manifest is written; the manifest is the commit.

use super::packs::{NewBlobRef, PackSink};
use crate::catalog::{Batch, SegMemo};
use crate::chunk::{self, BlobId, BlobKind, Codec};
use crate::repo::format::{self, SegEntry};
use crate::repo::{DiskEntry, Manifest, Repo};
use crate::source::{Extent, ReadJob, Source, SourceError};
use crate::task::{Cancel, Ctx};
use crate::{Error, Result};
use bytes::BytesMut;
use crossbeam_channel::bounded;
use std::collections::HashSet;
use std::time::Instant;

/// One disk to back up.
pub struct DiskSpec {
    pub name: String,
    pub source: Box<dyn Source>,
    /// With a source that tracks changed blocks: the backup its bitmap started from
    /// (None: the latest backup of this VM that has this disk).
    pub since: Option<String>,
    /// The dirty bitmap this backup starts in the hypervisor (its checkpoint); the next
    /// incremental of this disk reads it. Recorded in the manifest.
    pub checkpoint: Option<String>,
    /// Which hypervisor image the disk was read from (a checkpoint is trusted only for the same).
    pub origin: Option<String>,
}

/// What an incremental read builds on: the previous backup's segments and the dirty ranges.
struct Base {
    id: String,
    segs: Vec<Option<BlobId>>,
    dirty: Vec<Extent>,
}

struct Segment {
    no: u64,
    /// None: the segment holds no allocated bytes (or is clean, see `reuse`).
    data: Option<BytesMut>,
    len: u64,
    /// A clean segment of an incremental backup: the previous backup's segment list, unread.
    reuse: Option<Option<BlobId>>,
}

struct NewBlob {
    id: BlobId,
    kind: BlobKind,
    codec: Codec,
    stored: Vec<u8>,
    raw_len: u32,
    /// Sealed on the worker (an encrypted store).
    sealed: bool,
}

struct SegResult {
    no: u64,
    seglist: Option<BlobId>,
    blobs: Vec<NewBlob>,
    read: u64,
    data_bytes: u64,
    reused: u64,
    /// The memo for this segment's bytes, to record once the backup is committed.
    memo: Option<([u8; 32], SegMemo)>,
    memo_hit: bool,
}

/// Why these disks cannot be backed up together, if they cannot (names checked, none given
/// twice, no `X` beside `X.img`: `holdfast mount` shows disk X as `X.img` and `X/`).
pub fn check_disks(names: &[&str]) -> Result<()> {
    if names.is_empty() {
        return Err(Error::usage("no disks to back up; pass --disk NAME=PATH"));
    }
    let mut seen = HashSet::new();
    for n in names {
        crate::names::check("disk", n)?;
        if !seen.insert(*n) {
            return Err(Error::usage(format!(
                "disk {n} is given twice; each --disk needs its own name"
            )));
        }
    }
    if let Some(n) = names.iter().find(|n| {
        n.strip_suffix(".img")
            .is_some_and(|base| seen.contains(base))
    }) {
        return Err(Error::usage(format!(
            "disks {n} and {} would have the same name in a mount; rename one",
            n.trim_end_matches(".img")
        )));
    }
    Ok(())
}

/// A new backup id: the task's start time (UTC) and 4 random hex digits.
fn new_backup_id(started_ms: u64) -> Result<String> {
    let mut suffix = [0u8; 2];
    getrandom::fill(&mut suffix).map_err(|e| Error::internal(format!("no randomness: {e}")))?;
    Ok(format!(
        "{}-{}",
        crate::timefmt::compact(started_ms / 1000),
        hex::encode(suffix)
    ))
}

/// Back up `disks` of `vm` and commit the backup; returns its manifest.
///
/// The caller holds the VM's task (and lock), recorded as running before this reads the
/// catalog: gc relies on that order to keep what a backup in flight may reuse.
pub fn backup(repo: &Repo, vm: &str, disks: Vec<DiskSpec>, ctx: &Ctx) -> Result<Manifest> {
    crate::names::check("VM", vm)?;
    check_disks(&disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>())?;
    let started = Instant::now();
    let requests_before = repo.remote.as_ref().map(|r| r.requests.snapshot());
    repo.sync()?;
    tracing::debug!(ms = started.elapsed().as_millis(), "backup: store synced");
    let id = new_backup_id(ctx.started_ms)?;
    let mut sink = PackSink::new(repo);
    let mut memos = Vec::new();
    let entries = read_disks(repo, vm, &disks, &mut sink, &mut memos, ctx)?;
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        "backup: disks read, packs written"
    );
    crate::hooks::point("before-commit")?;
    ctx.check()?;
    let mut stats = std::mem::take(&mut sink.stats);
    stats.logical_bytes = entries.iter().map(|d: &DiskEntry| d.size).sum();
    stats.data_bytes = entries.iter().map(|d| d.data_bytes).sum();
    stats.seconds = started.elapsed().as_secs_f64();
    if let (Some(r), Some(before)) = (&repo.remote, requests_before) {
        // The manifest upload itself is one more PUT (and a HEAD before it).
        let mut n = r.requests.snapshot().minus(&before);
        n.put += 1;
        n.head += 1;
        stats.store_requests = Some(n);
    }
    let manifest = Manifest {
        version: 1,
        vm: vm.into(),
        id,
        time: ctx.started_ms / 1000,
        time_ms: ctx.started_ms,
        disks: entries,
        stats,
    };
    commit(repo, &manifest, &memos)?;
    tracing::debug!(ms = started.elapsed().as_millis(), "backup: committed");
    Ok(manifest)
}

/// Read every disk into packs (all durable when this returns); the disks' index entries.
fn read_disks(
    repo: &Repo,
    vm: &str,
    disks: &[DiskSpec],
    sink: &mut PackSink,
    memos: &mut Vec<([u8; 32], SegMemo)>,
    ctx: &Ctx,
) -> Result<Vec<DiskEntry>> {
    let extents: Vec<Vec<Extent>> = disks
        .iter()
        .map(|d| d.source.extents())
        .collect::<std::result::Result<_, _>>()?;
    let total: u64 = extents.iter().flatten().map(|(a, b)| b - a).sum();
    ctx.events.phase("backup", total);
    let mut entries = Vec::new();
    for (d, ex) in disks.iter().zip(&extents) {
        let base = incremental_base(repo, vm, d)?;
        let mut entry = backup_disk(repo, d, ex, base.as_ref(), sink, memos, ctx)?;
        // A source that grew while it was read: the backup holds what it was at the start
        // (a shrink fails the read instead); say so, in the log and the manifest.
        if let Some(now) = d.source.size_now().filter(|now| *now > entry.size) {
            ctx.warn(&format!(
                "disk {}: {} grew from {} to {now} bytes during the backup; the backup holds the \
                 first {} bytes (back up from a stable read point for a consistent copy)",
                d.name,
                d.source.describe(),
                entry.size,
                entry.size
            ));
            entry.grew_to = Some(now);
        }
        entries.push(entry);
    }
    sink.flush()?;
    Ok(entries)
}

/// Write the manifest (the commit), then the catalog.
fn commit(repo: &Repo, manifest: &Manifest, memos: &[([u8; 32], SegMemo)]) -> Result<()> {
    let json = serde_json::to_vec_pretty(manifest).map_err(Error::internal)?;
    let key = Manifest::key(&manifest.vm, &manifest.id);
    if repo.store.exists(&key)? {
        return Err(Error::exists(
            crate::error::What::Backup,
            format!("{}@{}", manifest.vm, manifest.id),
            format!(
                "backup id {} exists already; re-run the backup",
                manifest.id
            ),
        ));
    }
    repo.store.put(&key, &json)?;
    // One catalog write for the backup and the segment memo (a cache of segment bytes to
    // segment lists, valid only now that the backup is committed). If it fails, the committed
    // manifest is still in the store and the next command's sync imports it.
    let mut batch = Batch::default();
    batch.put_backup(&manifest.vm, &manifest.id, &json);
    for (k, m) in memos {
        batch.put_segmemo(k, m);
    }
    Ok(repo.catalog.write(batch)?)
}

/// The previous backup a changed-block read builds on, when the source tracks changes and a
/// matching backup exists (same disk name, size and segment size). None means a full read.
fn incremental_base(repo: &Repo, vm: &str, d: &DiskSpec) -> Result<Option<Base>> {
    let Some(dirty) = d.source.dirty()? else {
        return Ok(None);
    };
    let prev = match &d.since {
        Some(id) => Some(repo.resolve(&format!("{vm}@{id}"))?),
        None => repo
            .manifests(Some(vm))?
            .into_iter()
            .rev()
            .find(|m| m.disks.iter().any(|x| x.name == d.name)),
    };
    let Some(prev) = prev else { return Ok(None) };
    let seg = repo.config.chunker.segment_size;
    let Some(pd) = prev
        .disks
        .iter()
        .find(|x| x.name == d.name && x.size == d.source.size() && x.segment_size == seg)
    else {
        if d.since.is_some() {
            return Err(Error::Conflict(format!(
                "backup {vm}@{} has no disk {} of {} bytes to build on; drop --since for a full read",
                prev.id,
                d.name,
                d.source.size()
            )));
        }
        return Ok(None);
    };
    Ok(Some(Base {
        id: prev.id.clone(),
        segs: repo.disk_segments(pd)?,
        dirty,
    }))
}

fn backup_disk(
    repo: &Repo,
    d: &DiskSpec,
    extents: &[Extent],
    base: Option<&Base>,
    sink: &mut PackSink,
    memos: &mut Vec<([u8; 32], SegMemo)>,
    ctx: &Ctx,
) -> Result<DiskEntry> {
    let size = d.source.size();
    let seg = u64::from(repo.config.chunker.segment_size);
    let n_segs = size.div_ceil(seg);
    let workers = crate::sys::workers();
    let (seg_tx, seg_rx) = bounded::<Result<Segment>>(workers);
    let (res_tx, res_rx) = bounded::<Result<SegResult>>(workers);
    let mut segs: Vec<Option<BlobId>> = vec![None; n_segs as usize];
    let mut data_bytes = 0;
    let pool: Pool = bounded(workers * 2 + POOLED + 2);
    std::thread::scope(|s| -> Result<()> {
        let source = d.source.as_ref();
        let plan = ReadPlan {
            extents,
            reuse: base.map(|b| (b.segs.as_slice(), b.dirty.as_slice())),
            seg,
            size,
        };
        let pool: &Pool = &pool;
        let cancel = &ctx.cancel;
        s.spawn(move || read_segments(source, &plan, pool, cancel, seg_tx));
        for _ in 0..workers {
            let (rx, tx) = (seg_rx.clone(), res_tx.clone());
            s.spawn(move || {
                for item in rx {
                    let r = item.and_then(|mut sg| {
                        let data = sg.data.take();
                        let r = process_segment(repo, sg, data.as_deref());
                        if let Some(d) = data {
                            let _ = pool.0.try_send(d);
                        }
                        r
                    });
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        drop((seg_rx, res_tx));
        let mut collect = || -> Result<()> {
            for r in res_rx.iter() {
                let r = r?;
                for b in &r.blobs {
                    sink.add(NewBlobRef {
                        id: b.id,
                        kind: b.kind,
                        codec: b.codec,
                        stored: &b.stored,
                        raw_len: b.raw_len,
                        sealed: b.sealed,
                    })?;
                }
                sink.stats.read_bytes += r.read;
                sink.stats.reused_chunks += r.reused;
                sink.stats.memo_segments += u64::from(r.memo_hit);
                memos.extend(r.memo);
                data_bytes += r.data_bytes;
                segs[r.no as usize] = r.seglist;
                ctx.events.progress(r.read);
            }
            Ok(())
        };
        let result = collect();
        // On error, dropping the receiver stops the workers, which stops the reader.
        drop(res_rx);
        result
    })?;
    let mut index = Vec::new();
    for (i, part) in segs.chunks(format::SEGMENTS_PER_INDEX).enumerate() {
        let bytes = format::encode_index((i * format::SEGMENTS_PER_INDEX) as u64, part);
        let id = repo.keyer.id(BlobKind::Index, &bytes);
        let (codec, stored) = chunk::encode(&bytes, repo.config.compression.level);
        sink.add(NewBlobRef {
            id,
            kind: BlobKind::Index,
            codec,
            stored: &stored,
            raw_len: bytes.len() as u32,
            sealed: false,
        })?;
        index.push(id.to_hex());
    }
    Ok(DiskEntry {
        name: d.name.clone(),
        size,
        segment_size: seg as u32,
        index,
        source: d.source.describe(),
        data_bytes,
        bitmap: base.and_then(|_| d.source.bitmap()),
        since: base.map(|b| b.id.clone()),
        checkpoint: d.checkpoint.clone(),
        origin: d.origin.clone(),
        grew_to: None,
    })
}

/// Read every segment that holds allocated bytes; the rest are sent as empty. In an
/// incremental read, segments that no dirty range touches are sent as reused, unread.
/// Segments are handed to the source as read jobs in order; a network source reads several at
/// once and finishes them in any order.
type Reuse<'a> = Option<(&'a [Option<BlobId>], &'a [Extent])>;

/// Segment buffers kept for reuse beyond the workers' (a network source's jobs in flight).
const POOLED: usize = 8;

/// Segment buffers go back to the reader once processed: no 4 MiB allocation and zero-fill
/// per segment.
type Pool = (
    crossbeam_channel::Sender<BytesMut>,
    crossbeam_channel::Receiver<BytesMut>,
);

/// What a disk's reader reads: the allocated extents, the segment size and disk size, and for
/// an incremental read the previous backup's segments with the dirty ranges.
struct ReadPlan<'a> {
    extents: &'a [Extent],
    reuse: Reuse<'a>,
    seg: u64,
    size: u64,
}

/// True when no dirty range touches `[start, end)` (`dirty` sorted and disjoint).
fn is_clean(dirty: &[Extent], start: u64, end: u64) -> bool {
    let i = dirty.partition_point(|d| d.1 <= start);
    i >= dirty.len() || dirty[i].0 >= end
}

/// The parts of `[start, end)` that `extents` (sorted, disjoint) cover, relative to `start`.
fn ranges_in(extents: &[Extent], start: u64, end: u64) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut j = extents.partition_point(|e| e.1 <= start);
    while j < extents.len() && extents[j].0 < end {
        ranges.push((
            (extents[j].0.max(start) - start) as usize,
            (extents[j].1.min(end) - start) as usize,
        ));
        j += 1;
    }
    ranges
}

/// Zero what `ranges` leave out of `buf` (those bytes are not read: they read as zeros).
fn zero_gaps(buf: &mut [u8], ranges: &[(usize, usize)]) {
    let mut filled = 0;
    for &(a, b) in ranges {
        buf[filled..a].fill(0);
        filled = b;
    }
    buf[filled..].fill(0);
}

fn read_segments(
    src: &dyn Source,
    plan: &ReadPlan<'_>,
    pool: &Pool,
    cancel: &Cancel,
    tx: crossbeam_channel::Sender<Result<Segment>>,
) {
    let ReadPlan {
        extents,
        reuse,
        seg,
        size,
    } = *plan;
    let mut no = 0u64;
    let tx = &tx;
    let send = |sg: Segment| tx.send(Ok(sg)).is_ok();
    let mut next = || -> Option<ReadJob> {
        loop {
            if let Err(e) = cancel.check() {
                let _ = tx.send(Err(e));
                return None;
            }
            if no.saturating_mul(seg) >= size {
                return None;
            }
            let this = no;
            no += 1;
            crate::hooks::segment_delay();
            let (start, end) = (this * seg, ((this + 1) * seg).min(size));
            let empty = |reuse| Segment {
                no: this,
                data: None,
                len: end - start,
                reuse,
            };
            if let Some((prev, _)) = reuse.filter(|(_, d)| is_clean(d, start, end)) {
                let prev = prev.get(this as usize).copied().flatten();
                if !send(empty(Some(prev))) {
                    return None;
                }
                continue;
            }
            let ranges = ranges_in(extents, start, end);
            if ranges.is_empty() {
                if !send(empty(None)) {
                    return None;
                }
                continue;
            }
            let mut buf = pool.1.try_recv().unwrap_or_default();
            buf.resize((end - start) as usize, 0);
            zero_gaps(&mut buf, &ranges);
            return Some(ReadJob {
                tag: this,
                offset: start,
                buf,
                ranges,
            });
        }
    };
    let mut done = |r: std::result::Result<ReadJob, SourceError>| match r {
        Ok(job) => tx
            .send(Ok(Segment {
                no: job.tag,
                len: job.buf.len() as u64,
                data: Some(job.buf),
                reuse: None,
            }))
            .is_ok(),
        Err(e) => {
            let _ = tx.send(Err(e.into()));
            false
        }
    };
    src.read_jobs(&mut next, &mut done);
}

/// Cut a segment's bytes into chunks: holes for all-zero chunks, the rest hashed and, when
/// new, compressed into `r.blobs`. Returns the segment list's entries.
/// A new blob as a worker hands it over: sealed here on an encrypted store, so that sealing
/// runs on every worker rather than in the one thread that fills packs.
fn new_blob(
    repo: &Repo,
    id: BlobId,
    kind: BlobKind,
    codec: Codec,
    stored: Vec<u8>,
    raw_len: usize,
) -> NewBlob {
    let (stored, sealed) = match &repo.keys {
        Some(k) => (
            crate::store::pack::seal_blob(k, kind as u8, &id.0, &stored),
            true,
        ),
        None => (stored, false),
    };
    NewBlob {
        id,
        kind,
        codec,
        stored,
        raw_len: raw_len as u32,
        sealed,
    }
}

fn cut_segment(repo: &Repo, data: &[u8], r: &mut SegResult) -> Result<Vec<SegEntry>> {
    let level = repo.config.compression.level;
    let mut entries: Vec<SegEntry> = Vec::new();
    let mut local = HashSet::new();
    for (off, len) in repo.config.chunker.cut(data) {
        let bytes = &data[off..off + len];
        if chunk::is_zero(bytes) {
            match entries.last_mut() {
                Some(SegEntry::Hole(l)) => *l += len as u32,
                _ => entries.push(SegEntry::Hole(len as u32)),
            }
            continue;
        }
        r.data_bytes += len as u64;
        let id = repo.keyer.id(BlobKind::Chunk, bytes);
        entries.push(SegEntry::Chunk(id, len as u32));
        if !local.insert(id) || repo.catalog.chunk(&id.0)?.is_some() {
            r.reused += 1;
            continue;
        }
        let (codec, stored) = chunk::encode(bytes, level);
        r.blobs
            .push(new_blob(repo, id, BlobKind::Chunk, codec, stored, len));
    }
    Ok(entries)
}

fn process_segment(repo: &Repo, sg: Segment, data: Option<&[u8]>) -> Result<SegResult> {
    let mut r = SegResult {
        no: sg.no,
        seglist: None,
        blobs: Vec::new(),
        read: 0,
        data_bytes: 0,
        reused: 0,
        memo: None,
        memo_hit: false,
    };
    if let Some(Some(prev)) = sg.reuse {
        // A clean segment: its data bytes come from the previous segment list, no byte is read.
        for e in repo.seglist(&prev, sg.len)? {
            if let SegEntry::Chunk(_, l) = e {
                r.data_bytes += u64::from(l);
                r.reused += 1;
            }
        }
        r.seglist = Some(prev);
        return Ok(r);
    }
    let Some(data) = data else { return Ok(r) };
    r.read = sg.len;
    if chunk::is_zero(data) {
        return Ok(r);
    }
    // Bytes seen before cut into the same segment list: one hash pass instead of cutting and
    // hashing every chunk. Trusted only while that segment list is still in the catalog.
    let memo_key = repo.keyer.memo(data);
    if let Some(m) = repo.catalog.segmemo(&memo_key)? {
        if repo.catalog.chunk(&m.seglist)?.is_some() {
            r.seglist = Some(BlobId(m.seglist));
            r.data_bytes = m.data_bytes;
            r.reused = u64::from(m.chunks);
            r.memo_hit = true;
            return Ok(r);
        }
    }
    let entries = cut_segment(repo, data, &mut r)?;
    let bytes = format::encode_seglist(&entries);
    let id = repo.keyer.id(BlobKind::SegList, &bytes);
    if repo.catalog.chunk(&id.0)?.is_none() {
        let (codec, stored) = chunk::encode(&bytes, repo.config.compression.level);
        r.blobs.push(new_blob(
            repo,
            id,
            BlobKind::SegList,
            codec,
            stored,
            bytes.len(),
        ));
    }
    r.seglist = Some(id);
    let chunks = entries
        .iter()
        .filter(|e| matches!(e, SegEntry::Chunk(..)))
        .count() as u32;
    r.memo = Some((
        memo_key,
        SegMemo {
            seglist: id.0,
            data_bytes: r.data_bytes,
            chunks,
        },
    ));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_that_cannot_go_together_are_refused_by_name() {
        assert!(check_disks(&["root", "data"]).is_ok());
        assert_eq!(check_disks(&[]).unwrap_err().code(), "usage");
        assert!(check_disks(&["root", "root"])
            .unwrap_err()
            .to_string()
            .contains("given twice"));
        let e = check_disks(&["root", "root.img"]).unwrap_err().to_string();
        assert!(e.contains("same name in a mount"), "{e}");
        assert_eq!(check_disks(&["a/b"]).unwrap_err().code(), "invalid-name");
    }

    #[test]
    fn a_segment_is_clean_only_when_no_dirty_range_touches_it() {
        let dirty = [(100, 200), (500, 501)];
        assert!(is_clean(&dirty, 0, 100));
        assert!(!is_clean(&dirty, 0, 101));
        assert!(is_clean(&dirty, 200, 500));
        assert!(!is_clean(&dirty, 400, 600));
        assert!(is_clean(&dirty, 501, 1000));
        assert!(is_clean(&[], 0, 10));
    }

    #[test]
    fn allocated_ranges_are_cut_to_the_segment_and_the_gaps_zeroed() {
        let ex = [(0, 10), (20, 30), (95, 120)];
        assert_eq!(ranges_in(&ex, 0, 100), vec![(0, 10), (20, 30), (95, 100)]);
        assert_eq!(ranges_in(&ex, 100, 200), vec![(0, 20)]);
        assert!(ranges_in(&ex, 30, 95).is_empty());
        let mut buf = vec![7u8; 12];
        zero_gaps(&mut buf, &[(2, 4), (6, 8)]);
        assert_eq!(buf, [0, 0, 7, 7, 0, 0, 7, 7, 0, 0, 0, 0]);
    }
}
