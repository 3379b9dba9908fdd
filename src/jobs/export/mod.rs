//! A backed-up disk as an NBD export, read-only or with a local write overlay.
//!
//! Invariants: the store is never written. Reads of blocks nobody wrote come from the backup
//! (every chunk re-hashed); blocks written through a `--writable` export live in the overlay:
//! a sparse file the size of the disk plus a bitmap of 4 KiB blocks. A partial-block write first
//! copies the block's current bytes into the overlay (read-modify-write), so a block is either
//! wholly from the backup or wholly from the overlay. The overlay is discarded on exit unless
//! kept (`PATH` + `PATH.map`, the bitmap as little-endian u64 words).

mod serve;

pub use serve::{serve, ExportConfig, ExportReport, Listen};

use crate::image::{ImageReader, Part};
use crate::nbd::{proto, Export, ReadPart};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

pub const BLOCK: u64 = 4096;

fn to_io(e: crate::Error) -> io::Error {
    e.to_io()
}

pub struct Overlay {
    file: File,
    path: PathBuf,
    keep: bool,
    bits: RwLock<Vec<u64>>,
    /// Serializes read-modify-write of partial blocks.
    rmw: Mutex<()>,
}

impl Overlay {
    /// A new overlay file at `path` for a disk of `size` bytes (created; must not exist).
    pub fn create(path: &Path, size: u64, keep: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(size)?;
        let words = size.div_ceil(BLOCK).div_ceil(64) as usize;
        Ok(Overlay {
            file,
            path: path.into(),
            keep,
            bits: RwLock::new(vec![0; words]),
            rmw: Mutex::new(()),
        })
    }

