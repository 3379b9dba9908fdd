//! What a backup reads: a disk's size, its allocated extents, and `read_at`.
//!
//! `FileSource` reads raw images and block devices. Allocated extents come from
//! SEEK_DATA/SEEK_HOLE; unallocated ranges read as zeros and are never read at all.

pub mod nbd;

pub use self::nbd::NbdSource;

use bytes::BytesMut;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("cannot open disk image {path}: {source}; check the path and permissions")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a regular file or block device; pass a raw disk image or a block device"
    )]
    NotADisk { path: String },
    #[error("read error on {path} at offset {offset}: {source}")]
    Read {
        path: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD source {uri}: {msg}")]
    Nbd { uri: String, msg: String },
    #[error("{path} changed size during the backup (was {was}, now shorter); back up from a stable read point")]
    Shrunk { path: String, was: u64 },
}

/// A byte range `[start, end)`.
pub type Extent = (u64, u64);

/// A disk to back up.
pub trait Source: Send + Sync {
    fn size(&self) -> u64;
    /// Allocated ranges, sorted and disjoint. Everything else reads as zeros.
    fn extents(&self) -> Result<Vec<Extent>, SourceError>;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError>;
    /// The size now, where it can change while it is read (a file, a block device); None
    /// where it cannot (an NBD export's size is fixed at the handshake).
    fn size_now(&self) -> Option<u64> {
        None
    }
    /// Run read jobs (a backup's segments) until `next` has no more, handing each filled job
    /// to `done` (false from `done` stops). A network source keeps several jobs in flight and
    /// finishes them in any order; the default reads them one by one in this thread.
    fn read_jobs(
        &self,
        next: &mut dyn FnMut() -> Option<ReadJob>,
        done: &mut dyn FnMut(Result<ReadJob, SourceError>) -> bool,
    ) {
        while let Some(mut job) = next() {
            let ReadJob {
                offset,
                ref mut buf,
                ref ranges,
                ..
            } = job;
            let r = ranges
                .iter()
                .try_for_each(|&(a, b)| match buf.get_mut(a..b) {
                    Some(part) => self.read_at(part, offset + a as u64),
                    None => Err(SourceError::Read {
                        path: self.describe(),
                        offset,
                        source: std::io::Error::other("read job range outside its buffer"),
                    }),
                });
            if !done(r.map(|_| job)) {
                return;
            }
        }
    }
    fn describe(&self) -> String;
    /// Changed ranges since the bitmap's checkpoint, when the source tracks them.
    fn dirty(&self) -> Result<Option<Vec<Extent>>, SourceError> {
        Ok(None)
    }
    /// The name of the dirty bitmap `dirty` reads, if any.
    fn bitmap(&self) -> Option<String> {
        None
    }
}

/// Fill `ranges` of `buf` (sorted, disjoint, relative to `buf`, whose first byte is at
/// `offset` on the disk) from the source; the rest of `buf` is left as it is. `tag` is the
/// caller's (a segment number).
pub struct ReadJob {
    pub tag: u64,
    pub offset: u64,
    pub buf: BytesMut,
    pub ranges: Vec<(usize, usize)>,
}

/// True for `nbd://…`, `nbd+unix://…` and the other libnbd URI schemes.
pub fn is_nbd_uri(s: &str) -> bool {
    s.starts_with("nbd://")
        || s.starts_with("nbd+unix://")
        || s.starts_with("nbds://")
        || s.starts_with("nbds+unix://")
}

/// The source a disk argument names: an NBD export for an NBD URI (reading the dirty bitmap
/// `bitmap`, when given), else a raw image file or block device.
pub fn open(spec: &str, bitmap: Option<&str>) -> Result<Box<dyn Source>, SourceError> {
    if is_nbd_uri(spec) {
        Ok(Box::new(NbdSource::connect(spec, bitmap)?))
    } else {
        Ok(Box::new(FileSource::open(Path::new(spec))?))
    }
}

pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
    is_block: bool,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let p = path.display().to_string();
        let open_err = |source| SourceError::Open {
            path: p.clone(),
            source,
        };
        // Look before opening: opening a FIFO for reading blocks until a writer comes (and a
        // character device may have side effects). Only regular files and block devices.
        let ft = std::fs::metadata(path).map_err(open_err)?.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(SourceError::NotADisk { path: p });
        }
        // Non-blocking, so a path swapped for a FIFO between the look and the open cannot hang.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let ft = meta.file_type();
        let is_block = ft.is_block_device();
        if !ft.is_file() && !is_block {
            return Err(SourceError::NotADisk { path: p });
        }
        let size = if is_block {
            // SAFETY: lseek on a valid fd.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(SourceError::Open {
                    path: p,
                    source: std::io::Error::last_os_error(),
                });
            }
            end as u64
        } else {
            meta.len()
        };
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            size,
            is_block,
        })
    }

    fn seek(&self, offset: u64, whence: i32) -> Option<u64> {
        // SAFETY: lseek on a valid fd; errors are reported through the return value.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
    }
}

impl Source for FileSource {
    fn size_now(&self) -> Option<u64> {
        if self.is_block {
            self.seek(0, libc::SEEK_END)
        } else {
            self.file.metadata().ok().map(|m| m.len())
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&self) -> Result<Vec<Extent>, SourceError> {
        if self.is_block || self.size == 0 {
            return Ok(if self.size == 0 {
                vec![]
            } else {
                vec![(0, self.size)]
            });
        }
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let Some(start) = self.seek(pos, libc::SEEK_DATA) else {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after pos
                }
                return Ok(vec![(0, self.size)]); // no SEEK_DATA support: read everything
            };
            let end = self
                .seek(start, libc::SEEK_HOLE)
                .unwrap_or(self.size)
                .min(self.size);
            if end <= start {
                break;
            }
            out.push((start, end));
            pos = end;
        }
        Ok(out)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        self.file.read_exact_at(buf, offset).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                SourceError::Shrunk {
                    path: self.path.display().to_string(),
                    was: self.size,
                }
            } else {
                SourceError::Read {
                    path: self.path.display().to_string(),
                    offset,
                    source,
                }
            }
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_extents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let s = FileSource::open(&p).unwrap();
        assert_eq!(s.size(), 64 << 20);
        let ex = s.extents().unwrap();
        let total: u64 = ex.iter().map(|(a, b)| b - a).sum();
        assert!(
            ex.iter().all(|&(a, b)| a <= 8 << 20 && b >= 9 << 20),
            "{ex:?}"
        );
        assert!(total < 4 << 20, "{ex:?}");
        assert!(matches!(
            FileSource::open(d.path()),
            Err(SourceError::NotADisk { .. })
        ));
        assert!(matches!(
            FileSource::open(&d.path().join("nope")),
            Err(SourceError::Open { .. })
        ));
    }
}
