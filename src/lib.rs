//! holdfast: a backup appliance for virtual machine disks.
//!
//! Write path: `source` → `chunk` → `store` (packs) → `catalog`.
//! Read path: `catalog` + `store` → `image`; restore, export, browse and verify consume `image`.
//! `jobs` do the work, `ops` runs them as tasks behind one typed API, and `cli` and `api` (the
//! HTTP service of `holdfast serve`) are thin front ends over `ops`. The layers, and what each may import, are in
//! docs/architecture.md; `tests/layers.rs` checks the `use` lines against that table.
//!
//! The `appliance` feature (on by default) holds everything that needs RocksDB; without it the
//! crate is just the protocol and format leaves, which is what the fuzz targets build.

pub mod chunk;
pub mod crypto;
pub mod guestfs;
pub mod names;
pub mod nbd;
pub mod qmp;
pub mod source;
pub mod store;
pub mod sys;
pub mod timefmt;

#[cfg(feature = "appliance")]
pub mod api;
#[cfg(feature = "appliance")]
pub mod auth;
#[cfg(feature = "appliance")]
pub mod browse;
#[cfg(feature = "appliance")]
pub mod calendar;
#[cfg(feature = "appliance")]
pub mod catalog;
#[cfg(feature = "appliance")]
pub mod cli;
#[cfg(feature = "appliance")]
pub mod error;
#[cfg(feature = "appliance")]
pub mod fuse;
#[cfg(feature = "appliance")]
mod hooks;
#[cfg(feature = "appliance")]
pub mod image;
#[cfg(feature = "appliance")]
pub mod jobs;
#[cfg(feature = "appliance")]
pub mod notify;
#[cfg(feature = "appliance")]
pub mod ops;
#[cfg(feature = "appliance")]
pub mod policy;
#[cfg(feature = "appliance")]
pub mod repo;
#[cfg(feature = "appliance")]
pub mod task;

#[cfg(feature = "appliance")]
pub use error::{Error, Result};
