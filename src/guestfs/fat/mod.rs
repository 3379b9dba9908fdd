//! FAT12, FAT16 and FAT32 with VFAT long names, read-only.
//!
//! Inode numbers: the root is 1; every other file or directory is numbered by the device
//! offset of its short directory entry divided by 32 (entries are 32-byte aligned and lie past
//! the boot sector, so numbers are ≥ 16 and unique). `getattr` re-reads that entry, so any
//! number handed out stays valid without a table. FAT has no hard links, symlinks or owners:
//! uid/gid are 0, directories 0755 and files 0644 (0555/0444 when read-only), `nlink` is 1
//! for files and 2 for directories, and times are taken as UTC.
//!
//! Invariants: cluster chains are followed at most as many steps as the volume has clusters
//! (so cycles end), directories are read up to [`MAX_DIR_BYTES`] (the 65,536-entry limit of
//! the format), and file cluster runs are cached per file in a bounded LRU.

mod dir;

use std::collections::HashMap;
use std::sync::Arc;

use self::dir::{Entry, Short};
use super::bytes::{fold, le16, le32, u8_at};
use super::cache::{ChunkCache, Lru};
use super::error::{corrupt, GuestFsError, Result};
use super::{Attr, Device, DirEntry, Filesystem, Kind, Time};

/// Largest directory read: 65,536 entries of 32 bytes.
pub const MAX_DIR_BYTES: u64 = 65_536 * 32;
const ROOT: u64 = 1;

/// Volume geometry from the boot sector, all in bytes except cluster numbers.
#[derive(Clone, Debug)]
struct Geometry {
    bits: u32,
    cluster_size: u64,
    fat_offset: u64,
    root_offset: u64,
    root_bytes: u64,
    data_offset: u64,
    clusters: u32,
    root_cluster: u32,
}

