//! Logical → physical block mapping for ext files: extent trees and (double, triple)
//! indirect blocks. The node parsers are pure; tree walks are depth-bounded.

use crate::guestfs::bytes::{le16, le32, sub};
use crate::guestfs::error::{corrupt, Result};

/// A run of logical blocks: mapped to consecutive physical blocks, or a hole (also used for
/// unwritten extents, which read as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub logical: u64,
    pub len: u64,
    pub physical: Option<u64>,
}

/// Deepest extent tree accepted (the kernel allows 5).
const MAX_DEPTH: u16 = 5;
/// Logical block numbers are 32-bit in ext4.
pub(super) const LBLK_END: u64 = 1 << 32;

/// An extent tree node: depth and entries (12 bytes each) after the 12-byte header.
fn node_header(b: &[u8]) -> Result<(u16, usize)> {
    if le16(b, 0)? != 0xf30a {
        return Err(corrupt("bad extent header magic"));
    }
    let entries = le16(b, 2)? as usize;
    let max = le16(b, 4)? as usize;
    let depth = le16(b, 6)?;
    if entries > max || 12 + entries * 12 > b.len() {
        return Err(corrupt("extent node entry count overruns the node"));
    }
    Ok((depth, entries))
}

/// What one node says about `lblk`: descend into a child block, or a final run.
pub(super) enum Step {
    Child { block: u64, end: u64 },
    Done(Run),
}

/// Looks up `lblk` in one extent node; `end` bounds the logical range this node covers.
pub(super) fn extent_step(b: &[u8], lblk: u64, end: u64, want_depth: Option<u16>) -> Result<Step> {
    let (depth, n) = node_header(b)?;
    if depth > MAX_DEPTH || want_depth.is_some_and(|d| d != depth) {
        return Err(corrupt("extent tree depth is inconsistent"));
    }
    let key = |i: usize| -> Result<u64> { Ok(le32(b, 12 + i * 12)? as u64) };
    // The last entry whose first block is <= lblk.
    let mut found = None;
    for i in 0..n {
        if key(i)? <= lblk {
            found = Some(i);
        } else {
            break;
        }
    }
    let next_key = |i: usize| -> Result<u64> {
        if i + 1 < n {
            key(i + 1)
        } else {
            Ok(end)
        }
    };
    let Some(i) = found else {
        let first = if n > 0 { key(0)? } else { end };
        let len = first.max(lblk + 1) - lblk;
        return Ok(Step::Done(Run {
            logical: lblk,
            len,
            physical: None,
        }));
    };
    let e = sub(b, 12 + i * 12, 12, "extent entry")?;
    if depth > 0 {
        let block = le32(e, 4)? as u64 | (le16(e, 8)? as u64) << 32;
        return Ok(Step::Child {
            block,
            end: next_key(i)?.min(end),
        });
    }
    let start = key(i)?;
    let raw_len = le16(e, 4)? as u64;
    let (len, unwritten) = if raw_len > 32768 {
        (raw_len - 32768, true)
    } else {
        (raw_len, false)
    };
    let phys = le32(e, 8)? as u64 | (le16(e, 6)? as u64) << 32;
    if lblk < start + len {
        let off = lblk - start;
        let physical = (!unwritten).then_some(phys + off);
        return Ok(Step::Done(Run {
            logical: lblk,
            len: len - off,
            physical,
        }));
    }
    let hole_end = next_key(i)?.min(end).max(lblk + 1);
    Ok(Step::Done(Run {
        logical: lblk,
        len: hole_end - lblk,
        physical: None,
    }))
}

/// Depth of the root node, to check children against.
pub(super) fn root_depth(b: &[u8]) -> Result<u16> {
    Ok(node_header(b)?.0)
}

/// Where `lblk` lives in an indirect-mapped file: the `i_block` slot and the chain of pointer
/// indexes below it (empty for the 12 direct slots).
pub(super) fn indirect_path(lblk: u64, per: u64) -> Result<(usize, Vec<u64>)> {
    if lblk < 12 {
        return Ok((lblk as usize, Vec::new()));
    }
    let mut rel = lblk - 12;
    let mut span = per;
    for level in 0..3usize {
        if rel < span {
            let mut path = Vec::with_capacity(level + 1);
            let mut sub_span = span;
            for _ in 0..=level {
                sub_span /= per;
                path.push(rel / sub_span);
                rel %= sub_span;
            }
            return Ok((12 + level, path));
        }
        rel -= span;
        span = span
            .checked_mul(per)
            .ok_or_else(|| corrupt("indirect span overflows"))?;
    }
    Err(corrupt("block number beyond the triple-indirect range"))
}

/// The 32-bit pointer `i` of a pointer block.
pub(super) fn ptr(b: &[u8], i: u64) -> Result<u64> {
    let at = usize::try_from(i).map_err(|_| corrupt("pointer index"))?;
    Ok(le32(
        b,
        at.checked_mul(4).ok_or_else(|| corrupt("pointer index"))?,
    )? as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indirect_paths() {
        assert_eq!(indirect_path(3, 256).unwrap(), (3, vec![]));
        assert_eq!(indirect_path(12, 256).unwrap(), (12, vec![0]));
        assert_eq!(indirect_path(12 + 256, 256).unwrap(), (13, vec![0, 0]));
        assert_eq!(
            indirect_path(12 + 256 + 257, 256).unwrap(),
            (13, vec![1, 1])
        );
        assert_eq!(
            indirect_path(12 + 256 + 65536, 256).unwrap(),
            (14, vec![0, 0, 0])
        );
        assert!(indirect_path(u64::MAX / 2, 256).is_err());
    }

    #[test]
    fn extent_leaf_lookup() {
        let mut b = vec![0u8; 60];
        b[0..2].copy_from_slice(&0xf30au16.to_le_bytes());
        b[2..4].copy_from_slice(&1u16.to_le_bytes());
        b[4..6].copy_from_slice(&4u16.to_le_bytes());
        // extent: logical 10, len 5, physical 100
        b[12..16].copy_from_slice(&10u32.to_le_bytes());
        b[16..18].copy_from_slice(&5u16.to_le_bytes());
        b[20..24].copy_from_slice(&100u32.to_le_bytes());
        let run = |l| match extent_step(&b, l, LBLK_END, None).unwrap() {
            Step::Done(r) => r,
            Step::Child { .. } => panic!(),
        };
        assert_eq!(
            run(0),
            Run {
                logical: 0,
                len: 10,
                physical: None
            }
        );
        assert_eq!(
            run(12),
            Run {
                logical: 12,
                len: 3,
                physical: Some(102)
            }
        );
        assert_eq!(run(15).physical, None);
        b[2] = 200;
        assert!(extent_step(&b, 0, LBLK_END, None).is_err());
    }
}
