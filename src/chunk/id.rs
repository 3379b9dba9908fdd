//! Keyed blake3 ids.

use super::ChunkError;
use std::fmt;

/// What a blob in a pack holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    /// Disk data.
    Chunk = 0,
    /// A segment list: the chunks (and holes) of one segment.
    SegList = 1,
    /// A disk index: the segment lists of a run of segments.
    Index = 2,
}

impl BlobKind {
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(BlobKind::Chunk),
            1 => Some(BlobKind::SegList),
            2 => Some(BlobKind::Index),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn parse(s: &str) -> Result<Self, ChunkError> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).map_err(|_| ChunkError::BadId(s.to_string()))?;
        Ok(BlobId(b))
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..8]))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", self.to_hex())
    }
}

/// Computes ids with the store's secret key.
#[derive(Clone)]
pub struct Keyer {
    data_key: [u8; 32],
    meta_key: [u8; 32],
    memo_key: [u8; 32],
}

impl Keyer {
    pub fn new(key: [u8; 32]) -> Self {
        let meta_key = *blake3::keyed_hash(&key, b"holdfast metadata blob key v1").as_bytes();
        let memo_key = *blake3::keyed_hash(&key, b"holdfast segment memo key v1").as_bytes();
        Keyer {
            data_key: key,
            meta_key,
            memo_key,
        }
    }

    /// The catalog's key for a whole segment's bytes (its segment-list memo).
    pub fn memo(&self, segment: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.memo_key, segment).as_bytes()
    }

    pub fn id(&self, kind: BlobKind, data: &[u8]) -> BlobId {
        let key = if kind == BlobKind::Chunk {
            &self.data_key
        } else {
            &self.meta_key
        };
        BlobId(*blake3::keyed_hash(key, data).as_bytes())
    }
}
