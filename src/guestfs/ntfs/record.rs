//! NTFS on-disk structures: boot sector, update-sequence fixups, MFT records, attributes,
//! runlists and index entries. All pure functions over byte slices.

use crate::guestfs::bytes::{le16, le32, le64, sub, u8_at, utf16le};
use crate::guestfs::error::{corrupt, Result};
use crate::guestfs::Time;

/// Volume geometry from the boot sector.
#[derive(Clone, Debug)]
pub(super) struct Boot {
    pub cluster_size: u64,
    pub record_size: u64,
    pub mft_offset: u64,
}

/// Sizes encoded as "clusters if positive, else 2^-n bytes".
fn size_field(v: u8, cluster: u64) -> Option<u64> {
    let v = v as i8;
    if v > 0 {
        cluster.checked_mul(v as u64)
    } else {
        let shift = (-(v as i16)) as u32;
        (shift < 32).then(|| 1u64 << shift)
    }
}

/// Parses an NTFS boot sector; `Ok(None)` without the "NTFS    " OEM id.
pub(super) fn parse_boot(b: &[u8]) -> Result<Option<Boot>> {
    if sub(b, 3, 8, "OEM id")? != b"NTFS    " {
        return Ok(None);
    }
    let bps = le16(b, 11)? as u64;
    let spc_raw = u8_at(b, 13)?;
    let spc = if spc_raw <= 0x80 {
        spc_raw as u64
    } else {
        1u64 << (256 - spc_raw as u32).min(31)
    };
    if !matches!(bps, 256..=4096) || !bps.is_power_of_two() || spc == 0 || !spc.is_power_of_two() {
        return Err(corrupt("NTFS sector or cluster size"));
    }
    let cluster_size = bps * spc;
    if cluster_size > 2 << 20 {
        return Err(corrupt("NTFS cluster size above 2 MiB"));
    }
    let record_size = size_field(u8_at(b, 0x40)?, cluster_size).unwrap_or(0);
    if !(512..=65536).contains(&record_size) || !record_size.is_power_of_two() {
        return Err(corrupt(format!("NTFS file record size {record_size}")));
    }
    let mft_offset = le64(b, 0x30)?
        .checked_mul(cluster_size)
        .ok_or_else(|| corrupt("NTFS MFT position overflows"))?;
    Ok(Some(Boot {
        cluster_size,
        record_size,
        mft_offset,
    }))
}

/// Checks the magic and applies the update sequence array to a multi-sector record in place.
pub(super) fn apply_fixups(buf: &mut [u8], magic: &[u8; 4]) -> Result<()> {
    if sub(buf, 0, 4, "record magic")? != magic {
        return Err(corrupt(format!(
            "record lacks its {} magic",
            String::from_utf8_lossy(magic)
        )));
    }
    let usa = le16(buf, 4)? as usize;
    let count = le16(buf, 6)? as usize;
    if count == 0 || (count - 1) * 512 != buf.len() {
        return Err(corrupt(
            "update sequence count does not match the record size",
        ));
    }
    let usn = le16(buf, usa)?;
    for i in 1..count {
        let fix = le16(buf, usa + 2 * i)?;
        let end = i * 512 - 2;
        if le16(buf, end)? != usn {
            return Err(corrupt("torn record: update sequence number mismatch"));
        }
        buf[end..end + 2].copy_from_slice(&fix.to_le_bytes());
    }
    Ok(())
}

/// A run of virtual clusters: on disk at `lcn`, or sparse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub vcn: u64,
    pub len: u64,
    pub lcn: Option<u64>,
}

/// Decodes a mapping-pairs array starting at virtual cluster `vcn`.
pub(super) fn decode_runs(b: &[u8], mut vcn: u64, out: &mut Vec<Run>, max: usize) -> Result<()> {
    let mut at = 0usize;
    let mut lcn: i64 = 0;
    while at < b.len() && b[at] != 0 {
        let (len_size, off_size) = ((b[at] & 0xf) as usize, (b[at] >> 4) as usize);
        if len_size == 0 || len_size > 8 || off_size > 8 {
            return Err(corrupt("runlist field sizes"));
        }
        let field = sub(b, at + 1, len_size + off_size, "runlist entry")?;
        let len = field[..len_size]
            .iter()
            .rev()
            .fold(0u64, |a, &x| a << 8 | x as u64);
        let run_lcn = if off_size == 0 {
            None
        } else {
            let raw = &field[len_size..];
            let mut delta = raw.iter().rev().fold(0i64, |a, &x| a << 8 | x as i64);
            if off_size < 8 && raw[off_size - 1] & 0x80 != 0 {
                delta -= 1i64 << (8 * off_size);
            }
            lcn = lcn
                .checked_add(delta)
                .ok_or_else(|| corrupt("runlist LCN overflows"))?;
            Some(u64::try_from(lcn).map_err(|_| corrupt("negative LCN"))?)
        };
        if len == 0 || len > 1 << 48 {
            return Err(corrupt("runlist length"));
        }
        if out.len() >= max {
            return Err(crate::guestfs::GuestFsError::TooLarge(format!(
                "more than {max} runs"
            )));
        }
        out.push(Run {
            vcn,
            len,
            lcn: run_lcn,
        });
        vcn = vcn
            .checked_add(len)
            .ok_or_else(|| corrupt("runlist VCN overflows"))?;
        at += 1 + len_size + off_size;
    }
    Ok(())
}

