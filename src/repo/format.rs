//! Metadata blob formats: segment lists and disk indexes. Pure encode/decode with checked
//! arithmetic; both live in packs like chunks, so unchanged metadata costs nothing to store.
//!
//! Segment list: `v1 | n u32 | n × (tag u8 | len u32 [| id 32 if tag = 1])`, tag 0 = hole, 1 = chunk.
//! Disk index:   `v1 | first segment u64 | n u32 | n × (tag u8 [| seglist id 32 if tag = 1])`,
//!               tag 0 = a segment that is all hole.

use crate::chunk::BlobId;

const V1: u8 = 1;
/// Segments per index blob (64 GiB of disk at 4 MiB segments).
pub const SEGMENTS_PER_INDEX: usize = 16_384;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegEntry {
    Hole(u32),
    Chunk(BlobId, u32),
}

impl SegEntry {
    pub fn len(&self) -> u32 {
        match *self {
            SegEntry::Hole(l) | SegEntry::Chunk(_, l) => l,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn encode_seglist(entries: &[SegEntry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + entries.len() * 37);
    v.push(V1);
    v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        match e {
            SegEntry::Hole(l) => {
                v.push(0);
                v.extend_from_slice(&l.to_le_bytes());
            }
            SegEntry::Chunk(id, l) => {
                v.push(1);
                v.extend_from_slice(&l.to_le_bytes());
                v.extend_from_slice(&id.0);
            }
        }
    }
    v
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| "truncated")?,
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| "truncated")?,
        ))
    }
    fn id(&mut self) -> Result<BlobId, String> {
        Ok(BlobId(self.take(32)?.try_into().map_err(|_| "truncated")?))
    }
    fn version(&mut self) -> Result<(), String> {
        match self.u8()? {
            V1 => Ok(()),
            v => Err(format!("unknown format version {v}")),
        }
    }
}

/// Decode a segment list whose entries must cover exactly `segment_len` bytes.
pub fn decode_seglist(b: &[u8], segment_len: u64) -> Result<Vec<SegEntry>, String> {
    let mut r = Reader(b);
    r.version()?;
    let n = r.u32()? as usize;
    if n > b.len() {
        return Err("entry count larger than the blob".into());
    }
    let mut out = Vec::with_capacity(n);
    let mut total: u64 = 0;
    for _ in 0..n {
        let e = match r.u8()? {
            0 => SegEntry::Hole(r.u32()?),
            1 => {
                let l = r.u32()?;
                SegEntry::Chunk(r.id()?, l)
            }
            t => return Err(format!("unknown entry tag {t}")),
        };
        total = total
            .checked_add(u64::from(e.len()))
            .ok_or("length overflow")?;
        out.push(e);
    }
    if !r.0.is_empty() || total != segment_len {
        return Err(format!("covers {total} bytes, expected {segment_len}"));
    }
    Ok(out)
}

pub fn encode_index(first: u64, segs: &[Option<BlobId>]) -> Vec<u8> {
    let mut v = Vec::with_capacity(13 + segs.len() * 33);
    v.push(V1);
    v.extend_from_slice(&first.to_le_bytes());
    v.extend_from_slice(&(segs.len() as u32).to_le_bytes());
    for s in segs {
        match s {
            None => v.push(0),
            Some(id) => {
                v.push(1);
                v.extend_from_slice(&id.0);
            }
        }
    }
    v
}

/// Decode an index blob: (first segment number, segment list ids).
pub fn decode_index(b: &[u8]) -> Result<(u64, Vec<Option<BlobId>>), String> {
    let mut r = Reader(b);
    r.version()?;
    let first = r.u64()?;
    let n = r.u32()? as usize;
    if n > SEGMENTS_PER_INDEX {
        return Err(format!("{n} segments in one index blob"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(match r.u8()? {
            0 => None,
            1 => Some(r.id()?),
            t => return Err(format!("unknown index tag {t}")),
        });
    }
    if !r.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok((first, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn seglist_round_trip(lens in proptest::collection::vec((any::<bool>(), 1u32..300_000, any::<[u8; 32]>()), 0..50)) {
            let entries: Vec<SegEntry> = lens.iter().map(|(h, l, id)| if *h { SegEntry::Hole(*l) } else { SegEntry::Chunk(BlobId(*id), *l) }).collect();
            let total: u64 = entries.iter().map(|e| u64::from(e.len())).sum();
            let b = encode_seglist(&entries);
            prop_assert_eq!(decode_seglist(&b, total).unwrap(), entries);
            prop_assert!(decode_seglist(&b, total + 1).is_err());
        }

        #[test]
        fn index_round_trip(first in any::<u64>(), segs in proptest::collection::vec(proptest::option::of(any::<[u8; 32]>()), 0..100)) {
            let segs: Vec<Option<BlobId>> = segs.into_iter().map(|s| s.map(BlobId)).collect();
            prop_assert_eq!(decode_index(&encode_index(first, &segs)).unwrap(), (first, segs));
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200), len in any::<u64>()) {
            let _ = decode_seglist(&b, len);
            let _ = decode_index(&b);
        }
    }
}
