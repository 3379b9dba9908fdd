//! ext2/3/4 superblock and inode parsing: pure functions over on-disk bytes.

use crate::guestfs::bytes::{le16, le32, sub, u8_at};
use crate::guestfs::error::{corrupt, GuestFsError, Result};
use crate::guestfs::{Kind, Time};

pub(super) const INCOMPAT_FILETYPE: u32 = 0x2;
pub(super) const INCOMPAT_META_BG: u32 = 0x10;
pub(super) const INCOMPAT_64BIT: u32 = 0x80;
/// Incompatible features this reader understands; anything else is refused.
const INCOMPAT_KNOWN: u32 = 0x2
    | 0x4
    | 0x10
    | 0x40
    | 0x80
    | 0x100
    | 0x200
    | 0x400
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000
    | 0x20000;
/// Features that only ext4 has (incompat, ro_compat).
const INCOMPAT_EXT4: u32 =
    0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000;
const RO_COMPAT_EXT4: u32 =
    0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x8000;
pub(super) const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const COMPAT_HAS_JOURNAL: u32 = 0x4;

pub(super) const FL_HUGE_FILE: u32 = 0x40000;
pub(super) const FL_EXTENTS: u32 = 0x80000;
pub(super) const FL_INLINE_DATA: u32 = 0x1000_0000;
pub(super) const FL_ENCRYPT: u32 = 0x800;
pub(super) const FL_COMPR: u32 = 0x4;

/// The superblock fields this reader needs, validated.
#[derive(Clone, Debug)]
pub(super) struct Super {
    pub block_size: u64,
    pub blocks_count: u64,
    pub inodes_count: u32,
    pub inodes_per_group: u32,
    pub blocks_per_group: u32,
    pub first_data_block: u32,
    pub inode_size: u32,
    pub desc_size: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub first_meta_bg: u32,
    pub sparse_super: bool,
    pub groups: u64,
    pub kind: &'static str,
}

/// Parses the 1024-byte superblock; `Ok(None)` without the ext magic.
pub(super) fn parse_super(b: &[u8]) -> Result<Option<Super>> {
    if le16(b, 56)? != 0xef53 {
        return Ok(None);
    }
    let log = le32(b, 24)?;
    if log > 6 {
        return Err(corrupt("ext block size above 64 KiB"));
    }
    let block_size = 1024u64 << log;
    let (compat, incompat, ro_compat) = (le32(b, 92)?, le32(b, 96)?, le32(b, 100)?);
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(GuestFsError::Unsupported(format!(
            "ext incompatible features {:#x}",
            incompat & !INCOMPAT_KNOWN
        )));
    }
    let rev = le32(b, 76)?;
    let inode_size = if rev == 0 { 128 } else { le16(b, 88)? as u32 };
    if inode_size < 128 || !inode_size.is_power_of_two() || inode_size as u64 > block_size {
        return Err(corrupt(format!("ext inode size {inode_size}")));
    }
    let desc_size = if incompat & INCOMPAT_64BIT != 0 {
        le16(b, 254)? as u32
    } else {
        32
    };
    if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() {
        return Err(corrupt(format!("ext group descriptor size {desc_size}")));
    }
    let mut blocks_count = le32(b, 4)? as u64;
    if incompat & INCOMPAT_64BIT != 0 {
        blocks_count |= (le32(b, 0x150)? as u64) << 32;
    }
    let (inodes_count, first_data_block) = (le32(b, 0)?, le32(b, 20)?);
    let (blocks_per_group, inodes_per_group) = (le32(b, 32)?, le32(b, 40)?);
    if blocks_per_group == 0 || inodes_per_group == 0 || first_data_block as u64 >= blocks_count {
        return Err(corrupt("ext group geometry"));
    }
    let groups = (blocks_count - first_data_block as u64).div_ceil(blocks_per_group as u64);
    if groups
        .checked_mul(inodes_per_group as u64)
        .is_none_or(|n| n < inodes_count as u64)
    {
        return Err(corrupt("ext inode count does not fit the groups"));
    }
    let kind = if incompat & INCOMPAT_EXT4 != 0 || ro_compat & RO_COMPAT_EXT4 != 0 {
        "ext4"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    Ok(Some(Super {
        block_size,
        blocks_count,
        inodes_count,
        inodes_per_group,
        blocks_per_group,
        first_data_block,
        inode_size,
        desc_size,
        incompat,
        ro_compat,
        first_meta_bg: le32(b, 260)?,
        sparse_super: ro_compat & 0x1 != 0,
        groups,
        kind,
    }))
}

/// One parsed inode.
#[derive(Clone, Debug)]
pub(super) struct Inode {
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u32,
    /// 512-byte units.
    pub blocks: u64,
    pub flags: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Option<Time>,
    /// The 60-byte `i_block` area: extent root, block pointers, fast symlink or inline data.
    pub block: [u8; 60],
    pub file_acl: u64,
    /// The value of the in-inode `system.data` xattr (inline data past the first 60 bytes).
    pub inline_tail: Vec<u8>,
}

impl Inode {
    pub fn kind(&self) -> Result<Kind> {
        kind_of_mode(self.mode)
    }
}

pub(super) fn kind_of_mode(mode: u16) -> Result<Kind> {
    Ok(match mode & 0o170000 {
        0o100000 => Kind::File,
        0o040000 => Kind::Dir,
        0o120000 => Kind::Symlink,
        0o020000 => Kind::CharDev,
        0o060000 => Kind::BlockDev,
        0o010000 => Kind::Fifo,
        0o140000 => Kind::Socket,
        m => return Err(corrupt(format!("ext inode has unknown type {m:o}"))),
    })
}

