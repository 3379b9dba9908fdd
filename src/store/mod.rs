//! The content store: a small object-store trait, its backends, and the pack format.
//!
//! Keys are `/`-separated and identical across backends (a path under the local directory, an
//! object key in a bucket). Invariants:
//! - `put` is atomic and durable when it returns: readers see the whole object or nothing
//!   (local: temp file → fsync → rename → fsync directory);
//! - packs and manifests are written once and never modified;
//! - this module knows bytes and keys only: ids are opaque 32-byte values.

mod local;
pub mod pack;

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
}

impl StoreError {
    pub fn io(key: &str, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::Full(key.to_string()),
            _ if source.kind() == std::io::ErrorKind::NotFound => StoreError::NotFound(key.to_string()),
            _ => StoreError::Io { key: key.to_string(), source },
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
        && key.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        && !key.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(key.to_string()))
    }
}

/// The conformance suite every backend must pass (STYLE #4). Called from each backend's tests.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    pub fn run(s: &dyn ObjectStore) {
        assert!(matches!(s.get("packs/aa/missing"), Err(StoreError::NotFound(_))));
        assert!(!s.exists("packs/aa/missing").unwrap());
        s.put("packs/aa/one", b"hello world").unwrap();
        s.put("packs/ab/two", &vec![7u8; 100_000]).unwrap();
        s.put("backups/vm1/b1", b"{}").unwrap();
        assert_eq!(s.get("packs/aa/one").unwrap(), b"hello world");
        assert_eq!(s.get_range("packs/aa/one", 6, 5).unwrap(), b"world");
        assert!(s.get_range("packs/aa/one", 6, 50).is_err(), "reading past the end must fail");
        assert_eq!(s.size("packs/ab/two").unwrap(), 100_000);
        assert_eq!(s.list("packs/").unwrap(), vec!["packs/aa/one", "packs/ab/two"]);
        assert_eq!(s.list("backups/").unwrap(), vec!["backups/vm1/b1"]);
        assert!(s.list("nothing/").unwrap().is_empty());
        s.delete("packs/aa/one").unwrap();
        s.delete("packs/aa/one").unwrap();
        assert!(!s.exists("packs/aa/one").unwrap());
        assert!(matches!(s.put("../escape", b"x"), Err(StoreError::BadKey(_))));
        assert!(matches!(s.put("a//b", b"x"), Err(StoreError::BadKey(_))));
    }
}
