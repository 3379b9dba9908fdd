//! One NTFS file assembled from its base record, its extension records (through
//! `$ATTRIBUTE_LIST`) and the attributes this reader uses.

use std::collections::BTreeSet;

use super::record::{self, Attribute, Body, Run};
use super::{Ntfs, MAX_LIST_RECORDS, MAX_RUNS};
use crate::guestfs::bytes::{le16, le32, le64, sub, utf16le};
use crate::guestfs::error::{corrupt, GuestFsError, Result};
use crate::guestfs::{Kind, Time};

/// An attribute value as a byte stream: inline bytes or runs.
#[derive(Clone, Debug, Default)]
pub(super) struct Stream {
    pub size: u64,
    pub allocated: u64,
    pub init: u64,
    pub flags: u16,
    pub resident: Option<Vec<u8>>,
    pub runs: Vec<Run>,
}

/// What this reader keeps of one file.
#[derive(Debug)]
pub(super) struct File {
    pub rn: u64,
    pub kind: Kind,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Time,
    pub data: Option<Stream>,
    pub index_root: Option<Vec<u8>>,
    pub index_alloc: Option<Stream>,
    pub index_bitmap: Option<Vec<u8>>,
    pub link: Option<Vec<u8>>,
}

impl File {
    /// Cache cost: about one unit per 64 runs held.
    pub fn cost(&self) -> usize {
        let runs = |s: &Option<Stream>| s.as_ref().map_or(0, |s| s.runs.len());
        (runs(&self.data) + runs(&self.index_alloc)) / 64
    }
}

/// Largest attribute list, bitmap or reparse value read.
const MAX_SMALL_VALUE: u64 = 1 << 20;
const TAG_SYMLINK: u32 = 0xa000_000c;
const TAG_MOUNT_POINT: u32 = 0xa000_0003;

/// Merges every attribute of type `ty` named `name` into one stream: a resident value, or
/// the runs of all its extents in VCN order (sizes come from the first extent).
pub(super) fn unnamed_stream(attrs: &[Attribute], ty: u32, name: &[u8]) -> Result<Option<Stream>> {
    let mut parts: Vec<&Attribute> = attrs
        .iter()
        .filter(|a| a.ty == ty && a.name == name)
        .collect();
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    if let Body::Resident(v) = &first.body {
        let len = v.len() as u64;
        return Ok(Some(Stream {
            size: len,
            allocated: 0,
            init: len,
            flags: first.flags,
            resident: Some(v.clone()),
            runs: Vec::new(),
        }));
    }
    parts.sort_by_key(|a| match &a.body {
        Body::NonResident { start_vcn, .. } => *start_vcn,
        Body::Resident(_) => u64::MAX,
    });
    let mut s = Stream::default();
    let mut next_vcn = 0u64;
    for (i, p) in parts.iter().enumerate() {
        let Body::NonResident {
            start_vcn,
            runs,
            alloc,
            size,
            init,
            compressed,
        } = &p.body
        else {
            return Err(corrupt("resident and non-resident extents mixed"));
        };
        if *start_vcn != next_vcn {
            return Err(corrupt("attribute extents leave a gap"));
        }
        if i == 0 {
            s = Stream {
                size: *size,
                allocated: compressed.unwrap_or(*alloc),
                init: (*init).min(*size),
                flags: p.flags,
                resident: None,
                runs: Vec::new(),
            };
        }
        if s.runs.len() + runs.len() > MAX_RUNS {
            return Err(GuestFsError::TooLarge("stream has too many runs".into()));
        }
        s.runs.extend_from_slice(runs);
        next_vcn = runs.last().map_or(next_vcn, |r| r.vcn + r.len);
    }
    Ok(Some(s))
}

/// The whole value of an attribute, up to [`MAX_SMALL_VALUE`] bytes.
fn small_value(fs: &Ntfs, attrs: &[Attribute], ty: u32, name: &[u8]) -> Result<Option<Vec<u8>>> {
    let Some(s) = unnamed_stream(attrs, ty, name)? else {
        return Ok(None);
    };
    if s.size > MAX_SMALL_VALUE {
        return Err(GuestFsError::TooLarge(format!(
            "attribute {ty:#x} of {} bytes",
            s.size
        )));
    }
    let mut v = vec![0u8; s.size as usize];
    fs.read_stream(&s, 0, &mut v, true)?;
    Ok(Some(v))
}

/// Record numbers named by an attribute list, other than `rn` itself.
fn list_records(list: &[u8], rn: u64) -> Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    let mut at = 0usize;
    while at + 26 <= list.len() {
        let len = le16(list, at + 4)? as usize;
        if len < 26 || at + len > list.len() {
            return Err(corrupt("attribute list entry length"));
        }
        let r = le64(list, at + 16)? & 0xffff_ffff_ffff;
        if r != rn {
            out.insert(r);
            if out.len() > MAX_LIST_RECORDS {
                return Err(GuestFsError::TooLarge(
                    "attribute list names too many records".into(),
                ));
            }
        }
        at += len;
    }
    Ok(out)
}

