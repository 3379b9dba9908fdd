//! ext directory blocks: pure parsing of linear directory entries.
//!
//! htree directories are read linearly: their index nodes look like one empty entry spanning
//! the block (and the root's index hides inside the `..` entry), so they parse as nothing.

use crate::guestfs::bytes::{le16, le32, sub, u8_at};
use crate::guestfs::error::{corrupt, Result};
use crate::guestfs::Kind;

/// A raw entry: name, inode, and the type from the entry (None without the filetype feature
/// or for an unknown type code).
pub(super) type RawEntry = (Vec<u8>, u64, Option<Kind>);

fn kind_of_code(code: u8) -> Option<Kind> {
    Some(match code {
        1 => Kind::File,
        2 => Kind::Dir,
        3 => Kind::CharDev,
        4 => Kind::BlockDev,
        5 => Kind::Fifo,
        6 => Kind::Socket,
        7 => Kind::Symlink,
        _ => return None,
    })
}

/// Parses the entries of one directory block (or an inline-data area) into `out`, skipping
/// unused entries, `.` and `..`. `max` caps the number of entries kept.
pub(super) fn parse_block(
    b: &[u8],
    filetype: bool,
    out: &mut Vec<RawEntry>,
    max: usize,
) -> Result<()> {
    let mut at = 0usize;
    while at + 8 <= b.len() {
        let ino = le32(b, at)? as u64;
        let mut rec_len = le16(b, at + 4)? as usize;
        if rec_len == 0 || rec_len == 65535 {
            // 64 KiB blocks encode a full-block record this way.
            rec_len = 65536;
        }
        if rec_len < 8 || !rec_len.is_multiple_of(4) || at + rec_len > b.len() {
            return Err(corrupt(format!(
                "directory entry at {at} has record length {rec_len}"
            )));
        }
        let (name_len, code) = if filetype {
            (u8_at(b, at + 6)? as usize, u8_at(b, at + 7)?)
        } else {
            (le16(b, at + 6)? as usize, 0)
        };
        if ino != 0 && name_len > 0 {
            if 8 + name_len > rec_len {
                return Err(corrupt("directory entry name overruns its record"));
            }
            let name = sub(b, at + 8, name_len, "entry name")?;
            if name != b"." && name != b".." {
                if out.len() >= max {
                    return Err(crate::guestfs::GuestFsError::TooLarge(format!(
                        "directory has more than {max} entries"
                    )));
                }
                out.push((name.to_vec(), ino, kind_of_code(code)));
            }
        }
        at += rec_len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ino: u32, rec_len: u16, name: &[u8], code: u8) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&ino.to_le_bytes());
        e.extend_from_slice(&rec_len.to_le_bytes());
        e.push(name.len() as u8);
        e.push(code);
        e.extend_from_slice(name);
        e.resize(rec_len as usize, 0);
        e
    }

    #[test]
    fn parses_and_skips_dots() {
        let mut b = entry(2, 12, b".", 2);
        b.extend(entry(2, 12, b"..", 2));
        b.extend(entry(12, 40, b"hello", 1));
        let mut out = Vec::new();
        parse_block(&b, true, &mut out, 10).unwrap();
        assert_eq!(out, vec![(b"hello".to_vec(), 12, Some(Kind::File))]);
        let mut bad = b.clone();
        bad[4] = 3;
        assert!(parse_block(&bad, true, &mut Vec::new(), 10).is_err());
        assert!(parse_block(&b, true, &mut Vec::new(), 0).is_err());
    }
}
