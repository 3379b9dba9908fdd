//! Partition tables: GPT (behind a protective MBR) and MBR with logical partitions.
//!
//! Invariants: the header and entry parsers are pure functions over byte slices; GPT headers
//! and entry arrays are CRC-checked (the backup header is used when the primary is bad); entry
//! arrays are capped at 1 MiB, and the EBR chain of an extended partition at
//! [`MAX_LOGICAL`] links with revisits refused. Partitions are clamped to the disk; empty ones
//! and ones starting beyond the end are dropped.

use super::bytes::{le32, le64, sub, utf16le};
use super::error::{corrupt, Result};
use super::{read_exact, Device};

/// One partition of a disk. `number` is 1-based as Linux names them (logical partitions of an
/// MBR extended partition start at 5); `start` and `len` are in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// GPT: the type GUID in lower-case text form; MBR: the type byte as "0x83".
    pub kind: String,
    /// GPT: the partition name; MBR: empty.
    pub name: String,
}

const SECTOR: u64 = 512;
const MAX_ENTRY_BYTES: u64 = 1 << 20;
/// Most logical partitions followed in an EBR chain.
pub const MAX_LOGICAL: usize = 256;

/// The partitions of `dev`: GPT when the MBR is protective (type 0xEE) and a valid GPT is
/// found, else MBR. An empty list when the disk has no partition table.
pub fn partitions(dev: &dyn Device) -> Result<Vec<Partition>> {
    if dev.size() < SECTOR {
        return Ok(Vec::new());
    }
    let mut mbr = [0u8; 512];
    read_exact(dev, &mut mbr, 0)?;
    let Some(entries) = parse_mbr(&mbr) else {
        return Ok(Vec::new());
    };
    let mut parts = if entries.iter().any(|e| e.kind == 0xee) {
        match read_gpt(dev)? {
            Some(p) => p,
            None => return Ok(Vec::new()),
        }
    } else {
        mbr_partitions(dev, &entries)?
    };
    let size = dev.size();
    parts.retain_mut(|p| {
        p.len = p.len.min(size.saturating_sub(p.start));
        p.len > 0
    });
    Ok(parts)
}

/// One 16-byte MBR partition entry.
#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    kind: u8,
    lba: u32,
    sectors: u32,
}

/// The four primary entries of a boot sector, or `None` without the 0x55AA signature.
fn parse_mbr(sector: &[u8]) -> Option<[MbrEntry; 4]> {
    if sector.get(510..512)? != [0x55, 0xaa] {
        return None;
    }
    let mut out = [MbrEntry {
        kind: 0,
        lba: 0,
        sectors: 0,
    }; 4];
    for (i, e) in out.iter_mut().enumerate() {
        let at = 446 + i * 16;
        *e = MbrEntry {
            kind: *sector.get(at + 4)?,
            lba: le32(sector, at + 8).ok()?,
            sectors: le32(sector, at + 12).ok()?,
        };
    }
    // A FAT or NTFS boot sector also ends in 0x55AA: a table whose status bytes are not 0 or
    // 0x80 is not a partition table.
    let statuses_ok = (0..4).all(|i| matches!(sector[446 + i * 16], 0 | 0x80));
    statuses_ok.then_some(out)
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn mbr_part(number: u32, base: u64, e: &MbrEntry) -> Partition {
    Partition {
        number,
        start: (base + e.lba as u64) * SECTOR,
        len: e.sectors as u64 * SECTOR,
        kind: format!("0x{:02x}", e.kind),
        name: String::new(),
    }
}

fn mbr_partitions(dev: &dyn Device, entries: &[MbrEntry; 4]) -> Result<Vec<Partition>> {
    let mut parts = Vec::new();
    let mut extended = None;
    for (i, e) in entries.iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        if is_extended(e.kind) {
            extended.get_or_insert(e.lba as u64);
        }
        parts.push(mbr_part(i as u32 + 1, 0, e));
    }
    if let Some(ext_start) = extended {
        parts.extend(logical_partitions(dev, ext_start)?);
    }
    Ok(parts)
}

/// Follows the EBR chain of the extended partition starting at sector `ext_start`.
fn logical_partitions(dev: &dyn Device, ext_start: u64) -> Result<Vec<Partition>> {
    let mut parts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut ebr_lba = ext_start;
    for _ in 0..MAX_LOGICAL {
        if !seen.insert(ebr_lba) || (ebr_lba + 1) * SECTOR > dev.size() {
            break;
        }
        let mut sector = [0u8; 512];
        read_exact(dev, &mut sector, ebr_lba * SECTOR)?;
        let Some(e) = parse_mbr(&sector) else { break };
        if e[0].kind != 0 && e[0].sectors != 0 {
            let number = 5 + parts.len() as u32;
            parts.push(mbr_part(number, ebr_lba, &e[0]));
        }
        if !is_extended(e[1].kind) || e[1].lba == 0 {
            break;
        }
        ebr_lba = ext_start + e[1].lba as u64;
    }
    Ok(parts)
}

