//! Packs: many blobs followed by a footer that indexes them.
//!
//! ```text
//! "HFPACK02"                                   8-byte header
//! blob header 0 | blob 0 | blob header 1 | blob 1 | ...
//!                                              a blob header (BLOB_HEADER_LEN bytes) is
//!                                              "HFB1", id, kind, codec, stored_len, raw_len,
//!                                              crc32 of the 46 bytes before; then the stored
//!                                              (compressed) bytes
//! entry 0 | entry 1 | ...                       ENTRY_LEN bytes each (see `PackEntry`)
//! entries_len u32 LE | blake3(entries) 32 B | "HFPKEND1"   trailer (TRAILER_LEN bytes)
//! ```
//! Entries point at a blob's stored bytes (after its header). The blob headers let a pack
//! whose footer was lost (a truncated upload or file) give back its intact blobs
//! ([`scan_blobs`]); packs of format 1 (`HFPACK01`, no blob headers) are still read through
//! their footers.
//! A pack is written once under `packs/<first two hex digits>/<pack id>` and never modified.
//!
//! Packs of an encrypted store (format 3, `HFPACK03`) have no blob headers: each blob is
//! sealed on its own (`nonce || ciphertext || tag`, bound to its kind and id, so blobs cannot
//! be swapped), and the entry table is sealed as a whole (bound to the pack id, so tables
//! cannot move between packs); the trailer is the same, over the sealed table. Such a pack
//! shows only its size and how many bytes each blob takes.
//! Footers are parsed with checked arithmetic: a damaged pack is an error, never a panic.

use super::{ObjectStore, StoreError, StoreResult};
use crate::crypto::{Keys, Purpose};
use std::sync::Arc;

/// The header packs are written with.
pub const HEADER: &[u8; 8] = b"HFPACK02";
/// Packs of format 1: no blob headers.
pub const HEADER_V1: &[u8; 8] = b"HFPACK01";
/// Packs of an encrypted store: sealed blobs, a sealed entry table.
pub const HEADER_SEALED: &[u8; 8] = b"HFPACK03";

/// What a sealed blob is bound to: its kind and id.
pub fn blob_ad(kind: u8, id: &[u8; 32]) -> Vec<u8> {
    let mut ad = b"holdfast blob\0".to_vec();
    ad.push(kind);
    ad.extend_from_slice(id);
    ad
}

/// What a sealed entry table is bound to: its pack.
fn table_ad(pack_id: &[u8; 16]) -> Vec<u8> {
    let mut ad = b"holdfast pack entries\0".to_vec();
    ad.extend_from_slice(pack_id);
    ad
}
pub const BLOB_MAGIC: &[u8; 4] = b"HFB1";
pub const BLOB_HEADER_LEN: usize = 4 + 32 + 1 + 1 + 4 + 4 + 4;
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
    /// An encrypted store's keys: blobs and the entry table are sealed.
    keys: Option<Arc<Keys>>,
}

impl Default for PackWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PackWriter {
    pub fn new() -> Self {
        Self::with_capacity(0, None)
    }

    /// A writer whose buffer never reallocates below `bytes` (no doubling past the target);
    /// with `keys`, a sealed pack.
    pub fn with_capacity(bytes: usize, keys: Option<Arc<Keys>>) -> Self {
        let mut buf = Vec::with_capacity(bytes);
        buf.extend_from_slice(if keys.is_some() {
            HEADER_SEALED
        } else {
            HEADER
        });
        PackWriter {
            buf,
            entries: Vec::new(),
            keys,
        }
    }

    /// Add a blob an encrypting pack's caller sealed already ([`seal_blob`], on its worker
    /// threads: sealing in the one thread that fills packs would make it the bottleneck).
    pub fn add_sealed(
        &mut self,
        id: [u8; 32],
        kind: u8,
        codec: u8,
        sealed: &[u8],
        raw_len: u32,
    ) -> &PackEntry {
        debug_assert!(self.keys.is_some(), "a sealed blob in a clear pack");
        self.push(id, kind, codec, sealed, raw_len)
    }

    /// Append a blob's bytes (after any header) and its entry.
    fn push(
        &mut self,
        id: [u8; 32],
        kind: u8,
        codec: u8,
        bytes: &[u8],
        raw_len: u32,
    ) -> &PackEntry {
        let offset = self.buf.len() as u64;
        self.buf.extend_from_slice(bytes);
        self.entries.push(PackEntry {
            id,
            kind,
            codec,
            offset,
            stored_len: bytes.len() as u32,
            raw_len,
        });
        self.entries.last().expect("just pushed")
    }

