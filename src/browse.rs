//! Browsing backups down to the files inside the guest: backup → disk → partition → guest
//! filesystem. Shared by `holdfast mount` (FUSE), `holdfast cat` and `holdfast restore-files`.
//!
//! Invariants:
//! - Read-only. Every byte comes from the image reader, so every chunk is re-hashed; a damaged
//!   chunk is an I/O error for the reads that touch it (logged with the backup, the disk and the
//!   offset), never wrong bytes, and the rest of the backup stays readable.
//! - All readers of one `Browser` share one chunk cache and its prefetch threads.
//! - A disk's partition table and each partition's filesystem are read once, lazily, on first
//!   use. A disk without a partition table that holds a filesystem directly shows it as one
//!   pseudo-partition named `fs`. An unknown or unreadable filesystem is `None`: only its raw
//!   `.img` is offered.

use crate::error::What;
use crate::guestfs::{self, Device, Filesystem, Kind};
use crate::image::{Chunks, ImageReader};
use crate::repo::{DiskEntry, Manifest, Repo};
use crate::{Error, Result};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

/// The name of the pseudo-partition of a disk that is one filesystem without a table.
pub const WHOLE_DISK: &str = "fs";

pub struct Browser {
    chunks: Arc<Chunks>,
    /// Log damaged reads (a mount: nobody else sees the error text); commands report instead.
    log_damage: bool,
    disks: Mutex<HashMap<(String, String, String), Arc<DiskView>>>,
}

impl Browser {
    /// `cache_chunks` decoded chunks are kept for all disks together (64 KiB on average each).
    pub fn new(repo: Arc<Repo>, cache_chunks: usize, log_damage: bool) -> Browser {
        Browser {
            chunks: Chunks::new(repo, cache_chunks),
            log_damage,
            disks: Mutex::new(HashMap::new()),
        }
    }

    pub fn repo(&self) -> &Arc<Repo> {
        self.chunks.repo()
    }

    /// The view of one disk of one backup (opened once, then shared).
    pub fn disk(&self, m: &Manifest, disk: &DiskEntry) -> Result<Arc<DiskView>> {
        let key = (m.vm.clone(), m.id.clone(), disk.name.clone());
        if let Some(d) = lock(&self.disks).get(&key) {
            return Ok(d.clone());
        }
        let reader = Arc::new(ImageReader::with_chunks(self.chunks.clone(), disk)?);
        let label = format!("{}@{} disk {}", m.vm, m.id, disk.name);
        let dev: Arc<dyn Device> = Arc::new(ImageDevice {
            reader: reader.clone(),
            label: label.clone(),
            log: self.log_damage,
        });
        let view = Arc::new(DiskView {
            label,
            reader,
            dev,
            parts: Mutex::new(None),
        });
        Ok(lock(&self.disks).entry(key).or_insert(view).clone())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    crate::sys::lock(m)
}

/// A backed-up disk as a guest `Device`. A failed read (a damaged chunk) is logged with where
/// it happened and returned as an I/O error.
struct ImageDevice {
    reader: Arc<ImageReader>,
    label: String,
    log: bool,
}

impl Device for ImageDevice {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.reader.read_at(buf, offset) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read at {offset} past the end of {}", self.label),
            )),
            Err(e) => {
                if self.log {
                    tracing::error!(
                        "{}: cannot read {} bytes at disk offset {offset}: {e}",
                        self.label,
                        buf.len()
                    );
                }
                Err(e.to_io())
            }
        }
    }
}

pub struct DiskView {
    /// `VM@ID disk NAME`, for messages.
    pub label: String,
    pub reader: Arc<ImageReader>,
    dev: Arc<dyn Device>,
    /// Read once; a failed read is not kept (the next access tries again).
    parts: Mutex<Option<Vec<Arc<PartView>>>>,
}

impl DiskView {
    pub fn size(&self) -> u64 {
        self.reader.size()
    }