/// Seconds with the ext4 epoch bits and nanoseconds of an `_extra` field.
fn time(secs: u32, extra: Option<u32>) -> Time {
    let mut t = Time {
        secs: secs as i32 as i64,
        nanos: 0,
    };
    if let Some(x) = extra {
        t.secs += ((x & 3) as i64) << 32;
        t.nanos = (x >> 2).min(999_999_999);
    }
    t
}

/// Parses one on-disk inode (`b` is `inode_size` bytes).
pub(super) fn parse_inode(b: &[u8], sb: &Super) -> Result<Inode> {
    let extra_isize = if b.len() > 128 {
        le16(b, 128)? as usize
    } else {
        0
    };
    let extra_end = 128usize.saturating_add(extra_isize).min(b.len());
    // An `_extra` field exists when it lies inside the inode's extra area.
    let field = |off: usize| -> Result<Option<u32>> {
        if off + 4 <= extra_end {
            le32(b, off).map(Some)
        } else {
            Ok(None)
        }
    };
    let flags = le32(b, 32)?;
    let blocks_lo = le32(b, 28)? as u64;
    let blocks_hi = le16(b, 116)? as u64;
    let mut blocks = blocks_lo;
    if sb.ro_compat & RO_COMPAT_HUGE_FILE != 0 {
        blocks |= blocks_hi << 32;
        if flags & FL_HUGE_FILE != 0 {
            blocks = blocks.saturating_mul(sb.block_size / 512);
        }
    }
    let mut block = [0u8; 60];
    block.copy_from_slice(sub(b, 40, 60, "i_block")?);
    let crtime = match field(144)? {
        Some(secs) => Some(time(secs, field(148)?)),
        None => None,
    };
    let inline_tail = if flags & FL_INLINE_DATA != 0 {
        inline_xattr(b, extra_end)?.unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(Inode {
        mode: le16(b, 0)?,
        uid: le16(b, 2)? as u32 | (le16(b, 120)? as u32) << 16,
        gid: le16(b, 24)? as u32 | (le16(b, 122)? as u32) << 16,
        size: le32(b, 4)? as u64 | (le32(b, 108)? as u64) << 32,
        links: le16(b, 26)? as u32,
        blocks,
        flags,
        atime: time(le32(b, 8)?, field(140)?),
        ctime: time(le32(b, 12)?, field(132)?),
        mtime: time(le32(b, 16)?, field(136)?),
        crtime,
        block,
        file_acl: le32(b, 104)? as u64 | (le16(b, 118)? as u64) << 32,
        inline_tail,
    })
}

/// The value of the in-inode `system.data` xattr (name index 7, name "data"), if present.
fn inline_xattr(b: &[u8], start: usize) -> Result<Option<Vec<u8>>> {
    if start + 4 > b.len() || le32(b, start)? != 0xea02_0000 {
        return Ok(None);
    }
    let base = start + 4;
    let mut at = base;
    // Each entry is at least 16 bytes, so the walk is bounded by the inode size.
    while at + 16 <= b.len() {
        if le32(b, at)? == 0 {
            break;
        }
        let name_len = u8_at(b, at)? as usize;
        let index = u8_at(b, at + 1)?;
        let value_offs = le16(b, at + 2)? as usize;
        let value_inum = le32(b, at + 4)?;
        let value_size = le32(b, at + 8)? as usize;
        let name = sub(b, at + 16, name_len, "xattr name")?;
        if index == 7 && name == b"data" {
            if value_inum != 0 {
                return Err(GuestFsError::Unsupported(
                    "inline data in an EA inode".into(),
                ));
            }
            return Ok(Some(
                sub(b, base + value_offs, value_size, "inline data xattr")?.to_vec(),
            ));
        }
        at += (16 + name_len).next_multiple_of(4);
    }
    Ok(None)
}

/// The device number of a character or block device inode, in `new_encode_dev` layout.
pub(super) fn rdev(block: &[u8; 60]) -> u32 {
    let old = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    if old != 0 {
        let (major, minor) = ((old >> 8) & 0xff, old & 0xff);
        return minor | (major << 8);
    }
    u32::from_le_bytes([block[4], block[5], block[6], block[7]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_epoch_bits_and_nanos() {
        assert_eq!(time(0xffff_ffff, None), Time { secs: -1, nanos: 0 });
        assert_eq!(
            time(0xffff_ffff, Some(1 | (5 << 2))),
            Time {
                secs: (1 << 32) - 1,
                nanos: 5
            }
        );
    }

    #[test]
    fn inode_parse_rejects_short_buffers() {
        let sb = parse_super(&{
            let mut s = vec![0u8; 1024];
            s[56..58].copy_from_slice(&0xef53u16.to_le_bytes());
            s[4..8].copy_from_slice(&100u32.to_le_bytes());
            s[0..4].copy_from_slice(&16u32.to_le_bytes());
            s[32..36].copy_from_slice(&8192u32.to_le_bytes());
            s[40..44].copy_from_slice(&16u32.to_le_bytes());
            s
        })
        .unwrap()
        .unwrap();
        assert!(parse_inode(&[0u8; 100], &sb).is_err());
        assert!(parse_inode(&[0u8; 128], &sb).is_ok());
    }
}
