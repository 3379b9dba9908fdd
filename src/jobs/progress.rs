//! Progress reporting, owned by the core. Only `cli` draws it on a terminal.

pub trait Progress: Send + Sync {
    /// A phase starts; `total` is in bytes (0 = unknown).
    fn begin(&self, _what: &str, _total: u64) {}
    fn add(&self, _bytes: u64) {}
    fn end(&self) {}
}

pub struct NoProgress;

impl Progress for NoProgress {}