    /// Read the raw disk (short only at its end).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.reader.read_at(buf, offset)
    }

    /// The partitions (GPT or MBR), or the whole disk as `fs` when it is one filesystem, or
    /// nothing. A table that cannot be read is logged and shows as no partitions (this time).
    pub fn parts(&self) -> Vec<Arc<PartView>> {
        let mut g = lock(&self.parts);
        if let Some(p) = g.as_ref() {
            return p.clone();
        }
        let found = match guestfs::partitions(self.dev.as_ref()) {
            Ok(ps) if !ps.is_empty() => ps
                .iter()
                // Extended partitions are containers of the logical ones, not volumes.
                .filter(|p| !matches!(p.kind.as_str(), "0x05" | "0x0f" | "0x85"))
                .filter_map(|p| match guestfs::Slice::partition(self.dev.clone(), p) {
                    Ok(s) => Some(Arc::new(PartView::new(
                        format!("p{}", p.number),
                        p.start,
                        p.len,
                        false,
                        Arc::new(s),
                        &self.label,
                    ))),
                    Err(e) => {
                        tracing::warn!("{}: partition {} skipped: {e}", self.label, p.number);
                        None
                    }
                })
                .collect(),
            Ok(_) => {
                let whole = PartView::new(
                    WHOLE_DISK.into(),
                    0,
                    self.size(),
                    true,
                    self.dev.clone(),
                    &self.label,
                );
                match whole.try_fs() {
                    Ok(Some(_)) => vec![Arc::new(whole)],
                    Ok(None) => Vec::new(),
                    Err(_) => return Vec::new(),
                }
            }
            Err(e) => {
                tracing::warn!("{}: partition table unreadable: {e}", self.label);
                if e.is_io() {
                    return Vec::new(); // the device failed: try again on the next access
                }
                Vec::new() // a damaged table: remembered as none
            }
        };
        *g = Some(found.clone());
        found
    }

    pub fn part(&self, name: &str) -> Option<Arc<PartView>> {
        self.parts().into_iter().find(|p| p.name == name)
    }
}

pub struct PartView {
    /// `p1`, `p2`, … or `fs` for a whole-disk filesystem.
    pub name: String,
    pub start: u64,
    pub len: u64,
    /// The whole disk (no `.img` of its own: it is the disk's).
    pub whole: bool,
    dev: Arc<dyn Device>,
    label: String,
    /// Opened once; a device error is not kept (the next access tries again).
    fs: Mutex<Option<Option<Arc<dyn Filesystem>>>>,
}

impl PartView {
    fn new(
        name: String,
        start: u64,
        len: u64,
        whole: bool,
        dev: Arc<dyn Device>,
        disk_label: &str,
    ) -> PartView {
        let label = format!("{disk_label} partition {name}");
        PartView {
            name,
            start,
            len,
            whole,
            dev,
            label,
            fs: Mutex::new(None),
        }
    }

    /// The guest filesystem, when holdfast can read it.
    pub fn fs(&self) -> Option<Arc<dyn Filesystem>> {
        self.try_fs().unwrap_or(None)
    }

    /// Ok(None): no filesystem holdfast reads; Err: the device failed (not remembered).
    fn try_fs(&self) -> std::result::Result<Option<Arc<dyn Filesystem>>, guestfs::GuestFsError> {
        let mut g = lock(&self.fs);
        if let Some(f) = g.as_ref() {
            return Ok(f.clone());
        }
        let f: Option<Arc<dyn Filesystem>> = match guestfs::open(self.dev.clone()) {
            Ok(f) => f.map(Arc::from),
            Err(e) => {
                tracing::warn!("{}: filesystem unreadable: {e}", self.label);
                return Err(e);
            }
        };
        *g = Some(f.clone());
        Ok(f)
    }

