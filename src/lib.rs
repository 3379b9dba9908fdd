//! holdfast: a backup appliance for virtual machine disks.
//!
//! Write path: `source` → `chunk` → `store` (packs) → `catalog`.
//! Read path: `catalog` + `store` → `image`; restore and verify consume `image`.
//! The leaves (`chunk`, `store`, `catalog`) never import each other; `jobs` ties them together
//! and `cli` is the only place that knows about terminals.

//!
//! The `appliance` feature (on by default) holds everything that needs RocksDB; without it the
//! crate is just the protocol and format leaves, which is what the fuzz targets build.

#[cfg(feature = "appliance")]
pub mod catalog;
pub mod chunk;
#[cfg(feature = "appliance")]
pub mod cli;
#[cfg(feature = "appliance")]
pub mod fuse;
pub mod guestfs;
#[cfg(feature = "appliance")]
pub mod image;
#[cfg(feature = "appliance")]
pub mod jobs;
pub mod names;
pub mod nbd;
pub mod qmp;
#[cfg(feature = "appliance")]
pub mod repo;
pub mod source;
pub mod store;
pub mod timefmt;

#[cfg(feature = "appliance")]
mod error;
#[cfg(feature = "appliance")]
pub use error::{Error, Result};
