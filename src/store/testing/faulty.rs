//! A wrapper that injects faults into any backend: fail the Nth put or get, delay every call,
//! truncate what reads return. Beside the real backends, never instead of them.

use super::super::{ObjectStore, StoreError, StoreResult};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Which faults to inject. Counts start at 1: `fail_put: Some(3)` fails the third put.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub fail_put: Option<u64>,
    pub fail_get: Option<u64>,
    /// Every call sleeps this long first.
    pub delay: Option<Duration>,
    /// Reads return at most this many bytes (a truncated body).
    pub truncate: Option<usize>,
}

pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Faults,
    puts: AtomicU64,
    gets: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Faults) -> FaultyStore {
        FaultyStore {
            inner,
            faults,
            puts: AtomicU64::new(0),
            gets: AtomicU64::new(0),
        }
    }

    /// Puts and gets (whole or ranged) seen so far.
    pub fn calls(&self) -> (u64, u64) {
        (
            self.puts.load(Ordering::SeqCst),
            self.gets.load(Ordering::SeqCst),
        )
    }

    fn wait(&self) {
        if let Some(d) = self.faults.delay {
            std::thread::sleep(d);
        }
    }

    fn injected(key: &str, what: &str) -> StoreError {
        StoreError::Remote {
            key: key.to_string(),
            msg: format!("injected fault: {what}"),
        }
    }

    fn count_get(&self, key: &str) -> StoreResult<()> {
        self.wait();
        let n = self.gets.fetch_add(1, Ordering::SeqCst) + 1;
        if self.faults.fail_get == Some(n) {
            return Err(Self::injected(key, &format!("get #{n} fails")));
        }
        Ok(())
    }

    fn cut(&self, mut v: Vec<u8>) -> Vec<u8> {
        if let Some(t) = self.faults.truncate {
            v.truncate(t);
        }
        v
    }
}

impl ObjectStore for FaultyStore {
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.wait();
        let n = self.puts.fetch_add(1, Ordering::SeqCst) + 1;
        if self.faults.fail_put == Some(n) {
            return Err(Self::injected(key, &format!("put #{n} fails")));
        }
        self.inner.put(key, data)
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        self.count_get(key)?;
        self.inner.get(key).map(|v| self.cut(v))
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        self.count_get(key)?;
        self.inner.get_range(key, offset, len).map(|v| self.cut(v))
    }

    fn size(&self, key: &str) -> StoreResult<u64> {
        self.wait();
        self.inner.size(key)
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        self.wait();
        self.inner.list(prefix)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        self.wait();
        self.inner.delete(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::MemoryStore;

    #[test]
    fn without_faults_it_passes_the_conformance_suite() {
        let s = FaultyStore::new(Arc::new(MemoryStore::new()), Faults::default());
        super::super::run(&s);
        assert!(s.calls().0 > 0 && s.calls().1 > 0);
    }

    #[test]
    fn the_nth_put_and_get_fail_and_reads_can_be_cut_short() {
        let faults = Faults {
            fail_put: Some(2),
            fail_get: Some(1),
            ..Faults::default()
        };
        let s = FaultyStore::new(Arc::new(MemoryStore::new()), faults);
        s.put("a/1", b"one").unwrap();
        assert!(matches!(
            s.put("a/2", b"two"),
            Err(StoreError::Remote { .. })
        ));
        s.put("a/2", b"two").unwrap();
        assert!(s.get("a/1").is_err());
        assert_eq!(s.get("a/1").unwrap(), b"one");
        let cut = FaultyStore::new(
            Arc::new(MemoryStore::new()),
            Faults {
                truncate: Some(2),
                ..Faults::default()
            },
        );
        cut.put("a/x", b"hello").unwrap();
        assert_eq!(cut.get("a/x").unwrap(), b"he");
        assert_eq!(cut.get_range("a/x", 1, 3).unwrap(), b"el");
    }
}