    /// Read the raw partition (short only at its end).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        self.dev.read_at(&mut buf[..n], offset)?;
        Ok(n)
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

/// `VM[@ID]:DISK/PART/PATH`, parsed.
#[derive(Debug, PartialEq)]
pub struct FileSpec {
    /// `VM` or `VM@ID`.
    pub backup: String,
    pub disk: String,
    pub part: String,
    /// Inside the filesystem, without a leading `/`; empty for its root.
    pub path: String,
}

impl FileSpec {
    pub fn parse(s: &str) -> Result<FileSpec> {
        let example = "e.g. web-01@20261122-101500:root/p2/etc/fstab, or web-01:root/p2/etc for the newest backup";
        let (backup, rest) = s.split_once(':').ok_or_else(|| {
            Error::usage(format!("{s:?} must be VM[@ID]:DISK/PART/PATH; {example}"))
        })?;
        let mut it = rest.trim_start_matches('/').splitn(3, '/');
        let disk = it.next().unwrap_or_default();
        let part = it.next().unwrap_or_default();
        if backup.is_empty() || disk.is_empty() || part.is_empty() {
            return Err(Error::usage(format!(
                "{s:?} must name a backup, a disk and a partition: VM[@ID]:DISK/PART/PATH; \
                 {example}"
            )));
        }
        let path = it.next().unwrap_or_default().trim_matches('/').to_string();
        Ok(FileSpec {
            backup: backup.into(),
            disk: disk.into(),
            part: part.into(),
            path,
        })
    }
}

/// What a `FileSpec` points at.
pub struct Located {
    pub manifest: Manifest,
    pub disk: Arc<DiskView>,
    pub part: Arc<PartView>,
    pub fs: Arc<dyn Filesystem>,
    pub attr: guestfs::Attr,
}

/// Resolve `spec` to a file or directory inside a guest filesystem; with `follow`, a final
/// symlink is followed (inside the same filesystem, at most 40 times).
pub fn locate(b: &Browser, spec: &FileSpec, follow: bool) -> Result<Located> {
    let repo = b.repo();
    let manifest = repo.resolve(&spec.backup)?;
    let entry = manifest
        .disks
        .iter()
        .find(|d| d.name == spec.disk)
        .ok_or_else(|| {
            let names: Vec<&str> = manifest.disks.iter().map(|d| d.name.as_str()).collect();
            Error::not_found(
                What::Disk,
                spec.disk.clone(),
                format!(
                    "backup {}@{} has no disk {:?}; its disks: {}",
                    manifest.vm,
                    manifest.id,
                    spec.disk,
                    names.join(", ")
                ),
            )
        })?;
    let disk = b.disk(&manifest, entry)?;
    let part = disk.part(&spec.part).ok_or_else(|| {
        let names: Vec<String> = disk.parts().iter().map(|p| p.name.clone()).collect();
        let have = if names.is_empty() {
            "none holdfast can read".to_string()
        } else {
            names.join(", ")
        };
        Error::not_found(
            What::Disk,
            spec.part.clone(),
            format!(
                "{} has no partition {:?}; its partitions: {have}",
                disk.label, spec.part
            ),
        )
    })?;
    let fs = part.fs().ok_or_else(|| {
        Error::Unsupported(format!(
            "{} holds no filesystem holdfast can read (ext2/3/4, FAT, NTFS); restore it raw with \
             holdfast restore",
            part.label
        ))
    })?;
    let attr = resolve(fs.as_ref(), &spec.path, follow).map_err(|e| match e {
        Walk::Guest(e) => guest_error(&part, &spec.path, e),
        Walk::Loop => Error::Guest {
            part: part.label().to_string(),
            path: format!("/{}", spec.path),
            source: guestfs::GuestFsError::TooLarge("too many levels of symbolic links".into()),
        },
    })?;
    Ok(Located {
        manifest,
        disk,
        part,
        fs,
        attr,
    })
}

enum Walk {
    Guest(guestfs::GuestFsError),
    Loop,
}

/// Walk `path` from the filesystem's root, following the symlinks met on the way (and a final
/// one when `follow`) inside this filesystem: an absolute target starts again at its root, and
/// `..` never leaves it. At most 40 links.
fn resolve(
    fs: &dyn Filesystem,
    path: &str,
    follow: bool,
) -> std::result::Result<guestfs::Attr, Walk> {
    let mut todo: std::collections::VecDeque<Vec<u8>> =
        path.split('/').map(|c| c.as_bytes().to_vec()).collect();
    let mut stack = vec![fs.getattr(fs.root()).map_err(Walk::Guest)?];
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_slice() {
            b"" | b"." => continue,
            b".." => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            _ => {}
        }
        let cur = stack
            .last()
            .map(|a| (a.ino, a.kind))
            .unwrap_or((fs.root(), Kind::Dir));
        if cur.1 != Kind::Dir {
            return Err(Walk::Guest(guestfs::GuestFsError::NotDir));
        }
        let a = fs
            .lookup(cur.0, &c)
            .map_err(Walk::Guest)?
            .ok_or(Walk::Guest(guestfs::GuestFsError::NotFound))?;
        if a.kind == Kind::Symlink && (follow || !todo.is_empty()) {
            links += 1;
            if links > 40 {
                return Err(Walk::Loop);
            }
            let target = fs.readlink(a.ino).map_err(Walk::Guest)?;
            if target.first() == Some(&b'/') {
                stack.truncate(1);
            }
            for part in target.split(|&b| b == b'/').rev() {
                todo.push_front(part.to_vec());
            }
            continue;
        }
        stack.push(a);
    }
    stack
        .pop()
        .ok_or(Walk::Guest(guestfs::GuestFsError::NotFound))
}

/// A guest filesystem error as a holdfast error naming the partition and path (a device read
/// that failed is damage: exit 3).
pub fn guest_error(part: &PartView, path: &str, e: guestfs::GuestFsError) -> Error {
    use guestfs::GuestFsError as G;
    let shown = if path.is_empty() {
        "/".to_string()
    } else {
        format!("/{path}")
    };
    match e {
        G::NotFound => Error::not_found(
            What::File,
            shown.clone(),
            format!("{}: no {shown} in its filesystem", part.label()),
        ),
        source => Error::Guest {
            part: part.label().to_string(),
            path: shown,
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_specs() {
        let f = FileSpec::parse("web-01@2026:root/p2/etc/fstab").unwrap();
        assert_eq!(
            f,
            FileSpec {
                backup: "web-01@2026".into(),
                disk: "root".into(),
                part: "p2".into(),
                path: "etc/fstab".into()
            }
        );
        assert_eq!(FileSpec::parse("vm:root/p1").unwrap().path, "");
        assert_eq!(FileSpec::parse("vm:root/p1/").unwrap().path, "");
        for bad in ["vm", "vm:", "vm:root", ":root/p1/x", "vm:/p1"] {
            assert!(FileSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
