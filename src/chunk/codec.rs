//! zstd codec: blobs are stored compressed, or raw when compression does not help.

use super::{BlobId, BlobKind, ChunkError, Keyer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl Codec {
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
}

/// Compress `data` at `level`; keep it raw unless that saves at least 1/32 of its size.
pub fn encode(data: &[u8], level: i32) -> (Codec, Vec<u8>) {
    let out = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
        }
        c.as_mut().and_then(|(_, z)| z.compress(data).ok())
    });
    match out {
        Some(z) if z.len() + data.len() / 32 < data.len() => (Codec::Zstd, z),
        _ => (Codec::Raw, data.to_vec()),
    }
}

/// Decode a stored blob and check that it hashes to `id`.
pub fn decode(
    keyer: &Keyer,
    kind: BlobKind,
    id: &BlobId,
    codec: Codec,
    stored: &[u8],
    raw_len: usize,
) -> Result<Vec<u8>, ChunkError> {
    match codec {
        Codec::Raw => check(keyer, kind, id, stored.to_vec(), raw_len),
        Codec::Zstd => check(keyer, kind, id, decompress(id, stored, raw_len)?, raw_len),
    }
}

/// [`decode`] of a buffer it may keep: a raw blob is checked in place, not copied.
pub fn decode_owned(
    keyer: &Keyer,
    kind: BlobKind,
    id: &BlobId,
    codec: Codec,
    stored: Vec<u8>,
    raw_len: usize,
) -> Result<Vec<u8>, ChunkError> {
    match codec {
        Codec::Raw => check(keyer, kind, id, stored, raw_len),
        Codec::Zstd => check(keyer, kind, id, decompress(id, &stored, raw_len)?, raw_len),
    }
}

fn decompress(id: &BlobId, stored: &[u8], raw_len: usize) -> Result<Vec<u8>, ChunkError> {
    DECOMPRESSOR
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = zstd::bulk::Decompressor::new().ok();
            }
            let d = d.as_mut().ok_or_else(|| "no zstd context".to_string())?;
            d.decompress(stored, raw_len).map_err(|e| e.to_string())
        })
        .map_err(|e| ChunkError::Corrupt {
            id: *id,
            what: format!("does not decompress ({e})"),
        })
}

/// `data` if it has `raw_len` bytes and hashes to `id`.
fn check(
    keyer: &Keyer,
    kind: BlobKind,
    id: &BlobId,
    data: Vec<u8>,
    raw_len: usize,
) -> Result<Vec<u8>, ChunkError> {
    let corrupt = |what: String| ChunkError::Corrupt { id: *id, what };
    if data.len() != raw_len {
        return Err(corrupt(format!(
            "has {} bytes, expected {raw_len}",
            data.len()
        )));
    }
    if keyer.id(kind, &data) != *id {
        return Err(corrupt("does not match its hash".to_string()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..20_000), zeros in 0usize..50_000, level in 1i32..4) {
            let mut data = data;
            data.extend(std::iter::repeat_n(0u8, zeros));
            let k = Keyer::new([7; 32]);
            let id = k.id(BlobKind::Chunk, &data);
            let (codec, stored) = encode(&data, level);
            prop_assert_eq!(decode(&k, BlobKind::Chunk, &id, codec, &stored, data.len()).unwrap(), data);
        }
    }

    #[test]
    fn flipped_byte_is_an_error() {
        let k = Keyer::new([1; 32]);
        let data = vec![5u8; 100_000];
        let id = k.id(BlobKind::Chunk, &data);
        let (codec, mut stored) = encode(&data, 1);
        assert_eq!(codec, Codec::Zstd);
        let n = stored.len() / 2;
        stored[n] ^= 0x40;
        assert!(matches!(
            decode(&k, BlobKind::Chunk, &id, codec, &stored, data.len()),
            Err(ChunkError::Corrupt { .. })
        ));
        let mut raw = data.clone();
        raw[10] = 6;
        assert!(decode(&k, BlobKind::Chunk, &id, Codec::Raw, &raw, data.len()).is_err());
        assert!(k.id(BlobKind::SegList, &data) != id);
    }
}
