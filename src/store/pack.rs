//! Packs: many blobs followed by a footer that indexes them.
//!
//! ```text
//! "HFPACK01"                                   8-byte header
//! blob 0 | blob 1 | ...                         stored (compressed) bytes
//! entry 0 | entry 1 | ...                       ENTRY_LEN bytes each (see `PackEntry`)
//! entries_len u32 LE | blake3(entries) 32 B | "HFPKEND1"   trailer (TRAILER_LEN bytes)
//! ```
//! A pack is written once under `packs/<first two hex digits>/<pack id>` and never modified.
//! Footers are parsed with checked arithmetic: a damaged pack is an error, never a panic.

use super::{ObjectStore, StoreError, StoreResult};

pub const HEADER: &[u8; 8] = b"HFPACK01";
pub const END_MAGIC: &[u8; 8] = b"HFPKEND1";
pub const ENTRY_LEN: usize = 32 + 1 + 1 + 8 + 4 + 4;
pub const TRAILER_LEN: usize = 4 + 32 + 8;

/// One blob in a pack. `kind` and `codec` are opaque bytes here; the chunk module gives them meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: [u8; 32],
    pub kind: u8,
    pub codec: u8,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl PackEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id);
        out.push(self.kind);
        out.push(self.codec);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != ENTRY_LEN {
            return None;
        }
        Some(PackEntry {
            id: b[0..32].try_into().ok()?,
            kind: b[32],
            codec: b[33],
            offset: u64::from_le_bytes(b[34..42].try_into().ok()?),
            stored_len: u32::from_le_bytes(b[42..46].try_into().ok()?),
            raw_len: u32::from_le_bytes(b[46..50].try_into().ok()?),
        })
    }
}

pub fn pack_key(pack_id: &str) -> String {
    format!("packs/{}/{}", &pack_id[..2.min(pack_id.len())], pack_id)
}

/// The pack id from a key written by `pack_key`.
pub fn pack_id_of_key(key: &str) -> Option<&str> {
    let id = key.strip_prefix("packs/")?.split('/').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Builds one pack in memory.
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PackWriter {
    pub fn new() -> Self {
        PackWriter {
            buf: HEADER.to_vec(),
            entries: Vec::new(),
        }
    }

    /// A writer whose buffer never reallocates below `bytes` (no doubling past the target).
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes);
        buf.extend_from_slice(HEADER);
        PackWriter {
            buf,
            entries: Vec::new(),
        }
    }

    pub fn add(
        &mut self,
        id: [u8; 32],
        kind: u8,
        codec: u8,
        stored: &[u8],
        raw_len: u32,
    ) -> &PackEntry {
        let offset = self.buf.len() as u64;
        self.buf.extend_from_slice(stored);
        self.entries.push(PackEntry {
            id,
            kind,
            codec,
            offset,
            stored_len: stored.len() as u32,
            raw_len,
        });
        self.entries.last().expect("just pushed")
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The finished pack bytes and its entries.
    pub fn finish(mut self) -> (Vec<u8>, Vec<PackEntry>) {
        let start = self.buf.len();
        for e in &self.entries {
            e.encode(&mut self.buf);
        }
        let entries_len = (self.buf.len() - start) as u32;
        let digest = *blake3::hash(&self.buf[start..]).as_bytes();
        self.buf.extend_from_slice(&entries_len.to_le_bytes());
        self.buf.extend_from_slice(&digest);
        self.buf.extend_from_slice(END_MAGIC);
        (self.buf, self.entries)
    }
}

/// Parse the trailer (the last TRAILER_LEN bytes): the length of the entry table.
pub fn parse_trailer(t: &[u8]) -> Option<(u32, [u8; 32])> {
    if t.len() != TRAILER_LEN || &t[36..44] != END_MAGIC {
        return None;
    }
    Some((
        u32::from_le_bytes(t[0..4].try_into().ok()?),
        t[4..36].try_into().ok()?,
    ))
}

/// Parse and check an entry table against the pack's size.
pub fn parse_entries(
    table: &[u8],
    digest: &[u8; 32],
    pack_size: u64,
) -> Result<Vec<PackEntry>, String> {
    if blake3::hash(table).as_bytes() != digest {
        return Err("footer checksum mismatch".into());
    }
    if !table.len().is_multiple_of(ENTRY_LEN) {
        return Err("footer length is not a whole number of entries".into());
    }
    let data_end = pack_size
        .checked_sub((table.len() + TRAILER_LEN) as u64)
        .ok_or("footer longer than the pack")?;
    let mut out = Vec::with_capacity(table.len() / ENTRY_LEN);
    for raw in table.chunks_exact(ENTRY_LEN) {
        let e = PackEntry::decode(raw).ok_or("bad entry")?;
        let end = e
            .offset
            .checked_add(u64::from(e.stored_len))
            .ok_or("entry overflows")?;
        if e.offset < HEADER.len() as u64 || end > data_end {
            return Err(format!(
                "entry at {} (+{}) lies outside the data area",
                e.offset, e.stored_len
            ));
        }
        out.push(e);
    }
    Ok(out)
}

/// Read a pack's footer from a store with two range reads.
pub fn read_footer(store: &dyn ObjectStore, key: &str) -> StoreResult<Vec<PackEntry>> {
    let size = store.size(key)?;
    let corrupt = |what: String| StoreError::Corrupt {
        key: key.to_string(),
        what,
    };
    if size < (HEADER.len() + TRAILER_LEN) as u64 {
        return Err(corrupt("too short to be a pack".into()));
    }
    let trailer = store.get_range(key, size - TRAILER_LEN as u64, TRAILER_LEN)?;
    let (len, digest) = parse_trailer(&trailer).ok_or_else(|| corrupt("no pack trailer".into()))?;
    let table_start = (size - TRAILER_LEN as u64)
        .checked_sub(u64::from(len))
        .filter(|s| *s >= HEADER.len() as u64)
        .ok_or_else(|| corrupt("footer longer than the pack".into()))?;
    let table = store.get_range(key, table_start, len as usize)?;
    parse_entries(&table, &digest, size).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;
    use proptest::prelude::*;

    #[test]
    fn write_and_read_footer() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path());
        let mut w = PackWriter::new();
        w.add([1; 32], 0, 1, b"abc", 10);
        w.add([2; 32], 1, 0, b"defgh", 5);
        let (bytes, entries) = w.finish();
        s.put(&pack_key("00112233445566778899aabbccddeeff"), &bytes)
            .unwrap();
        let got = read_footer(&s, "packs/00/00112233445566778899aabbccddeeff").unwrap();
        assert_eq!(got, entries);
        assert_eq!(
            s.get_range(
                "packs/00/00112233445566778899aabbccddeeff",
                got[1].offset,
                5
            )
            .unwrap(),
            b"defgh"
        );
        assert_eq!(
            pack_id_of_key("packs/00/00112233445566778899aabbccddeeff"),
            Some("00112233445566778899aabbccddeeff")
        );
    }

    proptest! {
        // Any bytes as a footer: an error or a valid table, never a panic or an out-of-bounds entry.
        #[test]
        fn hostile_footers(table in proptest::collection::vec(any::<u8>(), 0..300), size in 0u64..1000) {
            let digest = *blake3::hash(&table).as_bytes();
            if let Ok(es) = parse_entries(&table, &digest, size) {
                for e in es { prop_assert!(e.offset + u64::from(e.stored_len) <= size); }
            }
            let _ = parse_trailer(&table);
        }
    }
}
