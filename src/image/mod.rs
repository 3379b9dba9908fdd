//! Random-access reader of one backed-up disk: offset → segment → chunk, every chunk re-hashed,
//! with a bounded cache of decoded chunks and segment lists, and sequential prefetch.
//!
//! Invariants: bytes come only from chunks that re-hashed to their ids (the cache holds only
//! verified chunks); a damaged chunk is an error for the reads that touch it, never wrong bytes.
//! Prefetch is best effort: its failures are dropped, and the read that needs the chunk reports.

use crate::chunk::{BlobId, BlobKind};
use crate::repo::format::SegEntry;
use crate::repo::{DiskEntry, Repo};
use crate::Result;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// A bounded cache: least recently inserted goes first.
struct Cache<V> {
    map: HashMap<BlobId, V>,
    order: VecDeque<BlobId>,
    cap: usize,
}

impl<V: Clone> Cache<V> {
    fn new(cap: usize) -> Self {
        Cache { map: HashMap::new(), order: VecDeque::new(), cap }
    }
    fn get(&self, id: &BlobId) -> Option<V> {
        self.map.get(id).cloned()
    }
    fn remove(&mut self, id: &BlobId) {
        self.map.remove(id);
    }
    fn put(&mut self, id: BlobId, v: V) {
        if self.map.insert(id, v).is_none() {
            self.order.push_back(id);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

type Entries = Arc<Vec<(u64, SegEntry)>>;
/// A cache slot is filled once: readers that want a chunk being decoded wait for that decode
/// instead of decoding it again. A failed decode leaves `None` and the slot is dropped.
type Slot = Arc<OnceLock<Option<Arc<Vec<u8>>>>>;
type ChunkCache = Arc<Mutex<Cache<Slot>>>;

/// Recent ends of reads, one per sequential stream (several clients, or one client with
/// several connections, interleave their streams).
const STREAMS: usize = 16;

/// The decoded chunk `id`, from the cache or the store, decoded once however many ask.
fn load(repo: &Repo, chunks: &Mutex<Cache<Slot>>, id: &BlobId) -> Result<Arc<Vec<u8>>> {
    let slot = {
        let mut c = lock(chunks);
        match c.get(id) {
            Some(s) => s,
            None => {
                let s = Slot::default();
                c.put(*id, s.clone());
                s
            }
        }
    };
    let mut failed = None;
    let got = slot.get_or_init(|| match repo.read_blob(BlobKind::Chunk, id) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            failed = Some(e);
            None
        }
    });
    if let Some(c) = got {
        return Ok(c.clone());
    }
    {
        let mut c = lock(chunks);
        if c.get(id).is_some_and(|s| Arc::ptr_eq(&s, &slot)) {
            c.remove(id);
        }
    }
    match failed {
        Some(e) => Err(e),
        // Another reader's decode failed; try once more to report our own error.
        None => repo.read_blob(BlobKind::Chunk, id).map(Arc::new),
    }
}

/// Decoded chunks shared by every reader that holds it (a FUSE mount opens many disks, and
/// backups of one VM share most chunks), with two prefetch threads fed by a bounded queue.
pub struct Chunks {
    repo: Arc<Repo>,
    cache: ChunkCache,
    prefetch: Option<crossbeam_channel::Sender<BlobId>>,
    queued: Arc<Mutex<HashSet<BlobId>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Chunks {
    /// `cache_chunks`: how many decoded chunks to keep (64 KiB on average each).
    pub fn new(repo: Arc<Repo>, cache_chunks: usize) -> Arc<Chunks> {
        let cache: ChunkCache = Arc::new(Mutex::new(Cache::new(cache_chunks.max(1))));
        let queued = Arc::new(Mutex::new(HashSet::new()));
        let (tx, rx) = crossbeam_channel::bounded::<BlobId>(256);
        let mut threads = Vec::new();
        for _ in 0..2 {
            let (repo, cache, queued, rx) = (repo.clone(), cache.clone(), queued.clone(), rx.clone());
            threads.push(std::thread::spawn(move || {
                for id in rx {
                    let _ = load(&repo, &cache, &id);
                    lock(&queued).remove(&id);
                }
            }));
        }
        Arc::new(Chunks { repo, cache, prefetch: Some(tx), queued, threads })
    }

    pub fn repo(&self) -> &Arc<Repo> {
        &self.repo
    }

    fn get(&self, id: &BlobId) -> Result<Arc<Vec<u8>>> {
        load(&self.repo, &self.cache, id)
    }

    /// Queue `id` for the prefetch threads; false when the queue is full.
    fn queue(&self, id: &BlobId) -> bool {
        let Some(tx) = &self.prefetch else { return false };
        if lock(&self.cache).get(id).is_some_and(|s| s.get().is_some()) || !lock(&self.queued).insert(*id) {
            return true;
        }
        if tx.try_send(*id).is_err() {
            lock(&self.queued).remove(id);
            return false;
        }
        true
    }
}

impl Drop for Chunks {
    /// Close the queue and wait for the prefetch threads: none may still use the catalog while
    /// the process exits.
    fn drop(&mut self) {
        self.prefetch.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub struct ImageReader {
    chunks: Arc<Chunks>,
    size: u64,
    seg: u64,
    segs: Vec<Option<BlobId>>,
    seglists: Mutex<Cache<Entries>>,
    /// Ends of recent reads, to spot sequential streams.
    ends: [AtomicU64; STREAMS],
    next_stream: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ImageReader {
    /// A reader with a chunk cache of its own of `cache_chunks` chunks.
    pub fn open(repo: Arc<Repo>, disk: &DiskEntry, cache_chunks: usize) -> Result<Self> {
        ImageReader::with_chunks(Chunks::new(repo, cache_chunks), disk)
    }

    /// A reader that shares `chunks` with other readers.
    pub fn with_chunks(chunks: Arc<Chunks>, disk: &DiskEntry) -> Result<Self> {
        let segs = chunks.repo.disk_segments(disk)?;
        Ok(ImageReader {
            chunks,
            size: disk.size,
            seg: u64::from(disk.segment_size),
            segs,
            seglists: Mutex::new(Cache::new(256)),
            ends: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            next_stream: AtomicU64::new(0),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Entries of segment `i` with their offsets inside the segment.
    fn entries(&self, i: usize) -> Result<Option<Entries>> {
        let Some(id) = self.segs.get(i).copied().flatten() else { return Ok(None) };
        if let Some(v) = lock(&self.seglists).get(&id) {
            return Ok(Some(v));
        }
        let len = self.seg.min(self.size - i as u64 * self.seg);
        let mut at = 0;
        let mut v = Vec::new();
        for e in self.chunks.repo.seglist(&id, len)? {
            v.push((at, e));
            at += u64::from(e.len());
        }
        let v = Arc::new(v);
        lock(&self.seglists).put(id, v.clone());
        Ok(Some(v))
    }

    fn chunk(&self, id: &BlobId) -> Result<Arc<Vec<u8>>> {
        self.chunks.get(id)
    }

    /// Record a read of `[offset, end)`; true when it continues a recent read.
    fn sequential(&self, offset: u64, end: u64) -> bool {
        for e in &self.ends {
            if e.compare_exchange(offset, end, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                return true;
            }
        }
        let k = self.next_stream.fetch_add(1, Ordering::Relaxed) as usize % STREAMS;
        self.ends[k].store(end, Ordering::Relaxed);
        false
    }

    /// Queue the chunks of segment `i` for the prefetch threads.
    fn prefetch_segment(&self, i: usize) {
        let Ok(Some(es)) = self.entries(i) else { return };
        for (_, e) in es.iter() {
            if let SegEntry::Chunk(id, _) = e {
                if !self.chunks.queue(id) {
                    return;
                }
            }
        }
    }

    /// Fill `buf` from `offset`; reads past the end are cut short. Returns bytes read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let end = offset + n as u64;
        if self.sequential(offset, end) {
            // Prefetch only when the read enters a new segment, so each segment is queued once.
            let (first, next) = ((offset / self.seg) as usize, (end / self.seg) as usize);
            if next != first || offset.is_multiple_of(self.seg) {
                self.prefetch_segment(next);
                self.prefetch_segment(next + 1);
            }
        }
        let mut done = 0;
        while done < n {
            let pos = offset + done as u64;
            let i = (pos / self.seg) as usize;
            let in_seg = pos % self.seg;
            let want = (n - done).min((self.seg - in_seg).min(self.size - pos) as usize);
            let out = &mut buf[done..done + want];
            match self.entries(i)? {
                None => out.fill(0),
                Some(es) => self.fill_from(&es, in_seg, out)?,
            }
            done += want;
        }
        Ok(n)
    }

    fn fill_from(&self, es: &[(u64, SegEntry)], in_seg: u64, out: &mut [u8]) -> Result<()> {
        let mut k = es.partition_point(|(at, e)| at + u64::from(e.len()) <= in_seg);
        let mut filled = 0;
        while filled < out.len() {
            let Some((at, e)) = es.get(k) else { break };
            let from = (in_seg + filled as u64 - at) as usize;
            let take = (e.len() as usize - from).min(out.len() - filled);
            match e {
                SegEntry::Hole(_) => out[filled..filled + take].fill(0),
                SegEntry::Chunk(id, _) => out[filled..filled + take].copy_from_slice(&self.chunk(id)?[from..from + take]),
            }
            filled += take;
            k += 1;
        }
        Ok(())
    }

    /// Allocation of `[offset, offset + len)` as `(length, is_hole)` runs, from the segment
    /// lists alone (no chunk is read).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |l: u64, hole: bool| match out.last_mut() {
            Some((pl, ph)) if *ph == hole => *pl += l,
            _ => out.push((l, hole)),
        };
        let mut pos = offset;
        while pos < end {
            let i = (pos / self.seg) as usize;
            let seg_start = i as u64 * self.seg;
            let seg_end = (seg_start + self.seg).min(self.size).min(end);
            match self.entries(i)? {
                None => push(seg_end - pos, true),
                Some(es) => {
                    for (at, e) in es.iter() {
                        let (a, b) = ((seg_start + at).max(pos), (seg_start + at + u64::from(e.len())).min(seg_end));
                        if a < b {
                            push(b - a, matches!(e, SegEntry::Hole(_)));
                        }
                    }
                }
            }
            pos = seg_end;
        }
        Ok(out)
    }
}