/// Parses a FAT boot sector; `Ok(None)` when it is not one.
fn parse_boot(b: &[u8]) -> Result<Option<Geometry>> {
    if !matches!(u8_at(b, 0)?, 0xeb | 0xe9) || b.get(510..512) != Some(&[0x55, 0xaa][..]) {
        return Ok(None);
    }
    let bps = le16(b, 11)? as u64;
    let spc = u8_at(b, 13)? as u64;
    let reserved = le16(b, 14)? as u64;
    let nfats = u8_at(b, 16)? as u64;
    let root_entries = le16(b, 17)? as u64;
    let total = match le16(b, 19)? {
        0 => le32(b, 32)? as u64,
        n => n as u64,
    };
    let fat_sectors = match le16(b, 22)? {
        0 => le32(b, 36)? as u64,
        n => n as u64,
    };
    if !matches!(bps, 512 | 1024 | 2048 | 4096)
        || !spc.is_power_of_two()
        || reserved == 0
        || !(1..=4).contains(&nfats)
        || fat_sectors == 0
    {
        return Ok(None);
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let data_start = reserved + nfats * fat_sectors + root_sectors;
    if data_start >= total {
        return Ok(None);
    }
    let clusters = (total - data_start) / spc;
    let bits = match clusters {
        0..4085 => 12,
        4085..65525 => 16,
        _ => 32,
    };
    if bits == 32 && (root_entries != 0 || le16(b, 22)? != 0) || clusters > 0x0fff_fff5 {
        return Err(corrupt("FAT32 boot sector fields disagree"));
    }
    let fat_entries = fat_sectors * bps * 8 / bits;
    if fat_entries < clusters + 2 {
        return Err(corrupt("FAT is too small for the cluster count"));
    }
    let mut active = 0;
    if bits == 32 && le16(b, 40)? & 0x80 != 0 {
        active = (le16(b, 40)? & 0xf) as u64;
        if active >= nfats {
            return Err(corrupt("active FAT number out of range"));
        }
    }
    Ok(Some(Geometry {
        bits: bits as u32,
        cluster_size: bps * spc,
        fat_offset: (reserved + active * fat_sectors) * bps,
        root_offset: (reserved + nfats * fat_sectors) * bps,
        root_bytes: root_entries * 32,
        data_offset: data_start * bps,
        clusters: clusters as u32,
        root_cluster: if bits == 32 { le32(b, 44)? } else { 0 },
    }))
}

/// A parsed directory: entries with their inode numbers, a name index and its byte size.
struct Dir {
    entries: Vec<DirEntry>,
    shorts: Vec<Short>,
    by_name: HashMap<Vec<u8>, usize>,
    by_fold: HashMap<Vec<u8>, usize>,
    bytes: u64,
}

/// Where a directory's bytes lie on the device: `(offset, length)` pieces in order.
type Spans = Vec<(u64, u64)>;

/// Contiguous cluster runs `(first cluster, count)` of a file, in file order.
type Runs = Arc<Vec<(u32, u32)>>;

/// An open FAT filesystem.
pub struct FatFs {
    dev: Arc<dyn Device>,
    meta: ChunkCache,
    geo: Geometry,
    dirs: Lru<u64, Arc<Dir>>,
    runs: Lru<(u32, u32), Runs>,
}

impl FatFs {
    /// Opens the FAT filesystem on `dev`; `Ok(None)` when the boot sector is not FAT's.
    pub fn open(dev: Arc<dyn Device>) -> Result<Option<FatFs>> {
        if dev.size() < 512 {
            return Ok(None);
        }
        let mut boot = [0u8; 512];
        super::read_exact(&*dev, &mut boot, 0)?;
        let Some(geo) = parse_boot(&boot)? else {
            return Ok(None);
        };
        let fs = FatFs {
            meta: ChunkCache::new(dev.clone(), 16 << 20),
            dev,
            geo,
            dirs: Lru::new(1 << 18),
            runs: Lru::new(1 << 20),
        };
        fs.load_dir(ROOT)?;
        Ok(Some(fs))
    }

    fn valid_cluster(&self, c: u32) -> bool {
        c >= 2 && (c - 2) < self.geo.clusters
    }

    /// The FAT entry of cluster `c`: `Some(next)` or `None` at the end of the chain.
    fn next(&self, c: u32) -> Result<Option<u32>> {
        let g = &self.geo;
        let (v, end) = match g.bits {
            12 => {
                let off = g.fat_offset + c as u64 + c as u64 / 2;
                let mut b = [0u8; 2];
                self.meta.read(&mut b, off)?;
                let v = u16::from_le_bytes(b) as u32;
                (if c % 2 == 1 { v >> 4 } else { v & 0xfff }, 0xff8)
            }
            16 => {
                let mut b = [0u8; 2];
                self.meta.read(&mut b, g.fat_offset + 2 * c as u64)?;
                (u16::from_le_bytes(b) as u32, 0xfff8)
            }
            _ => {
                let mut b = [0u8; 4];
                self.meta.read(&mut b, g.fat_offset + 4 * c as u64)?;
                (u32::from_le_bytes(b) & 0x0fff_ffff, 0x0fff_fff8)
            }
        };
        if v >= end {
            return Ok(None);
        }
        if !self.valid_cluster(v) {
            return Err(corrupt(format!(
                "cluster chain points at invalid cluster {v:#x}"
            )));
        }
        Ok(Some(v))
    }

    /// The first `limit` clusters of the chain starting at `first`, as contiguous runs.
    fn chain(&self, first: u32, limit: u64) -> Result<Vec<(u32, u32)>> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let mut cur = Some(first);
        let mut n = 0u64;
        while let Some(c) = cur {
            if n >= limit {
                break;
            }
            if !self.valid_cluster(c) {
                return Err(corrupt(format!("invalid cluster {c:#x} in a chain")));
            }
            if n > self.geo.clusters as u64 {
                return Err(corrupt("cluster chain longer than the volume (a cycle)"));
            }
            match runs.last_mut() {
                Some((s, len)) if *s as u64 + *len as u64 == c as u64 => *len += 1,
                _ => runs.push((c, 1)),
            }
            n += 1;
            cur = self.next(c)?;
        }
        Ok(runs)
    }

    fn cluster_offset(&self, c: u32) -> u64 {
        self.geo.data_offset + (c as u64 - 2) * self.geo.cluster_size
    }

    /// The short entry of inode `ino` (not the root).
    fn short(&self, ino: u64) -> Result<Short> {
        let off = ino.checked_mul(32).ok_or(GuestFsError::NotFound)?;
        let g = &self.geo;
        let in_root = off >= g.root_offset && off < g.root_offset + g.root_bytes;
        if !in_root && off < g.data_offset {
            return Err(GuestFsError::NotFound);
        }
        let s = dir::parse_short(&self.meta.read_vec(off, 32)?)?;
        if !s.is_live() || s.attr & 0x3f == 0x0f {
            return Err(GuestFsError::NotFound);
        }
        Ok(s)
    }

    fn load_dir(&self, ino: u64) -> Result<Arc<Dir>> {
        self.dirs
            .get_or(ino, || self.read_dir(ino), |d| d.entries.len() + 1)
    }

    /// Reads a directory's bytes and the device offset of each of its clusters' starts.
    fn dir_bytes(&self, ino: u64) -> Result<(Vec<u8>, Spans)> {
        let g = &self.geo;
        let first = if ino == ROOT {
            if g.bits != 32 {
                let data = self.meta.read_vec(g.root_offset, g.root_bytes as usize)?;
                return Ok((data, vec![(g.root_offset, g.root_bytes)]));
            }
            g.root_cluster
        } else {
            let s = self.short(ino)?;
            if !s.is_dir() {
                return Err(GuestFsError::NotDir);
            }
            s.cluster
        };
        let runs = self.chain(first, MAX_DIR_BYTES.div_ceil(g.cluster_size))?;
        let mut data = Vec::new();
        let mut spans = Vec::new();
        for (c, n) in runs {
            let (off, len) = (self.cluster_offset(c), n as u64 * g.cluster_size);
            let at = data.len();
            data.resize(at + len as usize, 0);
            super::read_exact(&*self.dev, &mut data[at..], off)?;
            spans.push((off, len));
        }
        Ok((data, spans))
    }

    fn read_dir(&self, ino: u64) -> Result<Arc<Dir>> {
        let (data, spans) = self.dir_bytes(ino)?;
        let parsed: Vec<Entry> = dir::parse_dir(&data)?;
        let mut d = Dir {
            entries: Vec::with_capacity(parsed.len()),
            shorts: Vec::with_capacity(parsed.len()),
            by_name: HashMap::new(),
            by_fold: HashMap::new(),
            bytes: data.len() as u64,
        };
        for (name, idx, short) in parsed {
            // Map the slot index to its device offset through the cluster spans.
            let mut rel = idx as u64 * 32;
            let mut off = None;
            for &(start, len) in &spans {
                if rel < len {
                    off = Some(start + rel);
                    break;
                }
                rel -= len;
            }
            let off = off.ok_or_else(|| corrupt("directory slot outside its clusters"))?;
            let kind = if short.is_dir() {
                Kind::Dir
            } else {
                Kind::File
            };
            d.by_name.entry(name.clone()).or_insert(d.entries.len());
            d.by_fold.entry(fold(&name)).or_insert(d.entries.len());
            d.entries.push(DirEntry {
                name,
                ino: off / 32,
                kind,
            });
            d.shorts.push(short);
        }
        Ok(Arc::new(d))
    }

    fn attr_of(&self, ino: u64, s: Option<&Short>) -> Result<Attr> {
        let cs = self.geo.cluster_size;
        let Some(s) = s else {
            let bytes = self.load_dir(ROOT)?.bytes;
            return Ok(fat_attr(
                ROOT,
                Kind::Dir,
                bytes,
                0o755,
                Time::default(),
                Time::default(),
                None,
            ));
        };
        let (kind, size) = if s.is_dir() {
            (Kind::Dir, self.load_dir(ino)?.bytes)
        } else {
            (Kind::File, s.size as u64)
        };
        let mut perm = if kind == Kind::Dir { 0o755 } else { 0o644 };
        if s.attr & dir::ATTR_RO != 0 {
            perm &= 0o555;
        }
        let mut a = fat_attr(
            ino,
            kind,
            size,
            perm,
            dir::fat_time(s.mdate, s.mtime, 0),
            dir::fat_time(s.adate, 0, 0),
            Some(dir::fat_time(s.cdate, s.ctime, s.ctime_tenth)),
        );
        a.blocks = size.next_multiple_of(cs) / 512;
        Ok(a)
    }

    fn file_runs(&self, s: &Short) -> Result<Runs> {
        let need = (s.size as u64).div_ceil(self.geo.cluster_size);
        self.runs.get_or(
            (s.cluster, s.size),
            || Ok(Arc::new(self.chain(s.cluster, need)?)),
            |r| r.len() + 1,
        )
    }
}

