//! NTFS, read-only: resident and non-resident data, sparse runs, attribute lists, long
//! (Win32/POSIX) names, hard links, reparse-point and Interix symlinks.
//!
//! Inode numbers are MFT record numbers (the root is 5), so hard links share one. Directories
//! are read linearly: the `$I30` index root plus every in-use index record of the index
//! allocation (by its `$BITMAP`), never by following B-tree child pointers, so a cyclic tree
//! cannot loop. DOS 8.3 names are hidden; in the root, the metadata files (records below 16,
//! `$MFT` … `$Extend`) are hidden. Owners are not mapped: uid/gid 0, directories 0755, files
//! 0644, symlinks 0777. Compressed and encrypted files fail with `Unsupported`.
//!
//! Invariants: at most [`MAX_RUNS`] runs per stream and [`MAX_LIST_RECORDS`] extension
//! records per file; attribute lists up to 1 MiB; index allocations up to [`MAX_INDEX_BYTES`].

mod file;
mod record;

use std::collections::HashMap;
use std::sync::Arc;

use self::file::{File, Stream};
use self::record::{Boot, FileName, Run};
use super::bytes::fold;
use super::cache::{ChunkCache, Lru};
use super::error::{corrupt, GuestFsError, Result};
use super::{Attr, Device, DirEntry, Filesystem, Kind};

/// Most runs decoded for one stream.
pub const MAX_RUNS: usize = 1 << 20;
/// Most extension records followed through an attribute list.
pub const MAX_LIST_RECORDS: usize = 4096;
/// Largest directory index allocation read.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;
/// Most entries in one directory.
pub const MAX_DIR_ENTRIES: usize = 1 << 21;
const ROOT: u64 = 5;

struct Dir {
    entries: Vec<DirEntry>,
    by_name: HashMap<Vec<u8>, usize>,
    by_fold: HashMap<Vec<u8>, usize>,
}

/// An open NTFS volume.
pub struct Ntfs {
    dev: Arc<dyn Device>,
    meta: ChunkCache,
    boot: Boot,
    /// The `$MFT` data stream: where each file record lives.
    mft: Stream,
    files: Lru<u64, Arc<File>>,
    dirs: Lru<u64, Arc<Dir>>,
}

impl Ntfs {
    /// Opens the NTFS volume on `dev`; `Ok(None)` without the NTFS boot sector id.
    pub fn open(dev: Arc<dyn Device>) -> Result<Option<Ntfs>> {
        if dev.size() < 512 {
            return Ok(None);
        }
        let mut bs = [0u8; 512];
        super::read_exact(&*dev, &mut bs, 0)?;
        let Some(boot) = record::parse_boot(&bs)? else {
            return Ok(None);
        };
        // Bootstrap: $MFT's own record sits at the MFT start; its $DATA says where the rest is.
        let mut raw = vec![0u8; boot.record_size as usize];
        super::read_exact(&*dev, &mut raw, boot.mft_offset)?;
        record::apply_fixups(&mut raw, b"FILE")?;
        let rec0 = record::parse_record(&raw, MAX_RUNS)?;
        let mft = file::unnamed_stream(&rec0.attrs, 0x80, b"")?
            .ok_or_else(|| corrupt("$MFT has no data"))?;
        let mut fs = Ntfs {
            meta: ChunkCache::new(dev.clone(), 32 << 20),
            dev,
            boot,
            mft,
            files: Lru::new(1 << 16),
            dirs: Lru::new(1 << 19),
        };
        // With an attribute list, $MFT's full runlist spans several records: reload it.
        let full = fs.file(0)?;
        if let Some(data) = &full.data {
            fs.mft = data.clone();
        }
        fs.files = Lru::new(1 << 16);
        if fs.file(ROOT)?.kind != Kind::Dir {
            return Err(corrupt("NTFS root is not a directory"));
        }
        Ok(Some(fs))
    }

