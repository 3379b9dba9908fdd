//! A bounded local read cache in front of a remote store: each range read (a blob inside a
//! pack, a pack footer) is kept as a file, so restore, export and FUSE never fetch the same
//! range twice while it fits.
//!
//! - Only ranges are cached: packs are written once, so a cached range never goes stale (a
//!   pack deleted by gc leaves entries nobody asks for, evicted in time).
//! - Each file carries a checksum of its key, range and bytes; a damaged or foreign file is a
//!   miss (deleted and fetched again), never wrong bytes.
//! - The budget is kept by evicting the least recently used files (by mtime, touched on hit)
//!   down to 90% of it; several processes may share the directory (writes are temp + rename).

use super::{ObjectStore, StoreResult};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

pub struct CachedStore {
    inner: Arc<dyn ObjectStore>,
    dir: PathBuf,
    budget: u64,
    used: AtomicU64,
    evicting: Mutex<()>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

const TAG: usize = 32;

impl CachedStore {
    /// Cache `inner`'s ranges in `dir`, within `budget` bytes (0 turns the cache off).
    pub fn new(inner: Arc<dyn ObjectStore>, dir: &Path, budget: u64) -> CachedStore {
        let _ = fs::create_dir_all(dir);
        let used = files(dir).iter().map(|(_, len, _)| len).sum();
        CachedStore {
            inner,
            dir: dir.to_path_buf(),
            budget,
            used: AtomicU64::new(used),
            evicting: Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn tag(key: &str, offset: u64, data: &[u8]) -> [u8; TAG] {
        let mut h = blake3::Hasher::new();
        h.update(key.as_bytes());
        h.update(&[0]);
        h.update(&offset.to_le_bytes());
        h.update(&(data.len() as u64).to_le_bytes());
        h.update(data);
        *h.finalize().as_bytes()
    }

    fn path(&self, key: &str, offset: u64, len: usize) -> PathBuf {
        let name = blake3::hash(format!("{key}\0{offset}\0{len}").as_bytes()).to_hex();
        self.dir.join(&name[..2]).join(&name[2..])
    }

    fn lookup(&self, key: &str, offset: u64, len: usize) -> Option<Vec<u8>> {
        let p = self.path(key, offset, len);
        let mut b = fs::read(&p).ok()?;
        if b.len() == len + TAG && b[len..] == Self::tag(key, offset, &b[..len]) {
            b.truncate(len);
            if let Ok(f) = fs::File::options().write(true).open(&p) {
                let _ = f.set_modified(SystemTime::now());
            }
            return Some(b);
        }
        if fs::remove_file(&p).is_ok() {
            self.used.fetch_sub(
                (b.len() as u64).min(self.used.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
        None
    }

    fn store(&self, key: &str, offset: u64, data: &[u8]) {
        let size = (data.len() + TAG) as u64;
        if size > self.budget / 4 {
            return; // one entry never takes a large share of the cache
        }
        let p = self.path(key, offset, data.len());
        let Some(parent) = p.parent() else { return };
        let _ = fs::create_dir_all(parent);
        let tmp = parent.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            crate::timefmt::now_millis()
        ));
        let ok = (|| -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.write_all(&Self::tag(key, offset, data))?;
            fs::rename(&tmp, &p)
        })();
        if ok.is_err() {
            let _ = fs::remove_file(&tmp);
            return;
        }
        if self.used.fetch_add(size, Ordering::Relaxed) + size > self.budget {
            self.evict();
        }
    }

    /// Delete least recently used files down to 90% of the budget.
    fn evict(&self) {
        let Ok(_g) = self.evicting.try_lock() else {
            return;
        };
        let mut all = files(&self.dir);
        all.sort_by_key(|(_, _, t)| *t);
        let mut used: u64 = all.iter().map(|(_, l, _)| l).sum();
        let goal = self.budget / 10 * 9;
        for (p, len, _) in all {
            if used <= goal {
                break;
            }
            if fs::remove_file(&p).is_ok() {
                used -= len;
            }
        }
        self.used.store(used, Ordering::Relaxed);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Every cache file: (path, length, mtime).
fn files(dir: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for sub in rd.flatten() {
        let Ok(inner) = fs::read_dir(sub.path()) else {
            continue;
        };
        for f in inner.flatten() {
            if let Ok(m) = f.metadata() {
                if m.is_file() {
                    out.push((
                        f.path(),
                        m.len(),
                        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    ));
                }
            }
        }
    }
    out
}

impl ObjectStore for CachedStore {
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        if self.budget == 0 || len == 0 {
            return self.inner.get_range(key, offset, len);
        }
        if let Some(b) = self.lookup(key, offset, len) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let b = self.inner.get_range(key, offset, len)?;
        self.store(key, offset, &b);
        Ok(b)
    }
    fn get_ranges(&self, key: &str, ranges: &[(u64, usize)]) -> StoreResult<Vec<Vec<u8>>> {
        if self.budget == 0 {
            return self.inner.get_ranges(key, ranges);
        }
        let mut out: Vec<Option<Vec<u8>>> = ranges
            .iter()
            .map(|&(o, l)| {
                if l == 0 {
                    Some(Vec::new())
                } else {
                    self.lookup(key, o, l)
                }
            })
            .collect();
        let missing: Vec<usize> = (0..ranges.len()).filter(|&i| out[i].is_none()).collect();
        self.hits
            .fetch_add((ranges.len() - missing.len()) as u64, Ordering::Relaxed);
        if !missing.is_empty() {
            self.misses
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
            let want: Vec<(u64, usize)> = missing.iter().map(|&i| ranges[i]).collect();
            for (i, b) in missing.into_iter().zip(self.inner.get_ranges(key, &want)?) {
                self.store(key, ranges[i].0, &b);
                out[i] = Some(b);
            }
        }
        Ok(out.into_iter().map(|b| b.unwrap_or_default()).collect())
    }
    fn size(&self, key: &str) -> StoreResult<u64> {
        self.inner.size(key)
    }
    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key)
    }
    fn exists(&self, key: &str) -> StoreResult<bool> {
        self.inner.exists(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[test]
    fn caches_ranges_within_budget_and_never_returns_damaged_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(LocalStore::new(dir.path().join("store")));
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        inner.put("packs/aa/p1", &data).unwrap();
        let c = CachedStore::new(inner.clone(), &dir.path().join("cache"), 256 << 10);
        assert_eq!(
            c.get_range("packs/aa/p1", 100, 1000).unwrap(),
            &data[100..1100]
        );
        assert_eq!(
            c.get_range("packs/aa/p1", 100, 1000).unwrap(),
            &data[100..1100]
        );
        assert_eq!(
            (
                c.hits.load(Ordering::Relaxed),
                c.misses.load(Ordering::Relaxed)
            ),
            (1, 1)
        );
        // The cache answers even when the object is gone from the store.
        inner.delete("packs/aa/p1").unwrap();
        assert_eq!(
            c.get_range("packs/aa/p1", 100, 1000).unwrap(),
            &data[100..1100]
        );
        // A damaged cache file is a miss, not wrong bytes.
        let p = c.path("packs/aa/p1", 100, 1000);
        let mut b = fs::read(&p).unwrap();
        b[5] ^= 1;
        fs::write(&p, &b).unwrap();
        assert!(c.get_range("packs/aa/p1", 100, 1000).is_err());
        // The budget holds: 100 different 16 KiB ranges in a 256 KiB cache.
        inner.put("packs/aa/p1", &data).unwrap();
        for i in 0..100u64 {
            assert_eq!(
                c.get_range("packs/aa/p1", i * 1000, 16 << 10).unwrap(),
                &data[i as usize * 1000..i as usize * 1000 + (16 << 10)]
            );
        }
        let on_disk: u64 = files(&dir.path().join("cache"))
            .iter()
            .map(|(_, l, _)| l)
            .sum();
        assert!(on_disk <= 256 << 10, "cache holds {on_disk} bytes");
        assert!(c.used() <= 256 << 10);
    }
}
