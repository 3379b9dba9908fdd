//! Chunking: segment-bounded fastcdc, keyed blake3 ids and the zstd codec.
//!
//! Invariants:
//! - a chunk never crosses a segment edge, and its boundaries depend only on the segment's bytes
//!   (never on how the bytes were read);
//! - ids are blake3 keyed with the store's secret; metadata blobs use a key derived from it, so a
//!   chunk and a metadata blob with equal bytes never share an id;
//! - decoding always re-hashes: corruption is an error, never wrong bytes.

mod codec;
mod id;

pub use codec::{decode, decode_owned, encode, Codec};
pub use id::{BlobId, BlobKind, Keyer};

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ChunkError {
    #[error("invalid chunker parameters: {0}")]
    Params(String),
    #[error(
        "damaged data: blob {id} {what}; run `holdfast verify` to see which backups it affects"
    )]
    Corrupt { id: BlobId, what: String },
    #[error("invalid blob id {0:?}: expected 64 hex digits")]
    BadId(String),
}

/// How disks are cut. Stored in the store's `config`; fixed for the life of a store.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkerParams {
    pub segment_size: u32,
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            segment_size: 4 << 20,
            min_size: 16 << 10,
            avg_size: 64 << 10,
            max_size: 256 << 10,
        }
    }
}

impl ChunkerParams {
    pub fn validate(&self) -> Result<(), ChunkError> {
        use fastcdc::v2020 as f;
        let err = |m: &str| Err(ChunkError::Params(m.to_string()));
        if !(f::MINIMUM_MIN..=f::MINIMUM_MAX).contains(&self.min_size)
            || !(f::AVERAGE_MIN..=f::AVERAGE_MAX).contains(&self.avg_size)
            || !(f::MAXIMUM_MIN..=f::MAXIMUM_MAX).contains(&self.max_size)
        {
            return err(
                "sizes out of range (min 64 B..1 MiB, avg 256 B..4 MiB, max 1 KiB..16 MiB)",
            );
        }
        if !(self.min_size <= self.avg_size && self.avg_size <= self.max_size) {
            return err("need min <= avg <= max");
        }
        if !self.segment_size.is_power_of_two()
            || self.segment_size < self.max_size
            || self.segment_size > (64 << 20)
        {
            return err(
                "segment size must be a power of two between the max chunk size and 64 MiB",
            );
        }
        Ok(())
    }

    /// Cut one segment's bytes into chunks: `(offset, length)` pairs covering `data` exactly.
    pub fn cut(&self, data: &[u8]) -> Vec<(usize, usize)> {
        if data.is_empty() {
            return Vec::new();
        }
        fastcdc::v2020::FastCDC::new(data, self.min_size, self.avg_size, self.max_size)
            .map(|c| (c.offset, c.length))
            .collect()
    }
}

/// True when every byte is zero (fast path over u64 words).
pub fn is_zero(data: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64, so the aligned middle of the byte slice may be
    // read as u64 words; `align_to` hands back the unaligned ends as bytes.
    let (pre, mid, post) = unsafe { data.align_to::<u64>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_params_are_valid() {
        ChunkerParams::default().validate().unwrap();
        assert!(ChunkerParams {
            min_size: 1 << 20,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(ChunkerParams {
            segment_size: 3 << 20,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 10_001];
        assert!(is_zero(&v[1..]));
        v[9_999] = 1;
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&[]));
    }

    proptest! {
        // Chunk boundaries depend only on the bytes: cutting a segment assembled from reads of any
        // sizes gives the same chunks, and the chunks tile the segment exactly.
        #[test]
        fn boundaries_ignore_read_splits(seed in any::<u64>(), splits in proptest::collection::vec(1usize..70_000, 1..20)) {
            let p = ChunkerParams { segment_size: 1 << 20, min_size: 4096, avg_size: 16384, max_size: 65536 };
            let mut data = vec![0u8; 600_000];
            let mut x = seed | 1;
            for b in data.iter_mut() { x ^= x << 13; x ^= x >> 7; x ^= x << 17; *b = (x >> 24) as u8; }
            let mut assembled = Vec::new();
            let mut pos = 0;
            for s in splits.iter().cycle() {
                if pos >= data.len() { break; }
                let end = (pos + s).min(data.len());
                assembled.extend_from_slice(&data[pos..end]);
                pos = end;
            }
            let a = p.cut(&data);
            prop_assert_eq!(&a, &p.cut(&assembled));
            let mut next = 0;
            for (o, l) in &a { prop_assert_eq!(*o, next); prop_assert!(*l <= 65536); next += l; }
            prop_assert_eq!(next, data.len());
        }
    }
}
