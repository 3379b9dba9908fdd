//! Guest partition tables and filesystems, read in-process from a random-access [`Device`].
//!
//! [`partitions`] lists a disk's GPT or MBR partitions (including logical partitions of an
//! extended one); [`open`] detects ext2/3/4, FAT12/16/32 (with VFAT long names) or NTFS on a
//! device and returns a [`Filesystem`]: inode-based, read-only, shareable between threads
//! (the FUSE mount and `holdfast cat` call it concurrently through `&self`).
//!
//! Invariants:
//! - The guest owns the bytes: every on-disk structure is parsed by pure functions with checked
//!   arithmetic; nothing here panics on disk data, every allocation sized by the disk is capped
//!   (directory sizes, extent and run counts, name and symlink lengths), and every walk over a
//!   linked structure (FAT chains, extent trees, EBR chains, attribute lists) is step-bounded.
//! - A failed [`Device::read_at`] surfaces as [`GuestFsError::Io`]; it is never turned into
//!   zeros or other bytes. Holes and unwritten extents are the only zeros invented here.
//! - Inode numbers are stable for a given image and hard links share one number: ext uses its
//!   own inode numbers, NTFS the MFT record number, FAT the position of the short directory
//!   entry (FAT has no hard links). Each filesystem's root is [`Filesystem::root`].
//! - File data is read in runs as large as the caller's buffer allows (one device read per
//!   extent/cluster run); metadata (inode tables, directory contents, FAT portions, MFT
//!   records) goes through bounded LRU caches.
//! - This module is a leaf: it knows nothing about the catalog, the store or images.

mod bytes;
mod cache;
mod error;
pub mod ext;
pub mod fat;
pub mod ntfs;
mod part;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

pub use error::{GuestFsError, Result};
pub use part::{partitions, Partition};

/// A random-access disk or partition. `read_at` fills the whole buffer or fails (reads past the
/// end fail).
pub trait Device: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl<D: Device + ?Sized> Device for Arc<D> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        (**self).read_at(buf, offset)
    }
}

/// Reads `buf.len()` bytes at `offset`, checking the range against the device size first so
/// that a range named by hostile metadata is `Corrupt`, and a failing device is `Io`.
pub(crate) fn read_exact(dev: &dyn Device, buf: &mut [u8], offset: u64) -> Result<()> {
    let end = offset
        .checked_add(buf.len() as u64)
        .ok_or_else(|| error::corrupt("byte range overflows"))?;
    if end > dev.size() {
        return Err(error::corrupt(format!(
            "range {offset}..{end} lies beyond the end of the device ({} bytes)",
            dev.size()
        )));
    }
    dev.read_at(buf, offset).map_err(|source| GuestFsError::Io {
        offset,
        len: buf.len(),
        source,
    })
}

/// A window `[start, start + len)` of another device: a partition.
pub struct Slice {
    dev: Arc<dyn Device>,
    start: u64,
    len: u64,
}

impl Slice {
    /// A view of `len` bytes at `start`; fails if the window does not fit the device.
    pub fn new(dev: Arc<dyn Device>, start: u64, len: u64) -> Result<Slice> {
        match start.checked_add(len) {
            Some(end) if end <= dev.size() => Ok(Slice { dev, start, len }),
            _ => Err(GuestFsError::Invalid(format!(
                "partition {start}+{len} does not fit a {}-byte disk",
                dev.size()
            ))),
        }
    }

    /// The view of one partition of `dev`.
    pub fn partition(dev: Arc<dyn Device>, part: &Partition) -> Result<Slice> {
        Slice::new(dev, part.start, part.len)
    }
}

impl Device for Slice {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= self.len => self.dev.read_at(buf, self.start + offset),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "read at {offset} past the end of a {}-byte partition",
                    self.len
                ),
            )),
        }
    }
}

/// A [`Device`] over a file or block device, read with `pread`.
pub struct FileDevice {
    file: File,
    size: u64,
}

impl FileDevice {
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<FileDevice> {
        let file = File::open(path)?;
        FileDevice::new(file)
    }

    /// Wraps an open file; its size is taken once (seeking to the end works for block devices
    /// too).
    pub fn new(file: File) -> std::io::Result<FileDevice> {
        use std::io::{Seek, SeekFrom};
        let mut f = &file;
        let size = f.seek(SeekFrom::End(0))?;
        Ok(FileDevice { file, size })
    }
}

impl Device for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => self.file.read_exact_at(buf, offset),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("read at {offset} past the end of a {}-byte file", self.size),
            )),
        }
    }
}

/// What kind of object an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

/// A point in time: seconds since the Unix epoch and nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// Attributes of one inode, as `stat` would show them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Device number of a character or block device, in Linux' `new_encode_dev` layout.
    pub rdev: u32,
    /// 512-byte units allocated.
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Option<Time>,
}

/// One directory entry (never `.` or `..`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
}

/// A read-only guest filesystem. All methods take `&self` and may be called from many threads.
pub trait Filesystem: Send + Sync {
    /// "ext2", "ext3", "ext4", "vfat" or "ntfs".
    fn kind(&self) -> &'static str;
    /// Inode number of the root directory.
    fn root(&self) -> u64;
    fn getattr(&self, ino: u64) -> Result<Attr>;
    /// The entry `name` of directory `parent`; `Ok(None)` when there is none.
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>>;
    /// All entries except `.` and `..`.
    fn readdir(&self, dir: u64) -> Result<Vec<DirEntry>>;
    /// Reads at `offset`; returns fewer bytes than `buf.len()` only at the end of the file.
    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize>;
    fn readlink(&self, ino: u64) -> Result<Vec<u8>>;

    /// Walks `path` ("/"-separated, relative to the root; empty components are ignored) with
    /// `lookup`, following no symlinks.
    fn resolve(&self, path: &[u8]) -> Result<Attr> {
        let mut attr = self.getattr(self.root())?;
        for comp in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            if attr.kind != Kind::Dir {
                return Err(GuestFsError::NotDir);
            }
            attr = self.lookup(attr.ino, comp)?.ok_or(GuestFsError::NotFound)?;
        }
        Ok(attr)
    }
}

/// Detects the filesystem on `dev` and opens it. `Ok(None)` when no supported filesystem is
/// recognised (or its superblock is unusable); `Err` only when the device itself fails.
pub fn open(dev: Arc<dyn Device>) -> Result<Option<Box<dyn Filesystem>>> {
    type Opener = fn(Arc<dyn Device>) -> Result<Option<Box<dyn Filesystem>>>;
    let openers: [(&str, Opener); 3] = [
        ("ntfs", |d| {
            Ok(ntfs::Ntfs::open(d)?.map(|f| Box::new(f) as Box<dyn Filesystem>))
        }),
        ("ext", |d| {
            Ok(ext::ExtFs::open(d)?.map(|f| Box::new(f) as Box<dyn Filesystem>))
        }),
        ("fat", |d| {
            Ok(fat::FatFs::open(d)?.map(|f| Box::new(f) as Box<dyn Filesystem>))
        }),
    ];
    for (name, opener) in openers {
        match opener(dev.clone()) {
            Ok(Some(fs)) => return Ok(Some(fs)),
            Ok(None) => {}
            Err(e) if e.is_io() => return Err(e),
            Err(e) => tracing::debug!("{name} signature found but not usable: {e}"),
        }
    }
    Ok(None)
}
