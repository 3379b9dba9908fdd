//! FAT directory entries: pure parsing of 32-byte short entries and VFAT long names.

use crate::guestfs::bytes::{le16, le32, sub};
use crate::guestfs::error::Result;
use crate::guestfs::Time;

/// A short (8.3) directory entry: the one that carries the attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Short {
    pub name: [u8; 11],
    pub attr: u8,
    pub case: u8,
    pub ctime_tenth: u8,
    pub ctime: u16,
    pub cdate: u16,
    pub adate: u16,
    pub mtime: u16,
    pub mdate: u16,
    pub cluster: u32,
    pub size: u32,
}

pub(super) const ATTR_RO: u8 = 0x01;
pub(super) const ATTR_VOLUME: u8 = 0x08;
pub(super) const ATTR_DIR: u8 = 0x10;
const ATTR_LFN: u8 = 0x0f;

/// Parses one 32-byte entry as a short entry.
pub(super) fn parse_short(e: &[u8]) -> Result<Short> {
    let e = sub(e, 0, 32, "directory entry")?;
    let mut name = [0u8; 11];
    name.copy_from_slice(sub(e, 0, 11, "short name")?);
    Ok(Short {
        name,
        attr: e[11],
        case: e[12],
        ctime_tenth: e[13],
        ctime: le16(e, 14)?,
        cdate: le16(e, 16)?,
        adate: le16(e, 18)?,
        mtime: le16(e, 22)?,
        mdate: le16(e, 24)?,
        cluster: (le16(e, 20)? as u32) << 16 | le16(e, 26)? as u32,
        size: le32(e, 28)?,
    })
}

impl Short {
    pub fn is_dir(&self) -> bool {
        self.attr & ATTR_DIR != 0
    }

    /// Whether this slot holds a live file or directory (not free, deleted, a long-name
    /// part or a volume label).
    pub fn is_live(&self) -> bool {
        !matches!(self.name[0], 0x00 | 0xe5) && self.attr & ATTR_VOLUME == 0
    }

    /// The 8.3 name as shown by Linux: trailing spaces dropped, NT lower-case flags applied,
    /// code page 437 decoded.
    pub fn display(&self) -> Vec<u8> {
        let mut raw = self.name;
        if raw[0] == 0x05 {
            raw[0] = 0xe5;
        }
        let part = |b: &[u8], lower: bool| -> String {
            let end = b.iter().rposition(|&c| c != b' ').map_or(0, |p| p + 1);
            b[..end]
                .iter()
                .map(|&c| {
                    let ch = cp437(c);
                    if lower {
                        ch.to_ascii_lowercase()
                    } else {
                        ch
                    }
                })
                .collect()
        };
        let base = part(&raw[..8], self.case & 0x08 != 0);
        let ext = part(&raw[8..], self.case & 0x10 != 0);
        if ext.is_empty() {
            base.into_bytes()
        } else {
            format!("{base}.{ext}").into_bytes()
        }
    }
}

/// Code page 437, the DOS default for short names.
fn cp437(c: u8) -> char {
    const HIGH: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}";
    if c < 0x80 {
        c as char
    } else {
        HIGH.chars().nth((c - 0x80) as usize).unwrap_or('?')
    }
}

/// The checksum of a short name that its long-name entries carry.
fn checksum(name: &[u8; 11]) -> u8 {
    name.iter().fold(0u8, |s, &c| {
        ((s & 1) << 7).wrapping_add(s >> 1).wrapping_add(c)
    })
}

/// One live entry: its display name, its index (in 32-byte slots) in the directory data, and
/// its short entry.
pub(super) type Entry = (Vec<u8>, usize, Short);

/// Parses a directory's bytes into live entries (without `.` and `..`), joining VFAT long
/// names to their short entry when sequence and checksum agree.
pub(super) fn parse_dir(data: &[u8]) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    // Long-name parts collected so far: (checksum, next expected ordinal, UTF-16 units by slot).
    let mut lfn: Option<(u8, u8, Vec<[u16; 13]>)> = None;
    for (idx, e) in data.chunks_exact(32).enumerate() {
        if e[0] == 0 {
            break;
        }
        if e[11] & 0x3f == ATTR_LFN && e[0] != 0xe5 {
            let ord = e[0] & 0x1f;
            let mut units = [0u16; 13];
            for (k, off) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                .iter()
                .enumerate()
            {
                units[k] = le16(e, *off)?;
            }
            lfn = match lfn.take() {
                _ if e[0] & 0x40 != 0 && (1..=20).contains(&ord) => {
                    Some((e[13], ord - 1, vec![units]))
                }
                Some((sum, next, mut parts)) if ord == next && ord >= 1 && sum == e[13] => {
                    parts.push(units);
                    Some((sum, ord - 1, parts))
                }
                _ => None,
            };
            continue;
        }
        let short = parse_short(e)?;
        let long = lfn.take();
        if !short.is_live() || short.name[0] == b'.' {
            continue;
        }
        let name = match long {
            Some((sum, 0, parts)) if sum == checksum(&short.name) => long_name(&parts),
            _ => short.display(),
        };
        out.push((name, idx, short));
    }
    Ok(out)
}

/// Joins long-name parts (stored last part first) up to the NUL terminator.
fn long_name(parts: &[[u16; 13]]) -> Vec<u8> {
    let units: Vec<u16> = parts
        .iter()
        .rev()
        .flatten()
        .copied()
        .take_while(|&u| u != 0)
        .collect();
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect::<String>()
        .into_bytes()
}

/// Days from 1970-01-01 to a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A FAT date and time (taken as UTC) plus 10 ms units; invalid dates give the epoch.
pub(super) fn fat_time(date: u16, time: u16, tenths: u8) -> Time {
    let (y, m, d) = (
        1980 + (date >> 9) as i64,
        ((date >> 5) & 0xf) as u32,
        (date & 0x1f) as u32,
    );
    if !(1..=12).contains(&m) || d == 0 {
        return Time::default();
    }
    let secs_of_day =
        (time >> 11) as i64 * 3600 + ((time >> 5) & 0x3f) as i64 * 60 + (time & 0x1f) as i64 * 2;
    let tenths = tenths.min(199) as i64;
    Time {
        secs: days_from_civil(y, m, d) * 86_400 + secs_of_day + tenths / 100,
        nanos: ((tenths % 100) * 10_000_000) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        // 2024-02-29 13:45:30
        let date = ((2024 - 1980) << 9) | (2 << 5) | 29;
        let time = (13 << 11) | (45 << 5) | 15;
        assert_eq!(
            fat_time(date, time, 150),
            Time {
                secs: 1_709_214_330 + 1,
                nanos: 500_000_000
            }
        );
        assert_eq!(fat_time(0, 0, 0), Time::default());
    }

    #[test]
    fn short_names() {
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(b"README  TXT");
        e[12] = 0x08;
        let s = parse_short(&e).unwrap();
        assert_eq!(s.display(), b"readme.TXT");
        assert_eq!(checksum(b"README  TXT"), checksum(&s.name));
        e[0] = 0x80;
        assert_eq!(parse_short(&e).unwrap().display(), "Çeadme.TXT".as_bytes());
    }
}
