//! Random-access reader of one backed-up disk: offset → segment → chunk, every chunk re-hashed,
//! with a small cache of recently read chunks and segment lists.

use crate::chunk::{BlobId, BlobKind};
use crate::repo::format::SegEntry;
use crate::repo::{DiskEntry, Repo};
use crate::Result;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

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

pub struct ImageReader<'r> {
    repo: &'r Repo,
    size: u64,
    seg: u64,
    segs: Vec<Option<BlobId>>,
    seglists: Mutex<Cache<Arc<Vec<(u64, SegEntry)>>>>,
    chunks: Mutex<Cache<Arc<Vec<u8>>>>,
}

impl<'r> ImageReader<'r> {
    /// `cache_chunks`: how many decoded chunks to keep (64 KiB on average each).
    pub fn open(repo: &'r Repo, disk: &DiskEntry, cache_chunks: usize) -> Result<Self> {
        Ok(ImageReader {
            repo,
            size: disk.size,
            seg: u64::from(disk.segment_size),
            segs: repo.disk_segments(disk)?,
            seglists: Mutex::new(Cache::new(256)),
            chunks: Mutex::new(Cache::new(cache_chunks.max(1))),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Entries of segment `i` with their offsets inside the segment.
    fn entries(&self, i: usize) -> Result<Option<Arc<Vec<(u64, SegEntry)>>>> {
        let Some(id) = self.segs.get(i).copied().flatten() else { return Ok(None) };
        if let Some(v) = self.seglists.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(Some(v));
        }
        let len = self.seg.min(self.size - i as u64 * self.seg);
        let mut at = 0;
        let mut v = Vec::new();
        for e in self.repo.seglist(&id, len)? {
            v.push((at, e));
            at += u64::from(e.len());
        }
        let v = Arc::new(v);
        self.seglists.lock().unwrap_or_else(|p| p.into_inner()).put(id, v.clone());
        Ok(Some(v))
    }

    fn chunk(&self, id: &BlobId) -> Result<Arc<Vec<u8>>> {
        if let Some(c) = self.chunks.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(c);
        }
        let c = Arc::new(self.repo.read_blob(BlobKind::Chunk, id)?);
        self.chunks.lock().unwrap_or_else(|p| p.into_inner()).put(*id, c.clone());
        Ok(c)
    }

    /// Fill `buf` from `offset`; reads past the end are cut short. Returns bytes read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let mut done = 0;
        while done < n {
            let pos = offset + done as u64;
            let i = (pos / self.seg) as usize;
            let in_seg = pos % self.seg;
            let seg_left = (self.seg - in_seg).min(self.size - pos) as usize;
            let want = (n - done).min(seg_left);
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
}
