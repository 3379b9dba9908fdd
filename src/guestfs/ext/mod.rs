//! ext2, ext3 and ext4, read-only and without journal replay.
//!
//! Supports extents and indirect blocks, 64-bit block numbers, meta_bg, flex_bg, htree
//! directories (read linearly), inline data, fast and slow symlinks, holes and unwritten
//! extents (zeros), huge files, nanosecond and post-2038 timestamps. Encrypted files and
//! journal replay are not supported.
//!
//! Invariants: inode numbers are the filesystem's own (so hard links share them); group
//! descriptors and inodes are read on demand through the chunk cache; parsed inodes and
//! directories sit in bounded LRU caches; a directory is at most [`MAX_DIR_BYTES`] and
//! [`MAX_DIR_ENTRIES`], a symlink at most [`MAX_LINK`] bytes.

mod dir;
mod inode;
mod map;

use std::collections::HashMap;
use std::sync::Arc;

use self::inode::{Inode, Super};
use self::map::{Run, Step, LBLK_END};
use super::bytes::{add, le32, mul};
use super::cache::{ChunkCache, Lru};
use super::error::{corrupt, GuestFsError, Result};
use super::{Attr, Device, DirEntry, Filesystem, Kind};

/// Largest directory read.
pub const MAX_DIR_BYTES: u64 = 256 << 20;
/// Most entries in one directory.
pub const MAX_DIR_ENTRIES: usize = 1 << 21;
/// Longest symlink target.
pub const MAX_LINK: u64 = 4096;

/// A parsed directory: entries in on-disk order plus a name index.
struct Dir {
    entries: Vec<DirEntry>,
    by_name: HashMap<Vec<u8>, usize>,
}

/// An open ext2/3/4 filesystem.
pub struct ExtFs {
    dev: Arc<dyn Device>,
    meta: ChunkCache,
    sb: Super,
    inodes: Lru<u64, Arc<Inode>>,
    dirs: Lru<u64, Arc<Dir>>,
}

impl ExtFs {
    /// Opens the filesystem on `dev`; `Ok(None)` without the ext superblock magic.
    pub fn open(dev: Arc<dyn Device>) -> Result<Option<ExtFs>> {
        if dev.size() < 2048 {
            return Ok(None);
        }
        let mut raw = vec![0u8; 1024];
        super::read_exact(&*dev, &mut raw, 1024)?;
        let Some(sb) = inode::parse_super(&raw)? else {
            return Ok(None);
        };
        let fs = ExtFs {
            meta: ChunkCache::new(dev.clone(), 32 << 20),
            dev,
            sb,
            inodes: Lru::new(1 << 16),
            dirs: Lru::new(1 << 19),
        };
        // The root must be a readable directory for the filesystem to be usable.
        if fs.inode(2)?.kind()? != Kind::Dir {
            return Err(corrupt("ext root inode is not a directory"));
        }
        Ok(Some(fs))
    }

    fn bs(&self) -> u64 {
        self.sb.block_size
    }

