//! Backup: read a disk's allocated segments, cut, hash, dedupe, compress, pack, commit.
//!
//! Pipeline (bounded channels, memory flat in disk size):
//! reader thread → segments → N workers (chunk + keyed hash + lookup + zstd) → this thread
//! (packs, index). Commit protocol (DESIGN §5): every pack is durable in the store and recorded
//! in the catalog before the manifest is written; the manifest is the commit.

use super::lock::VmLock;
use super::Progress;
use crate::catalog::{Batch, ChunkLoc, PackId, PackInfo, SegMemo};
use crate::chunk::{self, BlobId, BlobKind, Codec};
use crate::repo::format::{self, SegEntry};
use crate::repo::{BackupStats, DiskEntry, Manifest, Repo};
use crate::source::{Extent, ReadJob, Source, SourceError};
use crate::store::pack::{self, PackEntry, PackWriter};
use crate::{Error, Result};
use bytes::BytesMut;
use crossbeam_channel::bounded;
use std::collections::{HashSet, VecDeque};
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

#[derive(Default)]
pub struct Hooks {
    /// Called after every pack is durable, just before the manifest is written (tests use it to
    /// interleave gc with a backup).
    pub before_commit: Option<Box<dyn Fn() + Send + Sync>>,
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

/// Writes new blobs into packs. A full pack is sealed and uploaded on its own thread while
/// the next one fills (a few in flight: a remote PUT mostly waits on the network); the catalog
/// learns a pack's blobs only once its upload has succeeded.
pub(crate) struct PackSink<'a> {
    repo: &'a Repo,
    writer: PackWriter,
    /// Blobs in the open pack or in packs still uploading.
    pending: HashSet<[u8; 32]>,
    uploads: VecDeque<Upload>,
    pub stats: BackupStats,
    crash_after: Option<u64>,
}

struct Upload {
    pack_id: PackId,
    size: u64,
    entries: Vec<PackEntry>,
    done: std::thread::JoinHandle<crate::store::StoreResult<()>>,
}

impl<'a> PackSink<'a> {
    pub(crate) fn new(repo: &'a Repo) -> Self {
        let crash_after = std::env::var("HOLDFAST_TEST_CRASH_AFTER_PACKS")
            .ok()
            .and_then(|v| v.parse().ok());
        PackSink {
            repo,
            writer: Self::fresh_writer(repo),
            pending: HashSet::new(),
            uploads: VecDeque::new(),
            stats: BackupStats::default(),
            crash_after,
        }
    }

    fn fresh_writer(repo: &Repo) -> PackWriter {
        // Room for a full pack, its last blob and the footer, so the buffer never doubles.
        PackWriter::with_capacity(repo.config.pack_target as usize + (2 << 20))
    }

    /// Packs uploading at once: each holds a pack's bytes in memory.
    fn max_uploads(&self) -> usize {
        if self.repo.remote.is_some() {
            4
        } else {
            2 // the next pack compresses while the last one is fsynced
        }
    }

    /// True when the blob is already stored (or waiting in the open pack).
    pub(crate) fn known(&self, id: &BlobId) -> Result<bool> {
        Ok(self.pending.contains(&id.0) || self.repo.catalog.chunk(&id.0)?.is_some())
    }

    pub(crate) fn add(&mut self, b: NewBlobRef<'_>) -> Result<bool> {
        if self.known(&b.id)? {
            return Ok(false);
        }
        self.add_unchecked(b)
    }

    /// Add without the dedup check (gc copies blobs that the catalog still lists elsewhere).
    pub(crate) fn add_unchecked(&mut self, b: NewBlobRef<'_>) -> Result<bool> {
        self.writer
            .add(b.id.0, b.kind as u8, b.codec as u8, b.stored, b.raw_len);
        self.pending.insert(b.id.0);
        self.stats.new_raw_bytes += u64::from(b.raw_len);
        self.stats.new_stored_bytes += b.stored.len() as u64;
        if b.kind == BlobKind::Chunk {
            self.stats.new_chunks += 1;
        }
        if self.writer.len() >= self.repo.config.pack_target as usize {
            self.seal()?;
        }
        Ok(true)
    }

    /// Start uploading the open pack; waits only while too many uploads are in flight.
    fn seal(&mut self) -> Result<()> {
        if self.writer.is_empty() {
            return Ok(());
        }
        let (bytes, entries) =
            std::mem::replace(&mut self.writer, Self::fresh_writer(self.repo)).finish();
        let pack_id = Repo::new_pack_id()?;
        let store = self.repo.store.clone();
        let size = bytes.len() as u64;
        let done = std::thread::Builder::new()
            .name("holdfast-upload".into())
            .spawn(move || store.put(&pack::pack_key(&hex::encode(pack_id)), &bytes))
            .map_err(|e| Error::io("start an upload thread", e))?;
        self.uploads.push_back(Upload {
            pack_id,
            size,
            entries,
            done,
        });
        while self.uploads.len() > self.max_uploads() - 1 {
            self.finish_one()?;
        }
        Ok(())
    }