    fn has(&self, block: u64) -> bool {
        let b = crate::sys::read(&self.bits);
        b.get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    fn mark(&self, block: u64) {
        let mut b = crate::sys::write(&self.bits);
        if let Some(w) = b.get_mut((block / 64) as usize) {
            *w |= 1 << (block % 64);
        }
    }

    /// Write the bitmap beside the data file (for `--keep-overlay`).
    pub fn save_map(&self) -> io::Result<PathBuf> {
        let b = crate::sys::read(&self.bits);
        let bytes: Vec<u8> = b.iter().flat_map(|w| w.to_le_bytes()).collect();
        let map = PathBuf::from(format!("{}.map", self.path.display()));
        std::fs::write(&map, bytes)?;
        self.file.sync_all()?;
        Ok(map)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.keep {
            let _ = self.save_map();
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub struct BackupExport {
    reader: ImageReader,
    overlay: Option<Overlay>,
}

impl BackupExport {
    pub fn new(reader: ImageReader, overlay: Option<Overlay>) -> Self {
        BackupExport { reader, overlay }
    }

    fn base_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reader.read_at(buf, offset).map(|_| ()).map_err(to_io)
    }

    /// Write whole or partial blocks into the overlay.
    fn overlay_write(
        &self,
        o: &Overlay,
        data: Option<&[u8]>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let _g = crate::sys::lock(&o.rmw);
        let mut pos = offset;
        let end = offset + len;
        let mut block = vec![0u8; BLOCK as usize];
        while pos < end {
            let b = pos / BLOCK;
            let bstart = b * BLOCK;
            let bend = (bstart + BLOCK).min(self.reader.size());
            let (a, z) = (pos, end.min(bend));
            let src = |buf: &mut [u8]| match data {
                Some(d) => buf.copy_from_slice(&d[(a - offset) as usize..(z - offset) as usize]),
                None => buf.fill(0),
            };
            if a == bstart && z == bend {
                let buf = &mut block[..(bend - bstart) as usize];
                src(buf);
                o.file.write_all_at(buf, bstart)?;
            } else {
                let buf = &mut block[..(bend - bstart) as usize];
                if o.has(b) {
                    o.file.read_exact_at(buf, bstart)?;
                } else {
                    self.base_read(buf, bstart)?;
                }
                src(&mut buf[(a - bstart) as usize..(z - bstart) as usize]);
                o.file.write_all_at(buf, bstart)?;
            }
            o.mark(b);
            pos = z;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(e) if e <= self.reader.size() => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn writable(&self) -> io::Result<&Overlay> {
        self.overlay
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EPERM))
    }
}

impl Export for BackupExport {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let Some(o) = &self.overlay else {
            return self.base_read(buf, offset);
        };
        // Runs of blocks from the same side.
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let from_overlay = o.has(pos / BLOCK);
            let mut end = pos;
            while end < offset + buf.len() as u64 && o.has(end / BLOCK) == from_overlay {
                end = (end / BLOCK + 1) * BLOCK;
            }
            let end = end.min(offset + buf.len() as u64);
            let part = &mut buf[done..(end - offset) as usize];
            if from_overlay {
                o.file.read_exact_at(part, pos)?;
            } else {
                self.base_read(part, pos)?;
            }
            done = (end - offset) as usize;
        }
        Ok(())
    }

    fn read_parts(&self, offset: u64, len: u32) -> io::Result<Vec<ReadPart>> {
        self.check_range(offset, u64::from(len))?;
        if self.overlay.is_some() {
            let mut buf = vec![0u8; len as usize];
            self.read_at(&mut buf, offset)?;
            return Ok(vec![ReadPart::Owned(buf)]);
        }
        // Decoded chunks go out as they sit in the cache: no copy.
        let parts = self
            .reader
            .read_parts(offset, len as usize)
            .map_err(to_io)?;
        Ok(shared(parts))
    }

    fn read_parts_now(&self, offset: u64, len: u32) -> Option<io::Result<Vec<ReadPart>>> {
        if self.overlay.is_some() {
            return None;
        }
        if let Err(e) = self.check_range(offset, u64::from(len)) {
            return Some(Err(e));
        }
        Some(
            self.reader
                .read_parts_now(offset, len as usize)?
                .map(shared)
                .map_err(to_io),
        )
    }

    fn block_status_now(&self, offset: u64, len: u32) -> Option<io::Result<Vec<(u32, u32)>>> {
        if self.overlay.is_some() {
            return None;
        }
        let end = offset
            .saturating_add(u64::from(len))
            .min(self.reader.size());
        let runs = self
            .reader
            .allocation_now(offset, end.saturating_sub(offset))?;
        Some(runs.map(|runs| self.extents(offset, runs)).map_err(to_io))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let o = self.writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.overlay_write(o, Some(buf), offset, buf.len() as u64)
    }

    fn flush(&self) -> io::Result<()> {
        match &self.overlay {
            Some(o) => o.file.sync_data(),
            None => Ok(()),
        }
    }

    fn trim(&self, offset: u64, len: u32) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u32, _may_trim: bool) -> io::Result<()> {
        let o = self.writable()?;
        self.check_range(offset, u64::from(len))?;
        self.overlay_write(o, None, offset, u64::from(len))
    }

    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<(u32, u32)>> {
        let end = offset
            .saturating_add(u64::from(len))
            .min(self.reader.size());
        let runs = self
            .reader
            .allocation(offset, end.saturating_sub(offset))
            .map_err(to_io)?;
        Ok(self.extents(offset, runs))
    }
}

/// Parts of the image reader as NBD read parts: shared, not copied.
fn shared(parts: Vec<Part>) -> Vec<ReadPart> {
    parts
        .into_iter()
        .map(|p| match p {
            Part::Chunk(c, r) => ReadPart::Shared(c, r),
            Part::Zeros(n) => ReadPart::Zeros(n),
        })
        .collect()
}

impl BackupExport {
    /// `base:allocation` extents from the backup's `(length, is_hole)` runs at `offset`; blocks
    /// written to the overlay are data whatever the backup says.
    fn extents(&self, offset: u64, runs: Vec<(u64, bool)>) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        let push = |out: &mut Vec<(u32, u32)>, l: u64, flags: u32| match out.last_mut() {
            Some((ol, of)) if *of == flags => *ol += l as u32,
            _ => out.push((l as u32, flags)),
        };
        for (l, hole) in runs {
            if !hole || self.overlay.is_none() {
                push(
                    &mut out,
                    l,
                    if hole {
                        proto::STATE_HOLE | proto::STATE_ZERO
                    } else {
                        0
                    },
                );
                pos += l;
                continue;
            }
            let mut at = pos;
            while at < pos + l {
                let bend = ((at / BLOCK + 1) * BLOCK).min(pos + l);
                let data = self.overlay.as_ref().is_some_and(|o| o.has(at / BLOCK));
                push(
                    &mut out,
                    bend - at,
                    if data {
                        0
                    } else {
                        proto::STATE_HOLE | proto::STATE_ZERO
                    },
                );
                at = bend;
            }
            pos += l;
        }
        out
    }
}
