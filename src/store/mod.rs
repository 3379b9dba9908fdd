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
pub mod sealed;

pub use cache::CachedStore;
pub use local::LocalStore;

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

/// Test doubles and the conformance suite every backend must pass (unit tests, and the
/// integration tests through the `testing` feature).
#[cfg(any(test, feature = "testing"))]
pub mod testing;