    /// Wait for the oldest upload and record its pack in the catalog.
    fn finish_one(&mut self) -> Result<()> {
        let Some(u) = self.uploads.pop_front() else {
            return Ok(());
        };
        let stored = u.done.join().unwrap_or_else(|_| {
            Err(crate::store::StoreError::Remote {
                key: hex::encode(u.pack_id),
                msg: "the upload thread panicked".into(),
            })
        });
        stored?;
        let mut batch = Batch::default();
        for e in &u.entries {
            let loc = ChunkLoc {
                pack: u.pack_id,
                kind: e.kind,
                codec: e.codec,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
            };
            batch.put_chunk(&e.id, &loc);
        }
        batch.put_pack(
            &u.pack_id,
            &PackInfo {
                created: crate::timefmt::now_millis(),
                size: u.size,
                entries: u.entries.len() as u32,
            },
        );
        self.repo.catalog.write(batch)?;
        for e in &u.entries {
            self.pending.remove(&e.id);
        }
        self.stats.packs_written += 1;
        if self
            .crash_after
            .is_some_and(|n| self.stats.packs_written >= n)
        {
            eprintln!("holdfast: HOLDFAST_TEST_CRASH_AFTER_PACKS reached, aborting");
            std::process::abort();
        }
        Ok(())
    }

    /// Seal the open pack and wait until every pack is stored and in the catalog.
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.seal()?;
        while !self.uploads.is_empty() {
            self.finish_one()?;
        }
        Ok(())
    }
}

impl Drop for PackSink<'_> {
    /// On an error, let uploads in flight end before returning (their packs are unreferenced
    /// until a later sync imports them or gc removes them).
    fn drop(&mut self) {
        for u in self.uploads.drain(..) {
            let _ = u.done.join();
        }
    }
}

pub(crate) struct NewBlobRef<'b> {
    pub id: BlobId,
    pub kind: BlobKind,
    pub codec: Codec,
    pub stored: &'b [u8],
    pub raw_len: u32,
}

/// Back up `disks` of `vm`. Returns the committed manifest.
pub fn backup(
    repo: &Repo,
    vm: &str,
    disks: Vec<DiskSpec>,
    hooks: &Hooks,
    progress: &dyn Progress,
) -> Result<Manifest> {
    crate::names::check("VM", vm)?;
    let lock = VmLock::acquire(&repo.dir, vm, "backup")?;
    backup_locked(repo, vm, &lock, disks, hooks, progress)
}

