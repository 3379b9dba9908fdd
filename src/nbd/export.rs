//! The storage side of the server: the blocking [`Export`] trait and a
//! raw-file implementation, [`FileExport`].
//!
//! Invariants:
//! - The server validates every request (bounds, permissions, caps) before
//!   calling an `Export` method, so implementations may assume
//!   `offset + len <= size()` and that writes only reach writable exports.
//! - Methods are blocking; the server runs them on `spawn_blocking`, and
//!   calls them concurrently from many tasks (hence `Sync`).
//! - `block_status` returns consecutive `(len, flags)` extents starting at
//!   `offset`, each `len > 0`, covering at most `len` bytes (the server
//!   trims and caps the list anyway).
//! - `read_parts` returns parts whose lengths add up to exactly `len`.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use super::proto::{STATE_HOLE, STATE_ZERO};

/// A block device the server can export. Blocking methods.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// True if flushes are visible across connections (NBD_FLAG_CAN_MULTI_CONN).
    fn can_multi_conn(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `[offset, offset + len)` as parts the server sends as they are: an export that already
    /// holds the bytes in memory hands out shared buffers instead of copying them. The default
    /// reads into one new buffer.
    fn read_parts(&self, offset: u64, len: u32) -> io::Result<Vec<ReadPart>> {
        let mut buf = vec![0u8; len as usize];
        self.read_at(&mut buf, offset)?;
        Ok(vec![ReadPart::Owned(buf)])
    }
    /// [`Export::read_parts`] if it can be answered from memory at once, without I/O or
    /// waiting: the server then answers on its own thread instead of the blocking pool.
    /// `None` means "ask `read_parts`". Must not block.
    fn read_parts_now(&self, _offset: u64, _len: u32) -> Option<io::Result<Vec<ReadPart>>> {
        None
    }
    /// [`Export::block_status`] if it can be answered from memory at once; must not block.
    fn block_status_now(&self, _offset: u64, _len: u32) -> Option<io::Result<Vec<(u32, u32)>>> {
        None
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// Advisory discard; may do nothing.
    fn trim(&self, offset: u64, len: u32) -> io::Result<()>;
    /// Make the range read as zeroes; `may_trim` allows punching a hole.
    fn write_zeroes(&self, offset: u64, len: u32, may_trim: bool) -> io::Result<()>;
    /// `base:allocation` extents: `(len, flags)` with STATE_HOLE / STATE_ZERO.
    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<(u32, u32)>>;
}

/// A piece of read data.
#[derive(Debug, Clone)]
pub enum ReadPart {
    /// A range of a buffer the export shares (e.g. a decoded chunk in its cache).
    Shared(Arc<Vec<u8>>, Range<usize>),
    Owned(Vec<u8>),
    Zeros(usize),
}

impl ReadPart {
    pub fn len(&self) -> usize {
        match self {
            ReadPart::Shared(_, r) => r.len(),
            ReadPart::Owned(v) => v.len(),
            ReadPart::Zeros(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, as slices (zeros come from a static buffer, so a long run is several).
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let (one, zeros): (Option<&[u8]>, usize) = match self {
            ReadPart::Shared(b, r) => (b.get(r.clone()), 0),
            ReadPart::Owned(v) => (Some(v), 0),
            ReadPart::Zeros(n) => (None, *n),
        };
        let runs = zeros.div_ceil(ZEROS.len());
        one.into_iter()
            .chain((0..runs).map(move |i| &ZEROS[..(zeros - i * ZEROS.len()).min(ZEROS.len())]))
    }
}

/// Most extents one `block_status` call of [`FileExport`] returns.
const MAX_EXTENTS: usize = 1024;

/// A raw image file. Holes come from SEEK_DATA / SEEK_HOLE.
#[derive(Debug)]
pub struct FileExport {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileExport {
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(FileExport {
            file,
            size,
            read_only,
        })
    }

    /// `lseek(SEEK_DATA|SEEK_HOLE)`; `None` when there is no such position (ENXIO).
    fn seek(&self, pos: u64, whence: i32) -> io::Result<Option<u64>> {
        let off = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
        let r = unsafe { sys::lseek64(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(sys::ENXIO) => Ok(None),
                _ => Err(err),
            };
        }
        Ok(u64::try_from(r).ok())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u32) -> io::Result<()> {
        let off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
        let r = unsafe { sys::fallocate64(self.file.as_raw_fd(), mode, off, i64::from(len)) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Next extent at `pos` (bounded by `end`): (length, flags).
    fn extent_at(&self, pos: u64, end: u64) -> io::Result<(u64, u32)> {
        let hole = STATE_HOLE | STATE_ZERO;
        match self.seek(pos, sys::SEEK_DATA)? {
            None => Ok((end - pos, hole)),
            Some(d) if d > pos => Ok((d.min(end) - pos, hole)),
            Some(_) => {
                let h = self.seek(pos, sys::SEEK_HOLE)?.unwrap_or(end);
                Ok((h.clamp(pos, end) - pos, 0))
            }
        }
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn trim(&self, offset: u64, len: u32) -> io::Result<()> {
        match self.fallocate(sys::PUNCH_HOLE, offset, len) {
            Err(e) if e.raw_os_error() == Some(sys::EOPNOTSUPP) => Ok(()),
            other => other,
        }
    }
    fn write_zeroes(&self, offset: u64, len: u32, may_trim: bool) -> io::Result<()> {
        let mode = if may_trim {
            sys::PUNCH_HOLE
        } else {
            sys::ZERO_RANGE
        };
        if self.fallocate(mode, offset, len).is_ok() {
            return Ok(());
        }
        let zeroes = vec![0u8; (len as usize).min(1 << 20)];
        let end = offset.saturating_add(len.into());
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64) as usize;
            self.file
                .write_all_at(zeroes.get(..n).unwrap_or_default(), pos)?;
            pos += n as u64;
        }
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<(u32, u32)>> {
        let end = offset.saturating_add(len.into()).min(self.size);
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let (n, flags) = match self.extent_at(pos, end)? {
                (0, _) => (end - pos, 0), // defensive: never loop forever
                e => e,
            };
            // n <= len, which is a u32.
            let n32 = u32::try_from(n).unwrap_or(u32::MAX);
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 = last.0.saturating_add(n32),
                _ => out.push((n32, flags)),
            }
            pos = pos.saturating_add(u64::from(n32));
        }
        Ok(out)
    }
}

/// The Linux calls and flags the file export needs, from `libc`.
mod sys {
    pub use libc::{fallocate64, lseek64, ENXIO, EOPNOTSUPP, SEEK_DATA, SEEK_HOLE};
    /// FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
    /// FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE
    pub const ZERO_RANGE: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_ZERO_RANGE;
}
