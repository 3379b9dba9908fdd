//! Typed QEMU operations over [`Client`](super::Client): node discovery, dirty bitmaps, read
//! points (image fleecing), their teardown, leftover discovery after a crash, and snapshots.
//! Each function names the QMP commands it sends; `docs/qemu.md` explains the choices.
//!
//! Invariants:
//! - Every name holdfast gives to a QEMU object starts with [`PREFIX`]; node names stay under
//!   QEMU's 32-byte limit. Names holdfast did not create are never removed, with two documented
//!   exceptions that the caller names explicitly: the previous checkpoint bitmap (removed when a
//!   read point commits) and the internal snapshot tag passed to `delete`.
//! - A work directory (`work_dir`) belongs to one QEMU process: it holds that process's fleecing
//!   files and, if holdfast started it, its NBD server socket `nbd.sock`.
//! - Teardown and leftover cleaning first look at what exists (`query-block-exports`,
//!   `query-jobs`, `query-named-block-nodes`) and act only on that, so they are idempotent.

mod bitmaps;
mod cleanup;
mod model;
mod nodes;
mod readpoint;
mod snapshot;

pub use bitmaps::{
    add_bitmap, disable_bitmap, enable_bitmap, merge_bitmaps, remove_bitmap, rotate_checkpoint,
};
pub use cleanup::{clean_leftovers, find_leftovers, teardown, Leftovers};
pub use model::{DiskRequest, NbdServer, Outcome, ReadPoint, ReadPointDisk, ReadPointRequest};
pub use nodes::{find_disk, list_nodes, Bitmap, BlockNode, InternalSnapshot};
pub use readpoint::create_read_point;
pub use snapshot::{
    commit_overlay, create_overlays, delete_internal_snapshot, list_internal_snapshots,
    load_internal_snapshot, run_state, save_internal_snapshot, Overlay, OverlayRequest, RunState,
};

use super::{QmpError, Result};

/// Prefix of every QEMU object and file holdfast creates.
pub const PREFIX: &str = "holdfast-";

/// QEMU refuses node names of 32 bytes or more.
pub const MAX_NODE_NAME: usize = 31;

/// Check a holdfast-made name (bitmap, snapshot tag): [`PREFIX`], then 1–100 of
/// `[A-Za-z0-9_-]`.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    let rest = name.strip_prefix(PREFIX).unwrap_or("");
    let ok = !rest.is_empty()
        && rest.len() <= 100
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(QmpError::Invalid(format!(
            "{kind} name {name:?} must be {PREFIX:?} followed by 1-100 of [A-Za-z0-9_-] (e.g. {PREFIX}cp-20250101)"
        )))
    }
}

/// A short random token that keeps names of concurrent read points apart (6 hex digits).
pub(crate) fn token() -> String {
    let n = getrandom::u32().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    });
    format!("{:06x}", n & 0xff_ffff)
}

/// `true` if QEMU refused because the object does not exist (class `DeviceNotFound`, or a
/// `GenericError` whose text says so). Used only where the state was checked first.
pub(crate) fn is_not_found(e: &QmpError) -> bool {
    match e {
        QmpError::Command { class, desc, .. } => {
            let d = desc.to_ascii_lowercase();
            class == "DeviceNotFound"
                || d.contains("not found")
                || d.contains("cannot find")
                || d.contains("no such")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("bitmap", "holdfast-cp-1_a").is_ok());
        for bad in [
            "",
            "holdfast-",
            "cp1",
            "holdfast-a b",
            "holdfast-ä",
            "Holdfast-x",
        ] {
            assert!(check_name("bitmap", bad).is_err(), "{bad}");
        }
        let t = token();
        assert_eq!(t.len(), 6);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