/// A parsed and CRC-checked GPT header.
#[derive(Debug)]
struct GptHeader {
    entries_lba: u64,
    count: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn parse_gpt_header(b: &[u8]) -> Result<GptHeader> {
    if sub(b, 0, 8, "GPT signature")? != b"EFI PART" {
        return Err(corrupt("no GPT signature"));
    }
    let hsize = le32(b, 12)? as usize;
    if !(92..=b.len()).contains(&hsize) {
        return Err(corrupt("GPT header size out of range"));
    }
    let mut h = sub(b, 0, hsize, "GPT header")?.to_vec();
    let crc = le32(&h, 16)?;
    h[16..20].fill(0);
    if crc32fast::hash(&h) != crc {
        return Err(corrupt("GPT header CRC mismatch"));
    }
    let hdr = GptHeader {
        entries_lba: le64(b, 72)?,
        count: le32(b, 80)?,
        entry_size: le32(b, 84)?,
        entries_crc: le32(b, 88)?,
    };
    if hdr.entry_size < 128 || !hdr.entry_size.is_multiple_of(8) {
        return Err(corrupt("GPT entry size out of range"));
    }
    if hdr.count as u64 * hdr.entry_size as u64 > MAX_ENTRY_BYTES {
        return Err(corrupt("GPT entry array larger than 1 MiB"));
    }
    Ok(hdr)
}

/// Formats a mixed-endian GPT GUID the way `sgdisk` and `lsblk` print it.
fn guid_text(g: &[u8]) -> String {
    let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let d2 = u16::from_le_bytes([g[4], g[5]]);
    let d3 = u16::from_le_bytes([g[6], g[7]]);
    format!(
        "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{}",
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The used entries of a GPT entry array.
fn parse_gpt_entries(arr: &[u8], entry_size: usize, sector: u64) -> Result<Vec<Partition>> {
    let mut parts = Vec::new();
    for (i, e) in arr.chunks_exact(entry_size).enumerate() {
        let kind = sub(e, 0, 16, "GPT entry")?;
        if kind.iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32)?, le64(e, 40)?);
        if last < first {
            continue;
        }
        let start = first.checked_mul(sector);
        let len = (last - first)
            .checked_add(1)
            .and_then(|n| n.checked_mul(sector));
        let (Some(start), Some(len)) = (start, len) else {
            continue;
        };
        let mut name = utf16le(sub(e, 56, 72, "GPT name")?);
        let nul = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        name.truncate(nul);
        parts.push(Partition {
            number: i as u32 + 1,
            start,
            len,
            kind: guid_text(kind),
            name: String::from_utf8_lossy(&name).into_owned(),
        });
    }
    Ok(parts)
}

/// Reads the GPT: primary header at LBA 1, else the backup at the last LBA; 512- and
/// 4096-byte logical sectors are both tried.
fn read_gpt(dev: &dyn Device) -> Result<Option<Vec<Partition>>> {
    for sector in [512u64, 4096] {
        let last = (dev.size() / sector).saturating_sub(1);
        for lba in [1, last] {
            if lba == 0 || (lba + 1) * sector > dev.size() {
                continue;
            }
            let mut b = vec![0u8; sector as usize];
            read_exact(dev, &mut b, lba * sector)?;
            let Ok(h) = parse_gpt_header(&b) else {
                continue;
            };
            let len = h.count as usize * h.entry_size as usize;
            let Some(off) = h.entries_lba.checked_mul(sector) else {
                continue;
            };
            if off.checked_add(len as u64).is_none_or(|e| e > dev.size()) {
                continue;
            }
            let mut arr = vec![0u8; len];
            read_exact(dev, &mut arr, off)?;
            if crc32fast::hash(&arr) != h.entries_crc {
                continue;
            }
            return Ok(Some(parse_gpt_entries(
                &arr,
                h.entry_size as usize,
                sector,
            )?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_formatting() {
        // The EFI system partition type as stored on disk.
        let g = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid_text(&g), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    }

    #[test]
    fn mbr_needs_signature_and_sane_status() {
        let mut s = [0u8; 512];
        assert!(parse_mbr(&s).is_none());
        s[510] = 0x55;
        s[511] = 0xaa;
        assert!(parse_mbr(&s).is_some());
        s[446] = 0x12;
        assert!(parse_mbr(&s).is_none());
    }
}