    /// Reads and fixes up file record `rn`.
    fn raw_record(&self, rn: u64) -> Result<Vec<u8>> {
        let rs = self.boot.record_size;
        let off = rn.checked_mul(rs).ok_or(GuestFsError::NotFound)?;
        if off.checked_add(rs).is_none_or(|e| e > self.mft.size) {
            return Err(GuestFsError::NotFound);
        }
        let mut buf = vec![0u8; rs as usize];
        self.read_stream(&self.mft, off, &mut buf, true)?;
        record::apply_fixups(&mut buf, b"FILE")?;
        Ok(buf)
    }

    fn file(&self, rn: u64) -> Result<Arc<File>> {
        self.files
            .get_or(rn, || file::load(self, rn).map(Arc::new), |f| 1 + f.cost())
    }

    /// Reads `buf.len()` bytes of a stream at `offset` (bytes past the initialized size are
    /// zeros; the caller clamps to the stream size). `meta` routes reads through the cache.
    fn read_stream(&self, s: &Stream, offset: u64, buf: &mut [u8], meta: bool) -> Result<()> {
        if let Some(v) = &s.resident {
            let start = usize::try_from(offset).map_err(|_| corrupt("offset"))?;
            let src = start.checked_add(buf.len()).and_then(|e| v.get(start..e));
            buf.copy_from_slice(src.ok_or_else(|| corrupt("read beyond a resident value"))?);
            return Ok(());
        }
        if s.flags & (record::FLAG_COMPRESSED | record::FLAG_ENCRYPTED) != 0 {
            return Err(GuestFsError::Unsupported(
                "compressed or encrypted NTFS file".into(),
            ));
        }
        let cs = self.boot.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            if pos >= s.init {
                buf[done..].fill(0);
                break;
            }
            let run = find_run(&s.runs, pos / cs)?;
            let run_end = (run.vcn + run.len).saturating_mul(cs).min(s.init);
            let n = (run_end - pos).min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + n];
            match run.lcn {
                None => out.fill(0),
                Some(lcn) => {
                    let dev_off = lcn
                        .checked_mul(cs)
                        .and_then(|b| b.checked_add(pos - run.vcn * cs))
                        .ok_or_else(|| corrupt("run offset overflows"))?;
                    if meta {
                        self.meta.read(out, dev_off)?;
                    } else {
                        super::read_exact(&*self.dev, out, dev_off)?;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn load_dir(&self, rn: u64) -> Result<Arc<Dir>> {
        self.dirs.get_or(
            rn,
            || self.read_dir(rn).map(Arc::new),
            |d| d.entries.len() + 1,
        )
    }

    fn read_dir(&self, rn: u64) -> Result<Dir> {
        let f = self.file(rn)?;
        if f.kind != Kind::Dir {
            return Err(GuestFsError::NotDir);
        }
        let mut raw: Vec<(u64, FileName)> = Vec::new();
        let root = f
            .index_root
            .as_deref()
            .ok_or_else(|| corrupt("directory without $I30 root"))?;
        record::parse_index_entries(record::index_area(root, 16)?, &mut raw, MAX_DIR_ENTRIES)?;
        if let Some(alloc) = &f.index_alloc {
            self.read_index_alloc(&f, alloc, root, &mut raw)?;
        }
        let mut d = Dir {
            entries: Vec::new(),
            by_name: HashMap::new(),
            by_fold: HashMap::new(),
        };
        for (child, key) in raw {
            let hidden = key.namespace == record::NAMESPACE_DOS
                || key.name == b"."
                || key.name == b".."
                || (rn == ROOT && child < 16)
                || child == rn;
            if hidden || d.by_name.contains_key(&key.name) {
                continue;
            }
            let kind = if key.flags & (record::FILE_ATTR_SYSTEM | record::FILE_ATTR_REPARSE) != 0 {
                // Interix and reparse-point objects need their record to know what they are.
                self.file(child).map(|c| c.kind).unwrap_or(Kind::File)
            } else if key.flags & record::FILE_ATTR_DIR_INDEX != 0 {
                Kind::Dir
            } else {
                Kind::File
            };
            d.by_fold.entry(fold(&key.name)).or_insert(d.entries.len());
            d.by_name.insert(key.name.clone(), d.entries.len());
            d.entries.push(DirEntry {
                name: key.name,
                ino: child,
                kind,
            });
        }
        Ok(d)
    }

    /// Adds the entries of every in-use index record of the allocation.
    fn read_index_alloc(
        &self,
        f: &File,
        alloc: &Stream,
        root: &[u8],
        out: &mut Vec<(u64, FileName)>,
    ) -> Result<()> {
        let irs = super::bytes::le32(root, 8)? as u64;
        if !(512..=65536).contains(&irs) || !irs.is_power_of_two() {
            return Err(corrupt(format!("index record size {irs}")));
        }
        if alloc.size > MAX_INDEX_BYTES {
            return Err(GuestFsError::TooLarge(format!(
                "index allocation of {} bytes",
                alloc.size
            )));
        }
        let mut data = vec![0u8; alloc.size as usize];
        self.read_stream(alloc, 0, &mut data, false)?;
        for (i, rec) in data.chunks_exact_mut(irs as usize).enumerate() {
            let in_use = match &f.index_bitmap {
                Some(bm) => bm.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0),
                None => true,
            };
            if !in_use {
                continue;
            }
            record::apply_fixups(rec, b"INDX")?;
            record::parse_index_entries(record::index_area(rec, 24)?, out, MAX_DIR_ENTRIES)?;
        }
        Ok(())
    }

    fn attr(&self, f: &File) -> Attr {
        let (size, blocks) = match f.kind {
            Kind::Dir => (f.index_alloc.as_ref().map_or(0, |s| s.size), 0),
            _ => f
                .data
                .as_ref()
                .map_or((0, 0), |s| (s.size, s.allocated.div_ceil(512))),
        };
        let (size, blocks) = match f.kind {
            Kind::Symlink => (f.link.as_ref().map_or(0, |l| l.len() as u64), blocks),
            Kind::Dir => (
                size,
                f.index_alloc
                    .as_ref()
                    .map_or(0, |s| s.allocated.div_ceil(512)),
            ),
            _ => (size, blocks),
        };
        Attr {
            ino: f.rn,
            kind: f.kind,
            size,
            perm: match f.kind {
                Kind::Dir => 0o755,
                Kind::Symlink => 0o777,
                _ => 0o644,
            },
            uid: 0,
            gid: 0,
            nlink: f.nlink.max(1),
            rdev: f.rdev,
            blocks,
            atime: f.atime,
            mtime: f.mtime,
            ctime: f.ctime,
            crtime: Some(f.crtime),
        }
    }
}

/// The run holding virtual cluster `vcn` (runs are sorted and contiguous).
fn find_run(runs: &[Run], vcn: u64) -> Result<Run> {
    let i = runs.partition_point(|r| r.vcn + r.len <= vcn);
    match runs.get(i) {
        Some(r) if r.vcn <= vcn => Ok(*r),
        _ => Err(corrupt(format!("no run maps cluster {vcn}"))),
    }
}

impl Filesystem for Ntfs {
    fn kind(&self) -> &'static str {
        "ntfs"
    }

    fn root(&self) -> u64 {
        ROOT
    }

    fn getattr(&self, ino: u64) -> Result<Attr> {
        let f = self.file(ino)?;
        Ok(self.attr(&f))
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>> {
        let d = self.load_dir(parent)?;
        let k = match d.by_name.get(name).or_else(|| d.by_fold.get(&fold(name))) {
            Some(&k) => k,
            None => return Ok(None),
        };
        self.getattr(d.entries[k].ino).map(Some)
    }

    fn readdir(&self, dir: u64) -> Result<Vec<DirEntry>> {
        Ok(self.load_dir(dir)?.entries.clone())
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let f = self.file(ino)?;
        match f.kind {
            Kind::Dir => return Err(GuestFsError::IsDir),
            Kind::File => {}
            _ => return Err(GuestFsError::Invalid("not a regular file".into())),
        }
        let Some(s) = &f.data else { return Ok(0) };
        if offset >= s.size {
            return Ok(0);
        }
        let n = (s.size - offset).min(buf.len() as u64) as usize;
        self.read_stream(s, offset, &mut buf[..n], false)?;
        Ok(n)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let f = self.file(ino)?;
        f.link.clone().ok_or(GuestFsError::NotSymlink)
    }
}
