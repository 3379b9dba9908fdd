//! The store's `config` object and backup manifests (JSON, versioned).

use crate::chunk::ChunkerParams;
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "holdfast-store";
/// Unencrypted stores: still read and written.
pub const VERSION: u32 = 1;
/// Encrypted stores (docs/encryption.md): no id key in the config, sealed objects and packs.
pub const VERSION_ENCRYPTED: u32 = 2;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub format: String,
    pub version: u32,
    pub chunker: ChunkerParams,
    /// Secret key for blob ids (hex, 32 bytes): unencrypted stores only (an encrypted store
    /// derives it from its master key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_key: Option<String>,
    /// A random id (hex): binds key files and wrapped keys to this store (encrypted stores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<super::keys::Encryption>,
    pub compression: Compression,
    /// Packs are closed once they reach this many bytes.
    pub pack_target: u32,
    pub created: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Compression {
    pub codec: String,
    pub level: i32,
}

impl Config {
    pub fn new(chunker: ChunkerParams, level: i32, key: [u8; 32]) -> Self {
        Config {
            format: FORMAT.into(),
            version: VERSION,
            chunker,
            id_key: Some(hex::encode(key)),
            store_id: None,
            encryption: None,
            compression: Compression {
                codec: "zstd".into(),
                level,
            },
            pack_target: 16 << 20,
            created: crate::timefmt::rfc3339(crate::timefmt::now_secs()),
        }
    }

    /// An encrypted store's config: its keys live elsewhere (`keys/`, or a key file).
    pub fn new_encrypted(
        chunker: ChunkerParams,
        level: i32,
        store_id: &str,
        encryption: super::keys::Encryption,
    ) -> Self {
        let mut c = Config::new(chunker, level, [0; 32]);
        c.version = VERSION_ENCRYPTED;
        c.id_key = None;
        c.store_id = Some(store_id.to_string());
        c.encryption = Some(encryption);
        c
    }

    /// Parse and check; the error says what is wrong (the caller adds where and what to do).
    /// The id key comes back for unencrypted stores (an encrypted one derives it).
    pub fn parse(b: &[u8]) -> Result<(Self, Option<[u8; 32]>), String> {
        let c: Config = serde_json::from_slice(b).map_err(|e| format!("not valid JSON ({e})"))?;
        if c.format != FORMAT {
            return Err(format!("format is {:?}, not {FORMAT:?}", c.format));
        }
        match (c.version, &c.encryption, &c.store_id) {
            (VERSION, None, _) => {}
            (VERSION_ENCRYPTED, Some(e), Some(_)) => {
                if e.aead != crate::crypto::AEAD {
                    return Err(format!("encryption {:?} is not supported", e.aead));
                }
            }
            (VERSION | VERSION_ENCRYPTED, _, _) => {
                return Err("its encryption settings do not match its format version".into())
            }
            (v, _, _) => {
                return Err(format!(
                    "format version {v} is not supported by this holdfast (knows \
                     {VERSION} and {VERSION_ENCRYPTED})"
                ))
            }
        }
        c.chunker.validate().map_err(|e| e.to_string())?;
        if c.compression.codec != "zstd" || !(-7..=22).contains(&c.compression.level) {
            return Err("compression must be zstd with a level from -7 to 22".into());
        }
        if !(1 << 20..=256 << 20).contains(&c.pack_target) {
            return Err("pack_target must be between 1 MiB and 256 MiB".into());
        }
        if c.encryption.is_some() {
            return Ok((c, None));
        }
        let mut key = [0u8; 32];
        hex::decode_to_slice(c.id_key.as_deref().unwrap_or(""), &mut key)
            .map_err(|_| "id_key is not 64 hex digits".to_string())?;
        Ok((c, Some(key)))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub version: u32,
    pub vm: String,
    pub id: String,
    /// Unix seconds when the backup started.
    pub time: u64,
    /// Unix milliseconds when the backup started (orders backups made in the same second).
    #[serde(default)]
    pub time_ms: u64,
    pub disks: Vec<DiskEntry>,
    pub stats: BackupStats,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DiskEntry {
    pub name: String,
    pub size: u64,
    pub segment_size: u32,
    /// Ids of the index blobs, in order (hex).
    pub index: Vec<String>,
    /// Where the disk was read from.
    pub source: String,
    /// Bytes that are data, not holes.
    pub data_bytes: u64,
    /// The dirty bitmap the backup read changed blocks from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// The backup that bitmap started from: clean segments were taken from it unread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The hypervisor's dirty bitmap started at this backup's read point: the next incremental
    /// of this disk reads the changes it records (backups from a running VM only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// The hypervisor image it was read from (`qemu node N file F`): a checkpoint is trusted
    /// only for the same node and file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The source was this many bytes when the backup had read it: it grew while it was read
    /// (the backup holds the first `size` bytes, and says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grew_to: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupStats {
    /// Bytes read from the sources.
    pub read_bytes: u64,
    /// Logical size of all disks.
    pub logical_bytes: u64,
    /// Bytes that are data (not holes).
    pub data_bytes: u64,
    /// Raw bytes of blobs this backup added to the store.
    pub new_raw_bytes: u64,
    /// Stored (compressed) bytes this backup added.
    pub new_stored_bytes: u64,
    pub new_chunks: u64,
    pub reused_chunks: u64,
    pub packs_written: u64,
    /// Segments whose bytes were seen before: their segment list came from the catalog's memo,
    /// without cutting or hashing each chunk.
    #[serde(default)]
    pub memo_segments: u64,
    pub seconds: f64,
    /// S3 requests this backup made (S3 stores only), up to the manifest upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_requests: Option<crate::store::s3::RequestCounts>,
}

impl Manifest {
    pub fn key(vm: &str, id: &str) -> String {
        format!("backups/{vm}/{id}")
    }
}
