//! Bounded caches: an LRU map with a cost budget, and a chunk cache over a [`Device`].
//!
//! Invariants: the summed cost of the entries stays at or under the budget (one entry larger
//! than the budget is simply not kept); only successful device reads are cached.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use super::{read_exact, Device, Result};

struct Inner<K, V> {
    map: HashMap<K, (V, usize, u64)>,
    cost: usize,
    tick: u64,
}

/// A least-recently-used map whose entries have a cost; thread-safe.
pub(crate) struct Lru<K, V> {
    inner: Mutex<Inner<K, V>>,
    budget: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    pub(crate) fn new(budget: usize) -> Self {
        Lru {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                cost: 0,
                tick: 0,
            }),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that
        // matters for a cache, so a poisoned lock is simply reused.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, key: &K) -> Option<V> {
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        g.map.get_mut(key).map(|e| {
            e.2 = tick;
            e.0.clone()
        })
    }

    pub(crate) fn insert(&self, key: K, value: V, cost: usize) {
        let cost = cost.max(1);
        if cost > self.budget {
            return;
        }
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        if let Some(old) = g.map.insert(key, (value, cost, tick)) {
            g.cost -= old.1;
        }
        g.cost += cost;
        if g.cost > self.budget {
            // Evict the older half (by last use) in one pass: amortised O(1) per insert.
            let mut ticks: Vec<u64> = g.map.values().map(|e| e.2).collect();
            ticks.sort_unstable();
            let cut = ticks[ticks.len() / 2];
            g.map.retain(|_, e| e.2 > cut || e.2 == tick);
            g.cost = g.map.values().map(|e| e.1).sum();
        }
    }

    /// The cached value, or `make()`'s (cached with `cost(&value)`).
    pub(crate) fn get_or(
        &self,
        key: K,
        make: impl FnOnce() -> Result<V>,
        cost: impl FnOnce(&V) -> usize,
    ) -> Result<V> {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        let v = make()?;
        let c = cost(&v);
        self.insert(key, v.clone(), c);
        Ok(v)
    }
}

/// Size of one cached metadata chunk.
pub(crate) const CHUNK: u64 = 64 * 1024;

/// Caches aligned 64 KiB chunks of a device for small metadata reads.
pub(crate) struct ChunkCache {
    dev: Arc<dyn Device>,
    chunks: Lru<u64, Arc<Vec<u8>>>,
}

impl ChunkCache {
    pub(crate) fn new(dev: Arc<dyn Device>, budget_bytes: usize) -> Self {
        ChunkCache {
            dev,
            chunks: Lru::new(budget_bytes),
        }
    }

    fn chunk(&self, index: u64) -> Result<Arc<Vec<u8>>> {
        let dev = &self.dev;
        self.chunks.get_or(
            index,
            || {
                let start = index * CHUNK;
                let len = CHUNK.min(dev.size().saturating_sub(start)) as usize;
                let mut buf = vec![0u8; len];
                read_exact(&**dev, &mut buf, start)?;
                Ok(Arc::new(buf))
            },
            |v| v.len(),
        )
    }

    /// Fills `buf` from `offset`, through the cache. The range is checked against the device
    /// size (`Corrupt` beyond it).
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = super::bytes::add(offset, buf.len() as u64, "metadata range")?;
        if end > self.dev.size() {
            return Err(super::error::corrupt(format!(
                "metadata range {offset}..{end} lies beyond the end of the device"
            )));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let chunk = self.chunk(pos / CHUNK)?;
            let within = (pos % CHUNK) as usize;
            let n = (chunk.len().saturating_sub(within)).min(buf.len() - done);
            if n == 0 {
                return Err(super::error::corrupt("short metadata chunk"));
            }
            buf[done..done + n].copy_from_slice(&chunk[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// `len` bytes at `offset` as a new vector.
    pub(crate) fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(&mut v, offset)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_respects_budget() {
        let lru: Lru<u32, u32> = Lru::new(10);
        for i in 0..100 {
            lru.insert(i, i, 3);
        }
        assert!(lru.get(&99).is_some());
        let g = lru.lock();
        assert!(g.cost <= 10);
        drop(g);
        lru.insert(1000, 1, 11);
        assert!(lru.get(&1000).is_none());
    }
}