/// An attribute's value: inline, or described by runs.
#[derive(Clone, Debug)]
pub(super) enum Body {
    Resident(Vec<u8>),
    NonResident {
        start_vcn: u64,
        runs: Vec<Run>,
        alloc: u64,
        size: u64,
        init: u64,
        compressed: Option<u64>,
    },
}

/// One attribute of a record.
#[derive(Clone, Debug)]
pub(super) struct Attribute {
    pub ty: u32,
    pub name: Vec<u8>,
    pub flags: u16,
    pub body: Body,
}

pub(super) const FLAG_COMPRESSED: u16 = 0x00ff;
pub(super) const FLAG_ENCRYPTED: u16 = 0x4000;

/// A file record's header fields and attributes.
#[derive(Clone, Debug)]
pub(super) struct Record {
    pub flags: u16,
    pub base: u64,
    pub attrs: Vec<Attribute>,
}

pub(super) const RECORD_IN_USE: u16 = 0x1;
pub(super) const RECORD_DIR: u16 = 0x2;

/// Parses a fixed-up file record. `max_runs` caps the runs decoded per attribute.
pub(super) fn parse_record(b: &[u8], max_runs: usize) -> Result<Record> {
    let first = le16(b, 20)? as usize;
    let used = (le32(b, 24)? as usize).min(b.len());
    let mut rec = Record {
        flags: le16(b, 22)?,
        base: le64(b, 32)? & 0xffff_ffff_ffff,
        attrs: Vec::new(),
    };
    let mut at = first;
    // Each attribute is at least 16 bytes, so this loop is bounded by the record size.
    while at + 8 <= used {
        let ty = le32(b, at)?;
        if ty == 0xffff_ffff {
            break;
        }
        let len = le32(b, at + 4)? as usize;
        if len < 16 || at + len > used {
            return Err(corrupt("attribute length overruns its record"));
        }
        let a = sub(b, at, len, "attribute")?;
        rec.attrs.push(parse_attribute(a, ty, max_runs)?);
        at += len;
    }
    Ok(rec)
}

fn parse_attribute(a: &[u8], ty: u32, max_runs: usize) -> Result<Attribute> {
    let non_resident = u8_at(a, 8)? != 0;
    let name_len = u8_at(a, 9)? as usize;
    let name = utf16le(sub(
        a,
        le16(a, 10)? as usize,
        name_len * 2,
        "attribute name",
    )?);
    let flags = le16(a, 12)?;
    let body = if !non_resident {
        let (vlen, voff) = (le32(a, 16)? as usize, le16(a, 20)? as usize);
        Body::Resident(sub(a, voff, vlen, "resident value")?.to_vec())
    } else {
        let start_vcn = le64(a, 16)?;
        let runs_off = le16(a, 32)? as usize;
        let mut runs = Vec::new();
        decode_runs(
            sub(a, runs_off, a.len().saturating_sub(runs_off), "runlist")?,
            start_vcn,
            &mut runs,
            max_runs,
        )?;
        let compressed = (flags & (FLAG_COMPRESSED | 0x8000) != 0 && a.len() >= 72)
            .then(|| le64(a, 64))
            .transpose()?;
        Body::NonResident {
            start_vcn,
            runs,
            alloc: le64(a, 40)?,
            size: le64(a, 48)?,
            init: le64(a, 56)?,
            compressed,
        }
    };
    Ok(Attribute {
        ty,
        name,
        flags,
        body,
    })
}