fn fat_attr(
    ino: u64,
    kind: Kind,
    size: u64,
    perm: u16,
    mtime: Time,
    atime: Time,
    crtime: Option<Time>,
) -> Attr {
    Attr {
        ino,
        kind,
        size,
        perm,
        uid: 0,
        gid: 0,
        nlink: if kind == Kind::Dir { 2 } else { 1 },
        rdev: 0,
        blocks: size.div_ceil(512),
        atime,
        mtime,
        ctime: mtime,
        crtime,
    }
}

impl Filesystem for FatFs {
    fn kind(&self) -> &'static str {
        "vfat"
    }

    fn root(&self) -> u64 {
        ROOT
    }

    fn getattr(&self, ino: u64) -> Result<Attr> {
        if ino == ROOT {
            return self.attr_of(ROOT, None);
        }
        let s = self.short(ino)?;
        self.attr_of(ino, Some(&s))
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>> {
        let d = self.load_dir(parent)?;
        let k = match d.by_name.get(name) {
            Some(&k) => k,
            None => match d.by_fold.get(&fold(name)) {
                Some(&k) => k,
                None => return Ok(None),
            },
        };
        self.attr_of(d.entries[k].ino, Some(&d.shorts[k])).map(Some)
    }

    fn readdir(&self, dir: u64) -> Result<Vec<DirEntry>> {
        Ok(self.load_dir(dir)?.entries.clone())
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if ino == ROOT {
            return Err(GuestFsError::IsDir);
        }
        let s = self.short(ino)?;
        if s.is_dir() {
            return Err(GuestFsError::IsDir);
        }
        let size = s.size as u64;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (size - offset).min(buf.len() as u64) as usize;
        let runs = self.file_runs(&s)?;
        let cs = self.geo.cluster_size;
        let (mut done, mut run_start) = (0usize, 0u64);
        for &(c, len) in runs.iter() {
            let run_bytes = len as u64 * cs;
            let run_end = run_start + run_bytes;
            let pos = offset + done as u64;
            if pos < run_end {
                let k = ((run_end - pos) as usize).min(n - done);
                let dev_off = self.cluster_offset(c) + (pos - run_start);
                super::read_exact(&*self.dev, &mut buf[done..done + k], dev_off)?;
                done += k;
                if done == n {
                    return Ok(n);
                }
            }
            run_start = run_end;
        }
        Err(corrupt("cluster chain shorter than the file size"))
    }

    fn readlink(&self, _ino: u64) -> Result<Vec<u8>> {
        Err(GuestFsError::NotSymlink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_sector_rejects_garbage() {
        assert!(parse_boot(&[0u8; 512]).unwrap().is_none());
        let mut b = [0u8; 512];
        b[0] = 0xeb;
        b[510] = 0x55;
        b[511] = 0xaa;
        assert!(parse_boot(&b).unwrap().is_none());
    }
}
