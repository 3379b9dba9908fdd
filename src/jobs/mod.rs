//! Jobs: the work itself — backup (files, NBD, running VMs), restore, verify, forget and gc,
//! stats, NBD export, files out of backups, VM snapshots, `doctor`.
//!
//! Each job takes a `Repo` and a [`Ctx`](crate::task::Ctx): it reports through the context's
//! events (never prints), stops at safe points once the context is cancelled, and takes no
//! locks: the layer that runs it as a task (`ops`) holds the VM locks first.

pub mod backup;
pub mod export;
pub mod files;
pub mod gc;
mod packs;
pub mod restore;
pub mod restore_vm;
pub mod snapshot;
pub mod stats;
pub mod verify;
pub mod vmbackup;
pub mod vms;
pub mod vmsession;
