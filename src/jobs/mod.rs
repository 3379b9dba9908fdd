//! Jobs: backup, restore, verify, forget, gc, stats. Each takes a `Repo` and a `Progress`.

pub mod backup;
pub mod browse;
pub mod export;
pub mod files;
pub mod gc;
pub mod lock;
pub mod progress;
pub mod restore;
pub mod stats;
pub mod verify;

pub use progress::{NoProgress, Progress};

/// Worker threads for CPU-bound stages (hashing, compression, decompression).
pub fn workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 64)
}