/// Loads file record `rn` with its extension records.
pub(super) fn load(fs: &Ntfs, rn: u64) -> Result<File> {
    let rec = record::parse_record(&fs.raw_record(rn)?, MAX_RUNS)?;
    if rec.flags & record::RECORD_IN_USE == 0 || rec.base != 0 {
        return Err(GuestFsError::NotFound);
    }
    let mut attrs = rec.attrs;
    if let Some(list) = small_value(fs, &attrs, 0x20, b"")? {
        for ext in list_records(&list, rn)? {
            let r = record::parse_record(&fs.raw_record(ext)?, MAX_RUNS)?;
            if r.base != rn || r.flags & record::RECORD_IN_USE == 0 {
                return Err(corrupt(format!(
                    "extension record {ext} does not belong to {rn}"
                )));
            }
            attrs.extend(r.attrs.into_iter().filter(|a| a.ty != 0x20));
        }
    }
    let si = attrs.iter().find_map(|a| match (&a.ty, &a.body) {
        (0x10, Body::Resident(v)) => Some(v.clone()),
        _ => None,
    });
    let time = |off: usize| {
        si.as_ref()
            .and_then(|v| le64(v, off).ok())
            .map_or(Time::default(), record::nt_time)
    };
    let file_attrs = si.as_ref().and_then(|v| le32(v, 32).ok()).unwrap_or(0);
    let nlink = attrs
        .iter()
        .filter_map(|a| match (&a.ty, &a.body) {
            (0x30, Body::Resident(v)) => record::parse_file_name(v).ok(),
            _ => None,
        })
        .filter(|n| n.namespace != record::NAMESPACE_DOS)
        .count() as u32;
    let mut f = File {
        rn,
        kind: if rec.flags & record::RECORD_DIR != 0 {
            Kind::Dir
        } else {
            Kind::File
        },
        nlink,
        rdev: 0,
        crtime: time(0),
        mtime: time(8),
        ctime: time(16),
        atime: time(24),
        data: unnamed_stream(&attrs, 0x80, b"")?,
        index_root: small_value(fs, &attrs, 0x90, b"$I30")?,
        index_alloc: unnamed_stream(&attrs, 0xa0, b"$I30")?,
        index_bitmap: small_value(fs, &attrs, 0xb0, b"$I30")?,
        link: None,
    };
    if let Some(rp) = small_value(fs, &attrs, 0xc0, b"")? {
        reparse(&mut f, &rp)?;
    } else if file_attrs & record::FILE_ATTR_SYSTEM != 0 && f.kind == Kind::File {
        interix(fs, &mut f)?;
    }
    Ok(f)
}

/// Symlinks and junctions stored as reparse points. Other tags whose data lives outside the
/// unnamed stream (deduplication, WOF compression) make the data unreadable.
fn reparse(f: &mut File, rp: &[u8]) -> Result<()> {
    let tag = le32(rp, 0)?;
    let (buf_at, sub_off, print_off) = match tag {
        TAG_SYMLINK => (20, 8, 12),
        TAG_MOUNT_POINT => (16, 8, 12),
        0x8000_0013 | 0x8000_0017 => {
            f.data.get_or_insert_with(Stream::default).flags |= record::FLAG_ENCRYPTED;
            return Ok(());
        }
        _ => return Ok(()),
    };
    let name = |at: usize| -> Result<Vec<u8>> {
        let (off, len) = (le16(rp, at)? as usize, le16(rp, at + 2)? as usize);
        Ok(utf16le(sub(rp, buf_at + off, len, "reparse name")?))
    };
    let mut target = name(print_off)?;
    if target.is_empty() {
        target = name(sub_off)?;
    }
    for b in target.iter_mut() {
        if *b == b'\\' {
            *b = b'/';
        }
    }
    f.kind = Kind::Symlink;
    f.link = Some(target);
    Ok(())
}

/// Interix (SFU) special files as ntfs-3g writes them: system files whose data starts with a
/// type tag; an empty system file is a FIFO and a one-byte one a socket.
fn interix(fs: &Ntfs, f: &mut File) -> Result<()> {
    let Some(data) = &f.data else { return Ok(()) };
    if data.size > 8 + 2 * 4096 {
        return Ok(());
    }
    let mut v = vec![0u8; data.size as usize];
    fs.read_stream(data, 0, &mut v, true)?;
    match v.get(..8) {
        Some(b"IntxLNK\x01") => {
            f.kind = Kind::Symlink;
            f.link = Some(utf16le(&v[8..]));
        }
        Some(b"IntxCHR\0") | Some(b"IntxBLK\0") => {
            let (major, minor) = (le64(&v, 8)? as u32, le64(&v, 16)? as u32);
            f.kind = if v[4] == b'C' {
                Kind::CharDev
            } else {
                Kind::BlockDev
            };
            f.rdev = (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12);
        }
        _ if v.is_empty() => f.kind = Kind::Fifo,
        _ if v.len() == 1 => f.kind = Kind::Socket,
        _ => {}
    }
    Ok(())
}