/// [`backup`] under a VM lock the caller holds (the QEMU cycle holds it from before the read
/// point until after its teardown).
pub fn backup_locked(
    repo: &Repo,
    vm: &str,
    lock: &VmLock,
    disks: Vec<DiskSpec>,
    hooks: &Hooks,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let mut seen = HashSet::new();
    for d in &disks {
        crate::names::check("disk", &d.name)?;
        if !seen.insert(d.name.clone()) {
            return Err(Error::Invalid(format!(
                "disk {} is given twice; each --disk needs its own name",
                d.name
            )));
        }
    }
    if disks.is_empty() {
        return Err(Error::Invalid(
            "no disks to back up; pass --disk NAME=PATH".into(),
        ));
    }
    // `holdfast mount` shows disk X as X.img and X/: a disk named X.img would collide.
    if let Some(d) = disks.iter().find(|d| {
        d.name
            .strip_suffix(".img")
            .is_some_and(|base| seen.contains(base))
    }) {
        return Err(Error::Invalid(format!(
            "disks {} and {} would have the same name in a mount; rename one",
            d.name,
            d.name.trim_end_matches(".img")
        )));
    }
    let started = Instant::now();
    let requests_before = repo.remote.as_ref().map(|r| r.requests.snapshot());
    // Registered as in flight (the lock) before looking at the catalog: gc relies on this order.
    repo.sync()?;
    tracing::debug!(ms = started.elapsed().as_millis(), "backup: store synced");
    let time = lock.started_ms() / 1000;
    let mut suffix = [0u8; 2];
    getrandom::fill(&mut suffix).map_err(|e| Error::Invalid(e.to_string()))?;
    let id = format!("{}-{}", crate::timefmt::compact(time), hex::encode(suffix));

    let extents: Vec<Vec<Extent>> = disks
        .iter()
        .map(|d| d.source.extents())
        .collect::<std::result::Result<_, _>>()?;
    let total: u64 = extents.iter().flatten().map(|(a, b)| b - a).sum();
    tracing::debug!(ms = started.elapsed().as_millis(), "backup: extents known");
    progress.begin("backup", total);
    let mut sink = PackSink::new(repo);
    let mut entries = Vec::new();
    let mut memos = Vec::new();
    let mut done = 0u64;
    for (d, ex) in disks.iter().zip(&extents) {
        let base = incremental_base(repo, vm, d)?;
        let entry = backup_disk(
            repo,
            d,
            ex,
            base.as_ref(),
            &mut sink,
            &mut memos,
            &mut |n| {
                done += n;
                progress.add(n);
                lock.progress(done, total);
            },
        )?;
        entries.push(entry);
    }
    sink.flush()?;
    progress.end();
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        "backup: disks read, packs written"
    );
    if let Some(h) = &hooks.before_commit {
        h();
    }
    super::test_point("before-commit")?;
    if super::interrupted() {
        return Err(Error::Interrupted);
    }
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
        id: id.clone(),
        time,
        time_ms: lock.started_ms(),
        disks: entries,
        stats,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;
    let key = Manifest::key(vm, &id);
    if repo.store.exists(&key)? {
        return Err(Error::Invalid(format!(
            "backup id {id} exists already; re-run the backup"
        )));
    }
    repo.store.put(&key, &json)?;
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        "backup: manifest committed"
    );
    // One catalog write for the backup and the segment memo (a cache of segment bytes to
    // segment lists, valid only now that the backup is committed). If it fails, the committed
    // manifest is still in the store and the next command's sync imports it.
    let mut batch = Batch::default();
    batch.put_backup(vm, &id, &json);
    for (k, m) in &memos {
        batch.put_segmemo(k, m);
    }
    repo.catalog.write(batch)?;
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        "backup: catalog written"
    );
    Ok(manifest)
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
            return Err(Error::Invalid(format!(
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
    on_read: &mut dyn FnMut(u64),
) -> Result<DiskEntry> {
    let size = d.source.size();
    let seg = u64::from(repo.config.chunker.segment_size);
    let n_segs = size.div_ceil(seg);
    let workers = super::workers();
    let (seg_tx, seg_rx) = bounded::<Result<Segment>>(workers);
    let (res_tx, res_rx) = bounded::<Result<SegResult>>(workers);
    let mut segs: Vec<Option<BlobId>> = vec![None; n_segs as usize];
    let mut data_bytes = 0;
    let pool: Pool = bounded(workers * 2 + POOLED + 2);
    std::thread::scope(|s| -> Result<()> {
        let source = d.source.as_ref();
        let reuse = base.map(|b| (b.segs.as_slice(), b.dirty.as_slice()));
        let pool: &Pool = &pool;
        s.spawn(move || read_segments(source, extents, reuse, seg, size, pool, seg_tx));
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
                    })?;
                }
                sink.stats.read_bytes += r.read;
                sink.stats.reused_chunks += r.reused;
                sink.stats.memo_segments += u64::from(r.memo_hit);
                memos.extend(r.memo);
                data_bytes += r.data_bytes;
                segs[r.no as usize] = r.seglist;
                on_read(r.read);
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

fn read_segments(
    src: &dyn Source,
    extents: &[Extent],
    reuse: Reuse<'_>,
    seg: u64,
    size: u64,
    pool: &Pool,
    tx: crossbeam_channel::Sender<Result<Segment>>,
) {
    let mut no = 0u64;
    let tx = &tx;
    let mut next = || -> Option<ReadJob> {
        loop {
            if super::interrupted() {
                let _ = tx.send(Err(Error::Interrupted));
                return None;
            }
            if no.saturating_mul(seg) >= size {
                return None;
            }
            let this = no;
            no += 1;
            let (start, end) = (this * seg, ((this + 1) * seg).min(size));
            if let Some((prev, dirty)) = reuse {
                let di = dirty.partition_point(|d| d.1 <= start);
                if di >= dirty.len() || dirty[di].0 >= end {
                    let prev = prev.get(this as usize).copied().flatten();
                    if tx
                        .send(Ok(Segment {
                            no: this,
                            data: None,
                            len: end - start,
                            reuse: Some(prev),
                        }))
                        .is_err()
                    {
                        return None;
                    }
                    continue;
                }
            }
            let mut ranges = Vec::new();
            let mut j = extents.partition_point(|e| e.1 <= start);
            while j < extents.len() && extents[j].0 < end {
                ranges.push((
                    (extents[j].0.max(start) - start) as usize,
                    (extents[j].1.min(end) - start) as usize,
                ));
                j += 1;
            }
            if ranges.is_empty() {
                if tx
                    .send(Ok(Segment {
                        no: this,
                        data: None,
                        len: end - start,
                        reuse: None,
                    }))
                    .is_err()
                {
                    return None;
                }
                continue;
            }
            let mut buf = pool.1.try_recv().unwrap_or_default();
            buf.resize((end - start) as usize, 0);
            // What the ranges leave out reads as zeros.
            let mut filled = 0;
            for &(a, b) in &ranges {
                buf[filled..a].fill(0);
                filled = b;
            }
            buf[filled..].fill(0);
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
        r.blobs.push(NewBlob {
            id,
            kind: BlobKind::Chunk,
            codec,
            stored,
            raw_len: len as u32,
        });
    }
    let bytes = format::encode_seglist(&entries);
    let id = repo.keyer.id(BlobKind::SegList, &bytes);
    if repo.catalog.chunk(&id.0)?.is_none() {
        let (codec, stored) = chunk::encode(&bytes, level);
        r.blobs.push(NewBlob {
            id,
            kind: BlobKind::SegList,
            codec,
            stored,
            raw_len: bytes.len() as u32,
        });
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
