//! The catalog: a local RocksDB index over the store. The only module that names `rocksdb`.
//!
//! Everything here can be rebuilt from the store (pack footers + manifests); the store is the
//! truth. Column families:
//! - `chunks`:    blob id (32 B)        → v1 | pack id (16) | kind | codec | offset u64 | stored u32 | raw u32
//! - `packs`:     pack id (16 B)        → v1 | created secs u64 | size u64 | entries u32
//! - `backups`:   vm 0x00 backup id     → v1 | manifest JSON
//! - `condemned`: pack id (16 B)        → v1 | condemned-at millis u64
//! - `segmemo`:   memo key (32 B)       → v1 | seglist id (32) | data bytes u64 | chunks u32
//!   A cache, not part of the store's truth: the keyed hash of a whole segment's bytes → the
//!   segment list they cut into. A backup that reads an unchanged segment again skips cutting
//!   and per-chunk hashing. Rebuilt catalogs start without it; stale entries (their segment
//!   list gone by gc) are ignored by the reader.
//!
//! Several holdfast processes may run at once (backups of different VMs, gc beside a backup),
//! but RocksDB lets one process write. So every process reads through its own *secondary*
//! instance, and writes by opening the primary briefly (waiting, bounded, while another process
//! holds it), writing one atomic batch, and closing it again.

mod codec;

pub use codec::{ChunkLoc, PackInfo};

use rocksdb::{
    BottommostLevelCompaction, ColumnFamilyDescriptor, CompactOptions, IteratorMode, Options,
    WriteBatch, WriteOptions, DB,
};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;

const CFS: [&str; 5] = ["chunks", "packs", "backups", "condemned", "segmemo"];
const WRITE_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("catalog at {path}: {msg}; rebuild it from the store with `holdfast catalog rebuild`")]
    Db { path: String, msg: String },
    #[error("damaged catalog value in {cf}: {what}; run `holdfast catalog rebuild`")]
    Value { cf: &'static str, what: String },
    #[error("the catalog at {0} is busy: another holdfast process kept it for over 2 minutes; try again")]
    Busy(String),
}

pub type CatalogResult<T> = Result<T, CatalogError>;

pub type PackId = [u8; 16];

/// Catalog changes, applied atomically by `Catalog::write`.
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
}

