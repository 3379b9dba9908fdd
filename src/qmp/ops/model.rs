//! The read point's data: names, requests, the `ReadPoint` that `create_read_point` returns
//! and `teardown` consumes (it serialises, so teardown can run from another process), and the
//! outcome that decides which checkpoint survives. Shared by `readpoint` and `cleanup`, which
//! do not import each other's logic through it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PREFIX;
use crate::qmp::{QmpError, Result};

/// Read-point objects start with this (then the token).
pub(crate) const RP_PREFIX: &str = "holdfast-rp";
/// File name of holdfast's NBD server socket inside the work directory.
pub(crate) const NBD_SOCKET: &str = "nbd.sock";

/// Which NBD server the exports go on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum NbdServer {
    /// holdfast's own: started on `WORK/nbd.sock` (or reused when already listening there) and
    /// stopped by teardown once no export is left on it.
    #[default]
    Own,
    /// A server someone else started in this QEMU, listening on this unix socket; never stopped.
    Existing(PathBuf),
}

#[derive(Debug, Clone)]
pub struct DiskRequest {
    /// Node name, drive id or qdev id.
    pub disk: String,
    /// The checkpoint bitmap of the last committed backup of this disk, to export as
    /// `qemu:dirty-bitmap:NAME`. Exported only when it exists, is persistent, recording and
    /// consistent; otherwise [`ReadPointDisk::bitmap_note`] says why.
    pub previous_bitmap: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ReadPointRequest {
    /// holdfast's directory for this QEMU process (fleecing files, NBD socket). Absolute.
    pub work_dir: PathBuf,
    pub disks: Vec<DiskRequest>,
    /// The new checkpoint bitmap, same name on every disk (`holdfast-…`); `None` for disks that
    /// cannot hold persistent bitmaps (raw) — then every backup reads all allocated extents.
    pub new_bitmap: Option<String>,
    pub nbd: NbdServer,
    /// Bound for each step (each job wait, each command).
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadPointDisk {
    /// As requested.
    pub disk: String,
    /// The live node.
    pub node: String,
    pub size: u64,
    pub fleece_node: String,
    pub fleece_file: PathBuf,
    pub job_id: String,
    pub export: String,
    /// `nbd+unix:///EXPORT?socket=PATH`
    pub uri: String,
    pub previous_bitmap: Option<String>,
    /// Exported as `qemu:dirty-bitmap:NAME`; `None` means read every allocated extent.
    pub exported_bitmap: Option<String>,
    pub bitmap_note: Option<String>,
    /// The transaction added the new bitmap here.
    pub new_bitmap_added: bool,
    /// The transaction disabled the previous bitmap here.
    pub previous_disabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadPoint {
    /// `holdfast-rpTOKEN`: every object of this read point starts with `ID-`.
    pub id: String,
    pub work_dir: PathBuf,
    pub nbd_socket: PathBuf,
    pub owns_nbd_server: bool,
    pub new_bitmap: Option<String>,
    /// The guest's filesystems were frozen for the transaction (application-consistent).
    pub quiesced: bool,
    pub disks: Vec<ReadPointDisk>,
}

/// How a read point ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backup's manifest is written: the new bitmap becomes the checkpoint.
    Committed,
    /// The backup did not commit: the previous checkpoint stays the checkpoint.
    Failed,
}

/// Something accepts connections on this unix socket.
pub(crate) async fn listening(socket: &Path) -> bool {
    let connect = tokio::net::UnixStream::connect(socket);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), connect).await,
        Ok(Ok(_))
    )
}

pub(crate) fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| QmpError::Invalid(format!("path {} is not UTF-8", p.display())))
}

impl ReadPoint {
    /// Names of QEMU objects of this read point start with this.
    pub fn object_prefix(&self) -> String {
        format!("{}-", self.id)
    }
}

const _: () =
    assert!(RP_PREFIX.len() + 6 + 4 < super::MAX_NODE_NAME && PREFIX.len() < RP_PREFIX.len());
