//! Versioned value encodings of the catalog. Every value starts with a version byte.

use super::{CatalogError, CatalogResult, PackId};

pub const VERSION: u8 = 1;

pub(super) fn versioned<'a>(v: &'a [u8], cf: &'static str) -> CatalogResult<&'a [u8]> {
    match v.split_first() {
        Some((&VERSION, rest)) => Ok(rest),
        Some((other, _)) => Err(CatalogError::Value {
            cf,
            what: format!("unknown version {other}"),
        }),
        None => Err(CatalogError::Value {
            cf,
            what: "empty value".into(),
        }),
    }
}

/// Where a blob lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    pub pack: PackId,
    pub kind: u8,
    pub codec: u8,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl ChunkLoc {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(35);
        v.push(VERSION);
        v.extend_from_slice(&self.pack);
        v.push(self.kind);
        v.push(self.codec);
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.stored_len.to_le_bytes());
        v.extend_from_slice(&self.raw_len.to_le_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> CatalogResult<Self> {
        let b = versioned(v, "chunks")?;
        let bad = || CatalogError::Value {
            cf: "chunks",
            what: format!("{} bytes", b.len()),
        };
        if b.len() != 34 {
            return Err(bad());
        }
        Ok(ChunkLoc {
            pack: b[0..16].try_into().map_err(|_| bad())?,
            kind: b[16],
            codec: b[17],
            offset: u64::from_le_bytes(b[18..26].try_into().map_err(|_| bad())?),
            stored_len: u32::from_le_bytes(b[26..30].try_into().map_err(|_| bad())?),
            raw_len: u32::from_le_bytes(b[30..34].try_into().map_err(|_| bad())?),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackInfo {
    pub created: u64,
    pub size: u64,
    pub entries: u32,
}

impl PackInfo {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![VERSION];
        v.extend_from_slice(&self.created.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.entries.to_le_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> CatalogResult<Self> {
        let b = versioned(v, "packs")?;
        let bad = || CatalogError::Value {
            cf: "packs",
            what: format!("{} bytes", b.len()),
        };
        if b.len() != 20 {
            return Err(bad());
        }
        Ok(PackInfo {
            created: u64::from_le_bytes(b[0..8].try_into().map_err(|_| bad())?),
            size: u64::from_le_bytes(b[8..16].try_into().map_err(|_| bad())?),
            entries: u32::from_le_bytes(b[16..20].try_into().map_err(|_| bad())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(pack in any::<[u8; 16]>(), kind in any::<u8>(), codec in any::<u8>(), offset in any::<u64>(), s in any::<u32>(), r in any::<u32>(), c in any::<u64>(), n in any::<u32>()) {
            let l = ChunkLoc { pack, kind, codec, offset, stored_len: s, raw_len: r };
            prop_assert_eq!(ChunkLoc::decode(&l.encode()).unwrap(), l);
            let p = PackInfo { created: c, size: offset, entries: n };
            prop_assert_eq!(PackInfo::decode(&p.encode()).unwrap(), p);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(v in proptest::collection::vec(any::<u8>(), 0..60)) {
            let _ = ChunkLoc::decode(&v);
            let _ = PackInfo::decode(&v);
        }
    }

    #[test]
    fn catalog_write_read_and_concurrent_processes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog");
        super::super::Catalog::create(&p).unwrap();
        let a = super::super::Catalog::open(&p).unwrap();
        let b = super::super::Catalog::open(&p).unwrap();
        let loc = ChunkLoc {
            pack: [3; 16],
            kind: 0,
            codec: 1,
            offset: 8,
            stored_len: 10,
            raw_len: 20,
        };
        let mut batch = super::super::Batch::default();
        batch.put_chunk(&[9; 32], &loc);
        batch.put_backup("vm1", "b1", b"{}");
        a.write(batch).unwrap();
        assert_eq!(a.chunk(&[9; 32]).unwrap(), Some(loc));
        b.refresh().unwrap();
        assert_eq!(b.chunk(&[9; 32]).unwrap(), Some(loc));
        assert_eq!(
            b.backups(Some("vm1")).unwrap(),
            vec![("vm1".into(), "b1".into(), b"{}".to_vec())]
        );
        assert!(b.backups(Some("vm")).unwrap().is_empty());
    }
}
