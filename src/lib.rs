//! holdfast: a backup appliance for virtual machine disks.
//!
//! Write path: `source` → `chunk` → `store` (packs) → `catalog`.
//! Read path: `catalog` + `store` → `image`; restore and verify consume `image`.
//! The leaves (`chunk`, `store`, `catalog`) never import each other; `jobs` ties them together
//! and `cli` is the only place that knows about terminals.

pub mod catalog;
pub mod chunk;
pub mod cli;
pub mod image;
pub mod jobs;
pub mod names;
pub mod nbd;
pub mod repo;
pub mod source;
pub mod store;
pub mod timefmt;

mod error;
pub use error::{Error, Result};