    fn has_super(&self, group: u64) -> bool {
        if !self.sb.sparse_super || group <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut g = group;
            while g.is_multiple_of(p) {
                g /= p;
            }
            g == 1
        })
    }

    /// Byte offset of group `g`'s descriptor.
    fn desc_offset(&self, g: u64) -> Result<u64> {
        let per_block = self.bs() / self.sb.desc_size as u64;
        let (blk, idx) = (g / per_block, g % per_block);
        let fdb = self.sb.first_data_block as u64;
        let meta_bg = self.sb.incompat & inode::INCOMPAT_META_BG != 0;
        let block = if meta_bg && blk >= self.sb.first_meta_bg as u64 {
            let first_group = mul(blk, per_block, "meta_bg group")?;
            let gb = mul(
                first_group,
                self.sb.blocks_per_group as u64,
                "meta_bg block",
            )?;
            add(
                add(fdb, gb, "meta_bg block")?,
                self.has_super(first_group) as u64,
                "meta_bg block",
            )?
        } else {
            add(fdb + 1, blk, "descriptor block")?
        };
        add(
            mul(block, self.bs(), "descriptor")?,
            idx * self.sb.desc_size as u64,
            "descriptor",
        )
    }

    fn inode_table(&self, g: u64) -> Result<u64> {
        if g >= self.sb.groups {
            return Err(corrupt(format!("block group {g} beyond the last")));
        }
        let d = self
            .meta
            .read_vec(self.desc_offset(g)?, self.sb.desc_size as usize)?;
        let mut block = le32(&d, 8)? as u64;
        if self.sb.desc_size >= 64 {
            block |= (le32(&d, 0x28)? as u64) << 32;
        }
        Ok(block)
    }

    fn inode(&self, ino: u64) -> Result<Arc<Inode>> {
        if ino == 0 || ino > self.sb.inodes_count as u64 {
            return Err(GuestFsError::NotFound);
        }
        self.inodes.get_or(
            ino,
            || {
                let ipg = self.sb.inodes_per_group as u64;
                let (g, idx) = ((ino - 1) / ipg, (ino - 1) % ipg);
                let table = mul(self.inode_table(g)?, self.bs(), "inode table")?;
                let isz = self.sb.inode_size as u64;
                let off = add(table, idx * isz, "inode offset")?;
                let raw = self.meta.read_vec(off, isz as usize)?;
                Ok(Arc::new(inode::parse_inode(&raw, &self.sb)?))
            },
            |_| 1,
        )
    }

    fn attr(&self, ino: u64, i: &Inode) -> Result<Attr> {
        let kind = i.kind()?;
        let rdev = match kind {
            Kind::CharDev | Kind::BlockDev => inode::rdev(&i.block),
            _ => 0,
        };
        Ok(Attr {
            ino,
            kind,
            size: i.size,
            perm: i.mode & 0o7777,
            uid: i.uid,
            gid: i.gid,
            nlink: i.links,
            rdev,
            blocks: i.blocks,
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            crtime: i.crtime,
        })
    }

    /// The run of blocks holding logical block `lblk`.
    fn map(&self, i: &Inode, lblk: u64) -> Result<Run> {
        if i.flags & inode::FL_EXTENTS == 0 {
            return self.map_indirect(i, lblk);
        }
        let mut step = map::extent_step(&i.block, lblk, LBLK_END, None)?;
        let mut depth = map::root_depth(&i.block)?;
        loop {
            match step {
                Step::Done(run) => return Ok(run),
                Step::Child { block, end } => {
                    // Each level must be one shallower, so this loop ends within 5 steps.
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| corrupt("extent tree depth"))?;
                    let node = self
                        .meta
                        .read_vec(mul(block, self.bs(), "extent node")?, self.bs() as usize)?;
                    step = map::extent_step(&node, lblk, end, Some(depth))?;
                }
            }
        }
    }

    fn map_indirect(&self, i: &Inode, lblk: u64) -> Result<Run> {
        let per = self.bs() / 4;
        let (slot, path) = map::indirect_path(lblk, per)?;
        let mut p = map::ptr(&i.block, slot as u64)?;
        if path.is_empty() {
            let mut len = 1;
            while p != 0
                && slot as u64 + len < 12
                && map::ptr(&i.block, slot as u64 + len)? == p + len
            {
                len += 1;
            }
            return Ok(Run {
                logical: lblk,
                len,
                physical: (p != 0).then_some(p),
            });
        }
        // Blocks covered by the current pointer, and lblk's position inside them.
        let mut span = per.pow(path.len() as u32);
        let mut rel = path.iter().fold(0u64, |acc, &d| acc * per + d);
        for (level, &idx) in path.iter().enumerate() {
            if p == 0 {
                return Ok(Run {
                    logical: lblk,
                    len: span - rel,
                    physical: None,
                });
            }
            let block = self
                .meta
                .read_vec(mul(p, self.bs(), "indirect block")?, self.bs() as usize)?;
            span /= per;
            rel %= span;
            p = map::ptr(&block, idx)?;
            if level + 1 == path.len() {
                let mut len = 1;
                while p != 0 && idx + len < per && map::ptr(&block, idx + len)? == p + len {
                    len += 1;
                }
                return Ok(Run {
                    logical: lblk,
                    len,
                    physical: (p != 0).then_some(p),
                });
            }
        }
        Err(corrupt("indirect walk ended early"))
    }

    /// Reads file bytes `[offset, offset + buf.len())` (the caller clamps to the size).
    fn read_data(&self, i: &Inode, offset: u64, buf: &mut [u8]) -> Result<()> {
        if i.flags & inode::FL_INLINE_DATA != 0 {
            return inline_read(i, offset, buf);
        }
        if i.flags & (inode::FL_ENCRYPT | inode::FL_COMPR) != 0 {
            return Err(GuestFsError::Unsupported(
                "encrypted or compressed ext file".into(),
            ));
        }
        let bs = self.bs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let run = self.map(i, pos / bs)?;
            let run_end = run.logical.saturating_add(run.len).saturating_mul(bs);
            let n = (run_end.saturating_sub(pos)).min((buf.len() - done) as u64) as usize;
            if n == 0 {
                return Err(corrupt("block map made no progress"));
            }
            let out = &mut buf[done..done + n];
            match run.physical {
                None => out.fill(0),
                Some(p) => {
                    if p.saturating_add(run.len) > self.sb.blocks_count {
                        return Err(corrupt(format!("data block {p} beyond the filesystem")));
                    }
                    let dev_off = add(mul(p, bs, "data block")?, pos - run.logical * bs, "data")?;
                    super::read_exact(&*self.dev, out, dev_off)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn load_dir(&self, ino: u64) -> Result<Arc<Dir>> {
        self.dirs
            .get_or(ino, || self.parse_dir(ino), |d| d.entries.len() + 1)
    }

    fn parse_dir(&self, ino: u64) -> Result<Arc<Dir>> {
        let i = self.inode(ino)?;
        if i.kind()? != Kind::Dir {
            return Err(GuestFsError::NotDir);
        }
        let filetype = self.sb.incompat & inode::INCOMPAT_FILETYPE != 0;
        let mut raw = Vec::new();
        if i.flags & inode::FL_INLINE_DATA != 0 {
            // The first 4 bytes hold the parent's inode number.
            dir::parse_block(&i.block[4..], filetype, &mut raw, MAX_DIR_ENTRIES)?;
            dir::parse_block(&i.inline_tail, filetype, &mut raw, MAX_DIR_ENTRIES)?;
        } else {
            if i.size > MAX_DIR_BYTES {
                return Err(GuestFsError::TooLarge(format!(
                    "directory of {} bytes",
                    i.size
                )));
            }
            let bs = self.bs() as usize;
            let mut data = vec![0u8; (i.size as usize).next_multiple_of(bs)];
            self.read_data(&i, 0, &mut data)?;
            for block in data.chunks(bs) {
                dir::parse_block(block, filetype, &mut raw, MAX_DIR_ENTRIES)?;
            }
        }
        let mut entries = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for (name, ino, kind) in raw {
            let kind = match kind {
                Some(k) => k,
                None => self.inode(ino)?.kind()?,
            };
            by_name.insert(name.clone(), entries.len());
            entries.push(DirEntry { name, ino, kind });
        }
        Ok(Arc::new(Dir { entries, by_name }))
    }
}

/// Inline data: the 60-byte `i_block` area, then the `system.data` xattr value.
fn inline_read(i: &Inode, offset: u64, buf: &mut [u8]) -> Result<()> {
    for (k, b) in buf.iter_mut().enumerate() {
        let pos = offset as usize + k;
        *b = if pos < 60 {
            i.block[pos]
        } else {
            *i.inline_tail
                .get(pos - 60)
                .ok_or_else(|| corrupt("inline data shorter than the file"))?
        };
    }
    Ok(())
}

impl Filesystem for ExtFs {
    fn kind(&self) -> &'static str {
        self.sb.kind
    }

    fn root(&self) -> u64 {
        2
    }

    fn getattr(&self, ino: u64) -> Result<Attr> {
        let i = self.inode(ino)?;
        self.attr(ino, &i)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>> {
        let d = self.load_dir(parent)?;
        match d.by_name.get(name) {
            Some(&k) => self.getattr(d.entries[k].ino).map(Some),
            None => Ok(None),
        }
    }

    fn readdir(&self, dir: u64) -> Result<Vec<DirEntry>> {
        Ok(self.load_dir(dir)?.entries.clone())
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let i = self.inode(ino)?;
        match i.kind()? {
            Kind::Dir => return Err(GuestFsError::IsDir),
            Kind::File => {}
            _ => return Err(GuestFsError::Invalid("not a regular file".into())),
        }
        if offset >= i.size {
            return Ok(0);
        }
        let n = (i.size - offset).min(buf.len() as u64) as usize;
        self.read_data(&i, offset, &mut buf[..n])?;
        Ok(n)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let i = self.inode(ino)?;
        if i.kind()? != Kind::Symlink {
            return Err(GuestFsError::NotSymlink);
        }
        if i.size > MAX_LINK {
            return Err(GuestFsError::TooLarge(format!(
                "symlink of {} bytes",
                i.size
            )));
        }
        let mut target = vec![0u8; i.size as usize];
        let xattr_blocks = if i.file_acl != 0 { self.bs() / 512 } else { 0 };
        let fast = i.flags & inode::FL_INLINE_DATA == 0
            && i.size < 60
            && i.blocks.saturating_sub(xattr_blocks) == 0;
        if fast {
            target.copy_from_slice(&i.block[..i.size as usize]);
        } else {
            self.read_data(&i, 0, &mut target)?;
        }
        Ok(target)
    }
}
