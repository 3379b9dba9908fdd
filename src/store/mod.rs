//! The content store: a small object-store trait, its backends, and the pack format.
//!
//! Keys are `/`-separated and identical across backends (a path under the local directory, an
//! object key in a bucket). Invariants:
//! - `put` is atomic and durable when it returns: readers see the whole object or nothing
//!   (local: temp file → fsync → rename → fsync directory);
//! - packs and manifests are written once and never modified;
//! - this module knows bytes and keys only: ids are opaque 32-byte values.

mod cache;
mod local;
pub mod pack;
#[cfg(feature = "appliance")]
pub mod s3;

pub use cache::CachedStore;
#[cfg(feature = "appliance")]
pub(crate) use local::fsync_dir;
pub use local::{pid_alive, LocalStore};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0} not found in the store")]
    NotFound(String),
    #[error("disk full while writing {0}: free some space (or run `holdfast gc`) and re-run; nothing was committed")]
    Full(String),
    #[error("store I/O error on {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("damaged store object {key}: {what}")]
    Corrupt { key: String, what: String },
    #[error("invalid store key {0:?}")]
    BadKey(String),
    /// A remote store (S3) failed after its retries; the message says what to check.
    #[error("{key}: {msg}")]
    Remote { key: String, msg: String },
    /// A write-once object exists already with other bytes.
    #[error("{0} exists already in the store and is never overwritten")]
    Exists(String),
}

impl StoreError {
    pub fn io(key: &str, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::Full(key.to_string()),
            _ if source.kind() == std::io::ErrorKind::NotFound => {
                StoreError::NotFound(key.to_string())
            }
            _ => StoreError::Io {
                key: key.to_string(),
                source,
            },
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What every backend provides. Blocking; callers use threads for parallelism.
pub trait ObjectStore: Send + Sync {
    /// Write a whole object atomically and durably. Overwriting is allowed only where the
    /// caller says so; packs and manifests are never overwritten.
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()>;
    fn get(&self, key: &str) -> StoreResult<Vec<u8>>;
    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>>;
    /// Several ranges of one object, in the order asked. Remote backends coalesce nearby
    /// ranges into few requests; the default reads each range.
    fn get_ranges(&self, key: &str, ranges: &[(u64, usize)]) -> StoreResult<Vec<Vec<u8>>> {
        ranges
            .iter()
            .map(|&(o, l)| self.get_range(key, o, l))
            .collect()
    }
    fn size(&self, key: &str) -> StoreResult<u64>;
    /// All keys under `prefix` (recursively), sorted.
    fn list(&self, prefix: &str) -> StoreResult<Vec<String>>;
    /// Remove an object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> StoreResult<()>;
    fn exists(&self, key: &str) -> StoreResult<bool> {
        match self.size(key) {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn check_key(key: &str) -> StoreResult<()> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && !key.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(key.to_string()))
    }
}

/// The conformance suite every backend must pass (STYLE #4): the local directory, S3 on a real
/// server, and S3 behind a fault-injecting proxy all run it (unit and integration tests).
#[doc(hidden)]
pub mod conformance {
    use super::*;

    /// Run every check under `packs/`, `backups/` and `big/` of an empty store.
    pub fn run(s: &dyn ObjectStore) {
        assert!(matches!(
            s.get("packs/aa/missing"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.get_range("packs/aa/missing", 0, 10),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.size("packs/aa/missing"),
            Err(StoreError::NotFound(_))
        ));
        assert!(!s.exists("packs/aa/missing").unwrap());
        s.put("packs/aa/one", b"hello world").unwrap();
        s.put("packs/ab/two", &vec![7u8; 100_000]).unwrap();
        s.put("backups/vm1/b1", b"{}").unwrap();
        assert_eq!(s.get("packs/aa/one").unwrap(), b"hello world");
        assert_eq!(s.get_range("packs/aa/one", 6, 5).unwrap(), b"world");
        assert_eq!(s.get_range("packs/aa/one", 6, 0).unwrap(), b"");
        assert_eq!(
            s.get_ranges("packs/aa/one", &[(6, 5), (0, 5), (2, 3)])
                .unwrap(),
            vec![b"world".to_vec(), b"hello".to_vec(), b"llo".to_vec()]
        );
        assert!(
            s.get_range("packs/aa/one", 6, 50).is_err(),
            "reading past the end must fail"
        );
        assert!(
            s.get_ranges("packs/aa/one", &[(0, 5), (6, 50)]).is_err(),
            "one range past the end fails the call"
        );
        assert_eq!(s.size("packs/ab/two").unwrap(), 100_000);
        assert!(s.exists("packs/ab/two").unwrap());
        // Writing the same bytes again is harmless (a retried write).
        s.put("packs/ab/two", &vec![7u8; 100_000]).unwrap();
        assert_eq!(s.get("packs/ab/two").unwrap(), vec![7u8; 100_000]);
        // A large object (multipart on S3 with a small threshold): whole, and ranges across
        // part boundaries.
        let big: Vec<u8> = (0..12u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        s.put("big/obj", &big).unwrap();
        assert_eq!(s.size("big/obj").unwrap(), big.len() as u64);
        assert!(
            s.get("big/obj").unwrap() == big,
            "large object comes back whole"
        );
        let ranges = [
            (0u64, 100usize),
            ((5 << 20) - 10, 20),
            ((10 << 20) - 3, 2 << 20),
            ((12 << 20) - 1, 1),
            (3 << 20, 1 << 20),
        ];
        for (r, got) in ranges.iter().zip(s.get_ranges("big/obj", &ranges).unwrap()) {
            assert!(got == big[r.0 as usize..r.0 as usize + r.1], "range {r:?}");
        }
        assert_eq!(
            s.list("packs/").unwrap(),
            vec!["packs/aa/one", "packs/ab/two"]
        );
        assert_eq!(s.list("backups/").unwrap(), vec!["backups/vm1/b1"]);
        assert!(s.list("nothing/").unwrap().is_empty());
        s.delete("packs/aa/one").unwrap();
        s.delete("packs/aa/one").unwrap();
        s.delete("big/obj").unwrap();
        assert!(!s.exists("packs/aa/one").unwrap());
        assert_eq!(s.list("packs/").unwrap(), vec!["packs/ab/two"]);
        assert!(matches!(
            s.put("../escape", b"x"),
            Err(StoreError::BadKey(_))
        ));
        assert!(matches!(s.put("a//b", b"x"), Err(StoreError::BadKey(_))));
        assert!(matches!(s.get("/abs"), Err(StoreError::BadKey(_))));
    }
}