/// 100 ns intervals since 1601 to Unix time.
pub(super) fn nt_time(t: u64) -> Time {
    const EPOCH_DIFF: i64 = 11_644_473_600;
    Time {
        secs: (t / 10_000_000) as i64 - EPOCH_DIFF,
        nanos: (t % 10_000_000) as u32 * 100,
    }
}

/// The parts of a `$FILE_NAME` value (an attribute, or an index key) used here.
#[derive(Clone, Debug)]
pub(super) struct FileName {
    pub flags: u32,
    pub namespace: u8,
    pub name: Vec<u8>,
}

pub(super) const NAMESPACE_DOS: u8 = 2;
pub(super) const FILE_ATTR_SYSTEM: u32 = 0x4;
pub(super) const FILE_ATTR_REPARSE: u32 = 0x400;
pub(super) const FILE_ATTR_DIR_INDEX: u32 = 0x1000_0000;

pub(super) fn parse_file_name(b: &[u8]) -> Result<FileName> {
    let len = u8_at(b, 64)? as usize;
    Ok(FileName {
        flags: le32(b, 56)?,
        namespace: u8_at(b, 65)?,
        name: utf16le(sub(b, 66, len * 2, "file name")?),
    })
}

/// Parses the index entries in `b` (an index node's entry area) into `(file record, key)`.
pub(super) fn parse_index_entries(
    b: &[u8],
    out: &mut Vec<(u64, FileName)>,
    max: usize,
) -> Result<()> {
    let mut at = 0usize;
    while at + 16 <= b.len() {
        let len = le16(b, at + 8)? as usize;
        let key_len = le16(b, at + 10)? as usize;
        let flags = le16(b, at + 12)?;
        if flags & 2 != 0 {
            break;
        }
        if len < 16 || at + len > b.len() || 16 + key_len > len {
            return Err(corrupt("index entry length overruns its node"));
        }
        if out.len() >= max {
            return Err(crate::guestfs::GuestFsError::TooLarge(format!(
                "directory over {max} entries"
            )));
        }
        let key = parse_file_name(sub(b, at + 16, key_len, "index key")?)?;
        out.push((le64(b, at)? & 0xffff_ffff_ffff, key));
        at += len;
    }
    Ok(())
}

/// The entry area of an index header at `hdr` inside `b` (entry offsets are relative to it).
pub(super) fn index_area(b: &[u8], hdr: usize) -> Result<&[u8]> {
    let start = le32(b, hdr)? as usize;
    let end = le32(b, hdr + 4)? as usize;
    if end < start {
        return Err(corrupt("index header bounds"));
    }
    sub(b, hdr + start, end - start, "index entries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runlists() {
        // 0x21: 1-byte length 0x18, 2-byte LCN 0x5634; then sparse run of 0x10; then -0x10.
        let b = [0x21, 0x18, 0x34, 0x56, 0x01, 0x10, 0x11, 0x08, 0xf0, 0x00];
        let mut runs = Vec::new();
        decode_runs(&b, 0, &mut runs, 10).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    vcn: 0,
                    len: 0x18,
                    lcn: Some(0x5634)
                },
                Run {
                    vcn: 0x18,
                    len: 0x10,
                    lcn: None
                },
                Run {
                    vcn: 0x28,
                    len: 8,
                    lcn: Some(0x5624)
                },
            ]
        );
        assert!(decode_runs(&b, 0, &mut Vec::new(), 2).is_err());
        assert!(decode_runs(&[0x21, 0x18], 0, &mut Vec::new(), 2).is_err());
    }

    #[test]
    fn fixups_detect_torn_sectors() {
        let mut r = vec![0u8; 1024];
        r[..4].copy_from_slice(b"FILE");
        r[4] = 48;
        r[6] = 3;
        r[48..50].copy_from_slice(&7u16.to_le_bytes());
        r[50..52].copy_from_slice(&0xaaaau16.to_le_bytes());
        r[52..54].copy_from_slice(&0xbbbbu16.to_le_bytes());
        r[510..512].copy_from_slice(&7u16.to_le_bytes());
        r[1022..1024].copy_from_slice(&7u16.to_le_bytes());
        let mut ok = r.clone();
        apply_fixups(&mut ok, b"FILE").unwrap();
        assert_eq!(&ok[510..512], &[0xaa, 0xaa]);
        r[1022] = 8;
        assert!(apply_fixups(&mut r, b"FILE").is_err());
    }

    #[test]
    fn nt_epoch() {
        assert_eq!(
            nt_time(116_444_736_000_000_000 + 15),
            Time {
                secs: 0,
                nanos: 1500
            }
        );
    }
}