    pub fn add(
        &mut self,
        id: [u8; 32],
        kind: u8,
        codec: u8,
        stored: &[u8],
        raw_len: u32,
    ) -> &PackEntry {
        if let Some(k) = &self.keys {
            let sealed = k.seal(Purpose::Blob, &blob_ad(kind, &id), stored);
            return self.add_sealed(id, kind, codec, &sealed, raw_len);
        }
        let mut h = Vec::with_capacity(BLOB_HEADER_LEN);
        h.extend_from_slice(BLOB_MAGIC);
        h.extend_from_slice(&id);
        h.push(kind);
        h.push(codec);
        h.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        h.extend_from_slice(&raw_len.to_le_bytes());
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(&h);
        self.push(id, kind, codec, stored, raw_len)
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The finished bytes of pack `pack_id` and its entries.
    pub fn finish(mut self, pack_id: &[u8; 16]) -> (Vec<u8>, Vec<PackEntry>) {
        let start = self.buf.len();
        let mut table = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for e in &self.entries {
            e.encode(&mut table);
        }
        match &self.keys {
            Some(k) => {
                let sealed = k.seal(Purpose::Meta, &table_ad(pack_id), &table);
                self.buf.extend_from_slice(&sealed);
            }
            None => self.buf.extend_from_slice(&table),
        }
        let entries_len = (self.buf.len() - start) as u32;
        let digest = *blake3::hash(&self.buf[start..]).as_bytes();
        self.buf.extend_from_slice(&entries_len.to_le_bytes());
        self.buf.extend_from_slice(&digest);
        self.buf.extend_from_slice(END_MAGIC);
        (self.buf, self.entries)
    }
}

/// The blobs of a format-2 pack found by walking its blob headers from the start: every
/// complete blob up to the first thing that is not a blob header (the footer, or where the
/// pack was cut). For a pack whose footer is gone; each blob found must still be checked
/// against its id (its stored bytes are only as good as the pack). Format 1: none.
pub fn scan_blobs(pack: &[u8]) -> Vec<PackEntry> {
    let mut out = Vec::new();
    if pack.len() < HEADER.len() || &pack[..HEADER.len()] != HEADER {
        return out;
    }
    let mut pos = HEADER.len();
    while let Some(h) = pack.get(pos..pos + BLOB_HEADER_LEN) {
        let crc = u32::from_le_bytes([h[46], h[47], h[48], h[49]]);
        if &h[..4] != BLOB_MAGIC || crc32fast::hash(&h[..46]) != crc {
            break;
        }
        let stored_len = u32::from_le_bytes([h[38], h[39], h[40], h[41]]);
        let start = pos + BLOB_HEADER_LEN;
        let Some(end) = start
            .checked_add(stored_len as usize)
            .filter(|e| *e <= pack.len())
        else {
            break; // cut inside this blob
        };
        let mut id = [0u8; 32];
        id.copy_from_slice(&h[4..36]);
        out.push(PackEntry {
            id,
            kind: h[36],
            codec: h[37],
            offset: start as u64,
            stored_len,
            raw_len: u32::from_le_bytes([h[42], h[43], h[44], h[45]]),
        });
        pos = end;
    }
    out
}

/// A blob's stored bytes sealed for a pack of an encrypted store (bound to its kind and id).
pub fn seal_blob(keys: &Keys, kind: u8, id: &[u8; 32], stored: &[u8]) -> Vec<u8> {
    keys.seal(Purpose::Blob, &blob_ad(kind, id), stored)
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

/// Parse and check an entry table against the pack's size (with `keys`: a sealed table of
/// pack `pack_id`).
pub fn parse_entries(
    stored: &[u8],
    digest: &[u8; 32],
    pack_size: u64,
    sealed: Option<(&Keys, &[u8; 16])>,
) -> Result<Vec<PackEntry>, String> {
    if blake3::hash(stored).as_bytes() != digest {
        return Err("footer checksum mismatch".into());
    }
    let opened;
    let table = match sealed {
        Some((k, pack_id)) => {
            opened = k
                .open(Purpose::Meta, &table_ad(pack_id), stored)
                .map_err(|_| {
                    "its entry table does not authenticate (tampered with, moved from another \
                     pack, or written with another key)"
                        .to_string()
                })?;
            &opened[..]
        }
        None => stored,
    };
    if !table.len().is_multiple_of(ENTRY_LEN) {
        return Err("footer length is not a whole number of entries".into());
    }
    let data_end = pack_size
        .checked_sub((stored.len() + TRAILER_LEN) as u64)
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

/// Read a pack's footer from a store with two range reads (an encrypted store's `keys` open
/// its sealed entry table).
pub fn read_footer(
    store: &dyn ObjectStore,
    key: &str,
    keys: Option<&Keys>,
) -> StoreResult<Vec<PackEntry>> {
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
    let pack_id = pack_id_of_key(key).and_then(|h| {
        let mut id = [0u8; 16];
        hex::decode_to_slice(h, &mut id).ok().map(|_| id)
    });
    let sealed = match (keys, &pack_id) {
        (Some(k), Some(id)) => Some((k, id)),
        (Some(_), None) => return Err(corrupt("not a pack key".into())),
        (None, _) => None,
    };
    parse_entries(&table, &digest, size, sealed).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;
    use proptest::prelude::*;

    const ID: [u8; 16] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ];

    #[test]
    fn sealed_packs_show_no_ids_and_refuse_moved_tables_and_other_keys() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path());
        let keys = Arc::new(Keys::new_random());
        let mut w = PackWriter::with_capacity(0, Some(keys.clone()));
        w.add([0xab; 32], 0, 1, b"secret chunk bytes", 18);
        w.add([0xcd; 32], 2, 1, b"another blob", 12);
        let (bytes, entries) = w.finish(&ID);
        assert_eq!(&bytes[..8], HEADER_SEALED);
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!has(&[0xab; 32]) && !has(b"secret") && !has(BLOB_MAGIC));
        assert!(scan_blobs(&bytes).is_empty());
        let key = pack_key(&hex::encode(ID));
        s.put(&key, &bytes).unwrap();
        assert_eq!(read_footer(&s, &key, Some(&keys)).unwrap(), entries);
        let e = &entries[0];
        let sealed = s.get_range(&key, e.offset, e.stored_len as usize).unwrap();
        let plain = keys
            .open(Purpose::Blob, &blob_ad(0, &[0xab; 32]), &sealed)
            .unwrap();
        assert_eq!(plain, b"secret chunk bytes");
        // Bound to its id: read as the other blob, it does not open.
        assert!(keys
            .open(Purpose::Blob, &blob_ad(2, &[0xcd; 32]), &sealed)
            .is_err());
        // Another key, or the same table under another pack's name: damaged.
        let other = Keys::new_random();
        assert!(matches!(
            read_footer(&s, &key, Some(&other)),
            Err(StoreError::Corrupt { .. })
        ));
        let moved = pack_key("ff112233445566778899aabbccddeeff");
        s.put(&moved, &bytes).unwrap();
        assert!(matches!(
            read_footer(&s, &moved, Some(&keys)),
            Err(StoreError::Corrupt { .. })
        ));
        // A clear pack in an encrypted store is refused too.
        let mut w = PackWriter::new();
        w.add([1; 32], 0, 1, b"abc", 3);
        let clear = pack_key("00000000000000000000000000000001");
        s.put(&clear, &w.finish(&ID).0).unwrap();
        assert!(read_footer(&s, &clear, Some(&keys)).is_err());
    }

    #[test]
    fn write_and_read_footer() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path());
        let mut w = PackWriter::new();
        w.add([1; 32], 0, 1, b"abc", 10);
        w.add([2; 32], 1, 0, b"defgh", 5);
        let (bytes, entries) = w.finish(&ID);
        s.put(&pack_key("00112233445566778899aabbccddeeff"), &bytes)
            .unwrap();
        let got = read_footer(&s, "packs/00/00112233445566778899aabbccddeeff", None).unwrap();
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

    #[test]
    fn a_pack_cut_short_gives_back_its_complete_blobs() {
        let mut w = PackWriter::new();
        let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
        for (i, b) in blobs.iter().enumerate() {
            w.add([i as u8; 32], 0, 1, b, 4000);
        }
        let (bytes, entries) = w.finish(&ID);
        // Whole: every blob, as the footer says.
        assert_eq!(scan_blobs(&bytes), entries);
        // Cut in the middle of blob 3: blobs 0..3 come back, with the right bytes.
        let cut = entries[3].offset as usize + 10;
        let found = scan_blobs(&bytes[..cut]);
        assert_eq!(found, entries[..3]);
        for (e, b) in found.iter().zip(&blobs) {
            let at = e.offset as usize;
            assert_eq!(&bytes[at..at + e.stored_len as usize], b.as_slice());
        }
        // Cut inside a blob header; a flipped header byte stops the walk there.
        assert_eq!(
            scan_blobs(&bytes[..entries[2].offset as usize - 5]).len(),
            2
        );
        let mut bad = bytes.clone();
        bad[entries[1].offset as usize - 20] ^= 1;
        assert_eq!(scan_blobs(&bad).len(), 1);
        // Format 1 has no blob headers: nothing to scan.
        let mut v1 = bytes.clone();
        v1[..8].copy_from_slice(HEADER_V1);
        assert!(scan_blobs(&v1).is_empty());
    }

    proptest! {
        // Any bytes as a pack: scanning finds only blobs inside it, never a panic.
        #[test]
        fn hostile_packs_scan_safely(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut p = HEADER.to_vec();
            p.extend_from_slice(&tail);
            for e in scan_blobs(&p) {
                prop_assert!(e.offset + u64::from(e.stored_len) <= p.len() as u64);
            }
        }

        // Any bytes as a footer: an error or a valid table, never a panic or an out-of-bounds entry.
        #[test]
        fn hostile_footers(table in proptest::collection::vec(any::<u8>(), 0..300), size in 0u64..1000) {
            let digest = *blake3::hash(&table).as_bytes();
            if let Ok(es) = parse_entries(&table, &digest, size, None) {
                for e in es { prop_assert!(e.offset + u64::from(e.stored_len) <= size); }
            }
            let _ = parse_trailer(&table);
        }
    }
}