enum Op {
    Put(&'static str, Vec<u8>, Vec<u8>),
    Delete(&'static str, Vec<u8>),
}

impl Batch {
    pub fn put_chunk(&mut self, id: &[u8; 32], loc: &ChunkLoc) {
        self.ops.push(Op::Put("chunks", id.to_vec(), loc.encode()));
    }
    pub fn delete_chunk(&mut self, id: &[u8; 32]) {
        self.ops.push(Op::Delete("chunks", id.to_vec()));
    }
    pub fn put_pack(&mut self, id: &PackId, info: &PackInfo) {
        self.ops.push(Op::Put("packs", id.to_vec(), info.encode()));
    }
    pub fn delete_pack(&mut self, id: &PackId) {
        self.ops.push(Op::Delete("packs", id.to_vec()));
        self.ops.push(Op::Delete("condemned", id.to_vec()));
    }
    pub fn put_backup(&mut self, vm: &str, backup: &str, manifest: &[u8]) {
        let mut v = vec![codec::VERSION];
        v.extend_from_slice(manifest);
        self.ops.push(Op::Put("backups", backup_key(vm, backup), v));
    }
    pub fn delete_backup(&mut self, vm: &str, backup: &str) {
        self.ops.push(Op::Delete("backups", backup_key(vm, backup)));
    }
    pub fn condemn(&mut self, id: &PackId, at_millis: u64) {
        let mut v = vec![codec::VERSION];
        v.extend_from_slice(&at_millis.to_le_bytes());
        self.ops.push(Op::Put("condemned", id.to_vec(), v));
    }
    pub fn uncondemn(&mut self, id: &PackId) {
        self.ops.push(Op::Delete("condemned", id.to_vec()));
    }
    pub fn put_segmemo(&mut self, key: &[u8; 32], memo: &SegMemo) {
        let mut v = vec![codec::VERSION];
        v.extend_from_slice(&memo.seglist);
        v.extend_from_slice(&memo.data_bytes.to_le_bytes());
        v.extend_from_slice(&memo.chunks.to_le_bytes());
        self.ops.push(Op::Put("segmemo", key.to_vec(), v));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// What a segment of known bytes cut into (see `segmemo` above).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegMemo {
    pub seglist: [u8; 32],
    pub data_bytes: u64,
    pub chunks: u32,
}

fn backup_key(vm: &str, backup: &str) -> Vec<u8> {
    let mut k = vm.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(backup.as_bytes());
    k
}

pub struct Catalog {
    path: PathBuf,
    sec_path: PathBuf,
    reader: DB,
    write_lock: Mutex<()>,
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Db {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

fn options() -> Options {
    let mut o = Options::default();
    // Chunk ids are random: a bloom filter makes a lookup of a new chunk (a miss) cheap.
    let mut t = rocksdb::BlockBasedOptions::default();
    t.set_bloom_filter(10.0, false);
    t.set_cache_index_and_filter_blocks(false);
    o.set_block_based_table_factory(&t);
    // Small memtables: the catalog's writes are small batches, and memory must stay flat.
    o.set_write_buffer_size(4 << 20);
    // Only `Catalog::create` makes a database: opening one that is gone must fail, never
    // start an empty catalog in its place.
    o.create_if_missing(false);
    o.create_missing_column_families(true);
    o.set_max_open_files(-1);
    // Every command opens the catalog, and the files are few (see `compact_if_needed`):
    // opening them in the calling thread beats starting 16 threads per column family, and
    // the per-file statistics are only for compaction, which runs when holdfast asks.
    o.set_max_file_opening_threads(1);
    o.set_skip_stats_update_on_db_open(true);
    o.set_keep_log_file_num(3);
    o
}

fn descriptors() -> Vec<ColumnFamilyDescriptor> {
    CFS.iter()
        .map(|n| ColumnFamilyDescriptor::new(*n, options()))
        .collect()
}

impl Catalog {
    /// Create an empty catalog (fails if one exists).
    pub fn create(path: &Path) -> CatalogResult<()> {
        if path.join("CURRENT").exists() {
            return Err(db_err(path, "a catalog already exists here"));
        }
        let mut o = options();
        o.create_if_missing(true);
        let db = DB::open_cf_descriptors(&o, path, descriptors()).map_err(|e| db_err(path, e))?;
        db.flush().map_err(|e| db_err(path, e))?;
        Ok(())
    }

    pub fn open(path: &Path) -> CatalogResult<Self> {
        if !path.join("CURRENT").exists() {
            return Err(db_err(path, "the catalog is missing (no CURRENT file)"));
        }
        let sec_root = path.with_extension("readers");
        sweep_readers(&sec_root);
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sec_path = sec_root.join(format!(
            "{}-{}-{n}",
            std::process::id(),
            crate::timefmt::now_millis()
        ));
        std::fs::create_dir_all(&sec_path).map_err(|e| db_err(path, e))?;
        let mut o = options();
        o.create_if_missing(false);
        // A catalog made by an older holdfast lacks newer column families: add them (a brief
        // primary open, like any write) before the read-only instance asks for them.
        let have = DB::list_cf(&o, path).map_err(|e| db_err(path, e))?;
        if CFS.iter().any(|c| !have.iter().any(|h| h == c)) {
            drop(open_primary(path)?);
        }
        let reader = DB::open_cf_descriptors_as_secondary(&o, path, &sec_path, descriptors())
            .map_err(|e| db_err(path, e))?;
        Ok(Catalog {
            path: path.to_path_buf(),
            sec_path,
            reader,
            write_lock: Mutex::new(()),
        })
    }

    /// See the latest writes of every process.
    pub fn refresh(&self) -> CatalogResult<()> {
        self.reader
            .try_catch_up_with_primary()
            .map_err(|e| db_err(&self.path, e))
    }

    /// Apply a batch atomically and durably, then refresh this process's view.
    pub fn write(&self, batch: Batch) -> CatalogResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let db = open_primary(&self.path)?;
        let mut wb = WriteBatch::default();
        for op in &batch.ops {
            match op {
                Op::Put(cf, k, v) => wb.put_cf(cf_handle(&db, cf, &self.path)?, k, v),
                Op::Delete(cf, k) => wb.delete_cf(cf_handle(&db, cf, &self.path)?, k),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(wb, &wo).map_err(|e| db_err(&self.path, e))?;
        compact_if_needed(&db, &self.path)?;
        drop(db);
        self.refresh()
    }

    fn cf(&self, name: &'static str) -> CatalogResult<&rocksdb::ColumnFamily> {
        cf_handle(&self.reader, name, &self.path)
    }

    pub fn chunk(&self, id: &[u8; 32]) -> CatalogResult<Option<ChunkLoc>> {
        let v = self
            .reader
            .get_pinned_cf(self.cf("chunks")?, id)
            .map_err(|e| db_err(&self.path, e))?;
        v.map(|v| ChunkLoc::decode(&v)).transpose()
    }

    pub fn segmemo(&self, key: &[u8; 32]) -> CatalogResult<Option<SegMemo>> {
        let Some(v) = self
            .reader
            .get_pinned_cf(self.cf("segmemo")?, key)
            .map_err(|e| db_err(&self.path, e))?
        else {
            return Ok(None);
        };
        if v.len() != 45 || v[0] != codec::VERSION {
            return Ok(None); // a cache: an entry it cannot read is a miss
        }
        Ok(Some(SegMemo {
            seglist: v[1..33].try_into().unwrap_or_default(),
            data_bytes: u64::from_le_bytes(v[33..41].try_into().unwrap_or_default()),
            chunks: u32::from_le_bytes(v[41..45].try_into().unwrap_or_default()),
        }))
    }

    fn scan(
        &self,
        cf: &'static str,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> CatalogResult<bool>,
    ) -> CatalogResult<()> {
        let h = self.cf(cf)?;
        let mode = IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for item in self.reader.iterator_cf(h, mode) {
            let (k, v) = item.map_err(|e| db_err(&self.path, e))?;
            if !k.starts_with(prefix) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Visit every blob location; return false from `f` to stop.
    pub fn for_each_chunk(
        &self,
        mut f: impl FnMut([u8; 32], ChunkLoc) -> bool,
    ) -> CatalogResult<()> {
        self.scan("chunks", &[], |k, v| {
            let id: [u8; 32] = k.try_into().map_err(|_| CatalogError::Value {
                cf: "chunks",
                what: "key length".into(),
            })?;
            Ok(f(id, ChunkLoc::decode(v)?))
        })
    }

    pub fn packs(&self) -> CatalogResult<Vec<(PackId, PackInfo)>> {
        let mut out = Vec::new();
        self.scan("packs", &[], |k, v| {
            let id: PackId = k.try_into().map_err(|_| CatalogError::Value {
                cf: "packs",
                what: "key length".into(),
            })?;
            out.push((id, PackInfo::decode(v)?));
            Ok(true)
        })?;
        Ok(out)
    }

    pub fn condemned(&self) -> CatalogResult<Vec<(PackId, u64)>> {
        let mut out = Vec::new();
        self.scan("condemned", &[], |k, v| {
            let id: PackId = k.try_into().map_err(|_| CatalogError::Value {
                cf: "condemned",
                what: "key length".into(),
            })?;
            let t = codec::versioned(v, "condemned")?
                .try_into()
                .map(u64::from_le_bytes);
            out.push((
                id,
                t.map_err(|_| CatalogError::Value {
                    cf: "condemned",
                    what: "value length".into(),
                })?,
            ));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Manifests of committed backups as (vm, backup id, manifest bytes), sorted by vm then id.
    pub fn backups(&self, vm: Option<&str>) -> CatalogResult<Vec<(String, String, Vec<u8>)>> {
        let prefix = vm.map(|v| backup_key(v, "")).unwrap_or_default();
        let mut out = Vec::new();
        self.scan("backups", &prefix, |k, v| {
            let bad = || CatalogError::Value {
                cf: "backups",
                what: "key".into(),
            };
            let sep = k.iter().position(|&b| b == 0).ok_or_else(bad)?;
            let vm = String::from_utf8(k[..sep].to_vec()).map_err(|_| bad())?;
            let id = String::from_utf8(k[sep + 1..].to_vec()).map_err(|_| bad())?;
            out.push((vm, id, codec::versioned(v, "backups")?.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The primary is open only for moments, so RocksDB's background compaction never gets to run
/// and every open leaves small level-0 files. Compact here once level 0 grows, or once a column
/// family holds more files than its size needs: the keys of `backups` only ever grow, so a plain
/// manual compaction *moves* their small files down unchanged, and they pile up (100 backups
/// made 100 files, each opened by every command). Forcing the bottom level to be rewritten
/// merges them; for a large family (`chunks`) the merge with level 0 rewrites it anyway.
fn compact_if_needed(db: &DB, path: &Path) -> CatalogResult<()> {
    for name in CFS {
        let cf = cf_handle(db, name, path)?;
        let prop = |p: &str| {
            db.property_int_value_cf(cf, p)
                .map(|v| v.unwrap_or(0))
                .map_err(|e| db_err(path, e))
        };
        let l0 = prop("rocksdb.num-files-at-level0")?;
        let mut files = 0;
        for level in 0..7 {
            files += prop(&format!("rocksdb.num-files-at-level{level}"))?;
        }
        let size = prop("rocksdb.total-sst-files-size")?;
        if l0 >= 6 || files > 4 + size / (32 << 20) {
            let mut co = CompactOptions::default();
            co.set_bottommost_level_compaction(BottommostLevelCompaction::ForceOptimized);
            db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &co);
        }
    }
    Ok(())
}

/// Open the primary instance, waiting (bounded) while another process holds it.
fn open_primary(path: &Path) -> CatalogResult<DB> {
    let start = Instant::now();
    let mut wait = Duration::from_millis(5);
    loop {
        match DB::open_cf_descriptors(&options(), path, descriptors()) {
            Ok(db) => return Ok(db),
            Err(e) if e.to_string().to_lowercase().contains("lock") => {
                if start.elapsed() > WRITE_WAIT {
                    return Err(CatalogError::Busy(path.display().to_string()));
                }
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(db_err(path, e)),
        }
    }
}

fn cf_handle<'a>(
    db: &'a DB,
    name: &'static str,
    path: &Path,
) -> CatalogResult<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| db_err(path, format!("column family {name} missing")))
}

impl Drop for Catalog {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.sec_path);
    }
}

/// Remove secondary-instance directories of processes that are gone.
fn sweep_readers(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let pid: u32 = name
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if !crate::sys::pid_alive(pid) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog written before the `segmemo` family existed opens, gains it, and keeps its data.
    #[test]
    fn older_catalog_gains_new_column_families() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        {
            let old: Vec<_> = CFS[..4]
                .iter()
                .map(|n| ColumnFamilyDescriptor::new(*n, options()))
                .collect();
            let mut o = options();
            o.create_if_missing(true);
            let db = DB::open_cf_descriptors(&o, &path, old).unwrap();
            db.put_cf(
                db.cf_handle("packs").unwrap(),
                [1u8; 16],
                PackInfo {
                    created: 5,
                    size: 6,
                    entries: 7,
                }
                .encode(),
            )
            .unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        assert_eq!(
            c.packs().unwrap(),
            vec![(
                [1u8; 16],
                PackInfo {
                    created: 5,
                    size: 6,
                    entries: 7
                }
            )]
        );
        assert_eq!(c.segmemo(&[9; 32]).unwrap(), None);
        let memo = SegMemo {
            seglist: [3; 32],
            data_bytes: 12345,
            chunks: 4,
        };
        let mut b = Batch::default();
        b.put_segmemo(&[9; 32], &memo);
        c.write(b).unwrap();
        assert_eq!(c.segmemo(&[9; 32]).unwrap(), Some(memo));
    }

    /// Each write opens the primary and leaves small files; keys that only grow (backup ids)
    /// used to be moved down unmerged, one more file per backup for every later open to read.
    #[test]
    fn many_small_writes_keep_few_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        Catalog::create(&path).unwrap();
        let c = Catalog::open(&path).unwrap();
        for i in 0..60u32 {
            let mut b = Batch::default();
            b.put_backup("vm", &format!("20261123-{i:06}"), br#"{"m":1}"#);
            b.put_segmemo(
                &[i as u8; 32],
                &SegMemo {
                    seglist: [1; 32],
                    data_bytes: 1,
                    chunks: 1,
                },
            );
            c.write(b).unwrap();
        }
        let ssts = std::fs::read_dir(&path)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "sst"))
            .count();
        assert!(
            ssts <= 2 * CFS.len(),
            "{ssts} table files after 60 small writes"
        );
        let all = c.backups(Some("vm")).unwrap();
        assert_eq!(all.len(), 60);
        assert_eq!(all[59].1, "20261123-000059");
        assert_eq!(
            c.segmemo(&[59; 32]).unwrap().map(|m| m.seglist),
            Some([1; 32])
        );
    }
}
