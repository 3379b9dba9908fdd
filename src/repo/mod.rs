//! A repository: the store, its config and key, the catalog, and blob reads.
//!
//! Layout of a local repository directory:
//! `config`, `packs/`, `backups/`, `snapshots/` (the store, DESIGN §4), `catalog/` (RocksDB,
//! rebuildable), `locks/` (per-VM locks) and `tasks/` (task records), `vms.toml` (the VMs). A
//! repository whose store is an S3 bucket keeps only `store.json` (where the bucket is, the
//! read-cache budget), `catalog/`, `locks/`, `tasks/`, `cache/` and `requests.json` (S3
//! requests so far) locally; the store keys live in the bucket. The catalog is kept in step
//! with the store by `sync`: packs or manifests the catalog does not know (a killed backup,
//! another appliance) are imported, and entries whose objects are gone are dropped.

pub mod config;
pub mod format;
pub mod keys;
mod sync;

pub use config::{BackupStats, Config, DiskEntry, Manifest};
pub use sync::{rebuild as rebuild_catalog, SyncReport};

use crate::catalog::{Catalog, ChunkLoc, PackId};
use crate::chunk::{self, BlobId, BlobKind, Codec, Keyer};
use crate::error::What;
use crate::store::s3::{RequestCounts, RequestStats, S3Location, S3Options, S3Store};
use crate::store::{pack, CachedStore, LocalStore, ObjectStore, StoreError};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Repo {
    pub dir: PathBuf,
    /// Entries whose group and other permissions `open` took away (a repository made before
    /// holdfast kept them private, or copied with loose modes).
    pub tightened: u64,
    pub store: Arc<dyn ObjectStore>,
    /// The store without the read cache (verify checks what the store holds, not the cache).
    pub uncached: Arc<dyn ObjectStore>,
    pub catalog: Catalog,
    pub config: Config,
    pub keyer: Keyer,
    /// An encrypted store's keys (its packs and metadata are sealed with them).
    pub keys: Option<Arc<crate::crypto::Keys>>,
    /// Set when the store is S3: where, and the requests this process made.
    pub remote: Option<Remote>,
}

pub struct Remote {
    pub location: S3Location,
    pub requests: Arc<RequestStats>,
    /// Budget of the local read cache in bytes.
    pub cache_bytes: u64,
}

/// The local file that points a repository directory at its S3 store.
pub const REMOTE_FILE: &str = "store.json";
const REQUESTS_FILE: &str = "requests.json";
/// Default read-cache budget for S3 stores.
pub const DEFAULT_CACHE_BYTES: u64 = 2 << 30;

#[derive(Serialize, Deserialize)]
struct RemoteFile {
    s3: S3Location,
    cache_bytes: u64,
}

/// How `init --s3` meets the bucket.
#[derive(Clone, Copy, Debug)]
pub enum Attach<'a> {
    /// A new store, encrypted as chosen.
    New(keys::Choice),
    /// A store already in the bucket; its key file when it is encrypted with one.
    Existing { key_file: Option<&'a Path> },
}

/// True when `dir` holds a repository (a local store, or a pointer to an S3 one).
pub fn is_repo(dir: &Path) -> bool {
    dir.join("config").exists() || dir.join(REMOTE_FILE).exists()
}

fn check_new_dir(dir: &Path) -> Result<()> {
    if is_repo(dir) {
        return Err(Error::exists(
            What::Repository,
            dir.display().to_string(),
            format!(
                "{} already holds a holdfast repository; use it, or pick another directory",
                dir.display()
            ),
        ));
    }
    if let Ok(mut rd) = std::fs::read_dir(dir) {
        if rd.next().is_some() {
            return Err(Error::exists(
                What::Directory,
                dir.display().to_string(),
                format!(
                    "{} is not empty; holdfast init needs an empty or new directory",
                    dir.display()
                ),
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    // Private even when it existed (empty) with looser modes.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("make {} private", dir.display()), e))
}

impl Repo {
    /// Create a new unencrypted repository in `dir` (empty or missing).
    pub fn init(dir: &Path, chunker: chunk::ChunkerParams, level: i32) -> Result<Repo> {
        Repo::init_with(dir, chunker, level, keys::Choice::None)
    }

    /// The config of a new store, and its keys put where `enc` says (a wrapped key into
    /// `store`, or a key file into `dir`).
    fn new_config(
        dir: &Path,
        store: &dyn ObjectStore,
        chunker: chunk::ChunkerParams,
        level: i32,
        enc: keys::Choice,
    ) -> Result<Config> {
        let store_id = hex::encode(crate::crypto::random::<16>());
        match keys::create(dir, enc, &store_id)? {
            None => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| {
                    Error::internal(format!("no randomness for the store key: {e}"))
                })?;
                Ok(Config::new(chunker, level, key))
            }
            Some((_, encryption, wrapped)) => {
                if let Some(w) = wrapped {
                    keys::put(store, &w)?;
                }
                Ok(Config::new_encrypted(chunker, level, &store_id, encryption))
            }
        }
    }

    /// Create a new repository in `dir` (empty or missing), encrypted as `enc` says.
    pub fn init_with(
        dir: &Path,
        chunker: chunk::ChunkerParams,
        level: i32,
        enc: keys::Choice,
    ) -> Result<Repo> {
        chunker.validate()?;
        check_new_dir(dir)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let store = LocalStore::new(dir);
        let cfg = Repo::new_config(dir, &store, chunker, level, enc)?;
        Catalog::create(&dir.join("catalog"))?;
        let json = serde_json::to_vec_pretty(&cfg).map_err(Error::internal)?;
        // The config goes last: a directory without it is not a repository yet.
        store.put("config", &json)?;
        Repo::open(dir)
    }

    /// Create a repository whose store is an S3 bucket (`existing`: attach this directory to a
    /// repository already in the bucket and rebuild the catalog from it). The bucket is checked
    /// first: endpoint, credentials and bucket errors come out here, before anything is written.
    pub fn init_s3(
        dir: &Path,
        location: S3Location,
        chunker: chunk::ChunkerParams,
        level: i32,
        cache_bytes: u64,
        how: Attach<'_>,
    ) -> Result<Repo> {
        let (existing, enc, key_file) = match how {
            Attach::New(enc) => (false, enc, None),
            Attach::Existing { key_file } => (true, keys::Choice::None, key_file),
        };
        chunker.validate()?;
        let s3 = S3Store::open(&location, S3Options::from_env())?;
        s3.check()?;
        let has_config = s3.exists("config")?;
        if has_config && !existing {
            return Err(Error::exists(
                What::Repository,
                location.url(),
                format!(
                    "{} already holds a holdfast repository; attach to it with `holdfast init \
                     --s3 {} --existing`, or pick another prefix",
                    location.url(),
                    location.url()
                ),
            ));
        }
        if !has_config && existing {
            return Err(Error::not_found(
                What::Repository,
                location.url(),
                format!(
                    "{} holds no holdfast repository (no config); drop --existing to create one",
                    location.url()
                ),
            ));
        }
        // Attaching to a store encrypted with a key file: the key is checked against the
        // bucket's config before anything is written here.
        let key = match existing {
            true => Repo::attach_key(&s3, &location, key_file)?,
            false => None,
        };
        let fresh = !dir.exists();
        check_new_dir(dir)?;
        let made = (|| {
            let remote = RemoteFile {
                s3: location,
                cache_bytes,
            };
            let json = serde_json::to_vec_pretty(&remote).map_err(Error::internal)?;
            let path = dir.join(REMOTE_FILE);
            crate::sys::write_atomic(&path, &json, true)
                .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
            if let Some((k, sid)) = &key {
                keys::write_keyfile(dir, k, sid)?;
            }
            Catalog::create(&dir.join("catalog"))?;
            if !existing {
                let cfg = Repo::new_config(dir, &s3, chunker, level, enc)?;
                let json = serde_json::to_vec_pretty(&cfg).map_err(Error::internal)?;
                s3.put("config", &json)?;
            }
            let repo = Repo::open(dir)?;
            if existing {
                repo.sync()?;
            }
            Ok(repo)
        })();
        if made.is_err() {
            // Nothing half-made is left: a wrong passphrase or key, a server that went away.
            if fresh {
                let _ = std::fs::remove_dir_all(dir);
            } else if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_dir_all(e.path())
                        .or_else(|_| std::fs::remove_file(e.path()));
                }
            }
        }
        made
    }

    /// For `init --existing`: the bucket's key from `file` when its store is encrypted with a
    /// key file (required then), checked against the bucket's config; None otherwise.
    fn attach_key(
        s3: &S3Store,
        location: &S3Location,
        file: Option<&Path>,
    ) -> Result<Option<(crate::crypto::Keys, String)>> {
        let raw = s3.get("config")?;
        let (config, _) = Config::parse(&raw).map_err(|e| {
            Error::damaged(
                "config",
                format!("{}/config is damaged: {e}", location.url()),
            )
        })?;
        let (Some(enc), Some(sid)) = (&config.encryption, &config.store_id) else {
            return match file {
                Some(_) => Err(Error::usage(format!(
                    "{} is not encrypted: it takes no --key-file",
                    location.url()
                ))),
                None => Ok(None),
            };
        };
        match (enc.mode.as_str(), file) {
            ("keyfile", None) => Err(keys::key_error(format!(
                "{} is encrypted with a key file: attach with --key-file FILE (the copy `holdfast \
                 key export` printed)",
                location.url()
            ))),
            (_, None) => Ok(None),
            (_, Some(f)) => {
                keys::check_secret_file(f)?;
                let text = std::fs::read_to_string(f)
                    .map_err(|e| Error::io(format!("read {}", f.display()), e))?;
                let k = keys::parse_keyfile(&text, f, sid, enc)?;
                Ok(Some((k, sid.clone())))
            }
        }
    }

    /// The store a repository directory points at: itself, or an S3 bucket behind a read cache.
    /// (the store, the store without the read cache, where it is when remote).
    #[allow(clippy::type_complexity)]
    fn open_store(
        dir: &Path,
    ) -> Result<(Arc<dyn ObjectStore>, Arc<dyn ObjectStore>, Option<Remote>)> {
        let remote = dir.join(REMOTE_FILE);
        if !remote.exists() {
            let s: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir));
            return Ok((s.clone(), s, None));
        }
        let raw = std::fs::read(&remote)
            .map_err(|e| Error::io(format!("read {}", remote.display()), e))?;
        let r: RemoteFile = serde_json::from_slice(&raw).map_err(|e| {
            Error::config(
                &remote,
                format!(
                    "{} is damaged ({e}); write it again with `holdfast init --s3 URL \
                         --existing` in a new directory",
                    remote.display()
                ),
            )
        })?;
        let s3 = S3Store::open(&r.s3, S3Options::from_env())?;
        let requests = s3.stats.clone();
        let uncached: Arc<dyn ObjectStore> = Arc::new(s3);
        let store: Arc<dyn ObjectStore> = Arc::new(CachedStore::new(
            uncached.clone(),
            &dir.join("cache"),
            r.cache_bytes,
        ));
        Ok((
            store,
            uncached,
            Some(Remote {
                location: r.s3,
                requests,
                cache_bytes: r.cache_bytes,
            }),
        ))
    }

    /// Where the store is, for messages.
    pub fn store_url(&self) -> String {
        match &self.remote {
            Some(r) => r.location.url(),
            None => self.dir.display().to_string(),
        }
    }

    /// S3 requests so far: those recorded by earlier processes plus this one's.
    pub fn requests(&self) -> Option<RequestCounts> {
        let r = self.remote.as_ref()?;
        Some(read_requests(&self.dir).plus(&r.requests.snapshot()))
    }

    /// The store's config alone (clear in every format), without opening anything else.
    pub fn open_config(dir: &Path) -> Result<Config> {
        let (store, _, _) = Repo::open_store(dir)?;
        let raw = store.get("config")?;
        Config::parse(&raw)
            .map(|(c, _)| c)
            .map_err(|e| Error::damaged("config", format!("the store's config is damaged: {e}")))
    }

    pub fn open(dir: &Path) -> Result<Repo> {
        let (store, uncached, remote) = Repo::open_store(dir)?;
        let where_ = remote
            .as_ref()
            .map(|r| r.location.url())
            .unwrap_or_else(|| dir.display().to_string());
        let raw = match store.get("config") {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => {
                // No config in a bucket may mean no bucket, or credentials it refuses: say that.
                if let Some(r) = &remote {
                    S3Store::open(&r.location, S3Options::from_env())?.check()?;
                }
                return Err(Error::not_found(
                    What::Repository,
                    where_.clone(),
                    format!(
                        "{} is not a holdfast repository (no config); create one with `holdfast \
                         init --repo {}` or point --repo/HOLDFAST_REPO at an existing one",
                        where_,
                        dir.display()
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let (config, id_key) = Config::parse(&raw).map_err(|e| {
            Error::damaged(
                "config",
                format!(
                    "{where_}/config is damaged: {e}; restore it from a copy (its id key is \
                     needed to read the backups)"
                ),
            )
        })?;
        // An encrypted store: its keys (a key file here, or a passphrase), and every object
        // but packs sealed and opened on the way (packs seal their own blobs).
        let (store, uncached, keys, key) = match (&config.encryption, &config.store_id, id_key) {
            (Some(enc), Some(sid), _) => {
                let k = keys::unlock(dir, uncached.as_ref(), sid, enc)?;
                let sealed: Arc<dyn ObjectStore> =
                    Arc::new(crate::store::sealed::SealedStore::new(store, k.clone()));
                let sealed_uncached: Arc<dyn ObjectStore> =
                    Arc::new(crate::store::sealed::SealedStore::new(uncached, k.clone()));
                let id = k.id_key();
                (sealed, sealed_uncached, Some(k), id)
            }
            (_, _, Some(key)) => (store, uncached, None, key),
            _ => {
                return Err(Error::damaged(
                    "config",
                    format!("{where_}/config has no key"),
                ))
            }
        };
        // A catalog that is gone or unreadable is an error pointing at `catalog rebuild`,
        // never an empty catalog in its place (every backup would seem gone, and gc would
        // free their data).
        let catalog = Catalog::open(&dir.join("catalog"))?;
        // Private whatever the umask was: a repository left readable by others is tightened
        // (once: its top directory says whether it needs it).
        let tightened = if crate::sys::is_shared(dir) {
            crate::sys::tighten_tree(dir)
                .map_err(|e| Error::io(format!("make {} private", dir.display()), e))?
        } else {
            0
        };
        Ok(Repo {
            dir: dir.to_path_buf(),
            tightened,
            store,
            uncached,
            catalog,
            config,
            keyer: Keyer::new(key),
            keys,
            remote,
        })
    }

    /// Fetch, decode and verify one blob by id.
    pub fn read_blob(&self, kind: BlobKind, id: &BlobId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        self.read_at(kind, id, &loc)
    }

    pub fn locate(&self, id: &BlobId) -> Result<ChunkLoc> {
        if let Some(loc) = self.catalog.chunk(&id.0)? {
            return Ok(loc);
        }
        // A backup that reused a blob while gc condemned its pack commits a reference the
        // catalog no longer lists; the pack stays until the next gc revives the blob. Look there.
        for (pack_id, _) in self.catalog.condemned()? {
            let key = pack::pack_key(&hex::encode(pack_id));
            let Ok(entries) = pack::read_footer(self.store.as_ref(), &key, self.keys.as_deref())
            else {
                continue;
            };
            if let Some(e) = entries.iter().find(|e| e.id == id.0) {
                return Ok(loc_of(pack_id, e));
            }
        }
        Err(Error::damaged(
            "blob",
            format!(
                "blob {} is missing from the store; run `holdfast verify` to see what it affects",
                id.to_hex()
            ),
        ))
    }

    /// A blob's stored bytes as the codec wants them: an encrypted store's sealed blob opened
    /// (bound to its kind and id: a blob swapped or altered in its pack is damage).
    pub fn open_stored<'a>(
        &self,
        kind: BlobKind,
        id: &BlobId,
        stored: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>> {
        let Some(k) = &self.keys else {
            return Ok(std::borrow::Cow::Borrowed(stored));
        };
        k.open(
            crate::crypto::Purpose::Blob,
            &pack::blob_ad(kind as u8, &id.0),
            stored,
        )
        .map(std::borrow::Cow::Owned)
        .map_err(|_| {
            Error::damaged(
                "blob",
                format!(
                    "blob {} does not authenticate (tampered with, swapped, or written with \
                     another key); run `holdfast verify` to see what it affects",
                    id.to_hex()
                ),
            )
        })
    }

    pub fn read_at(&self, kind: BlobKind, id: &BlobId, loc: &ChunkLoc) -> Result<Vec<u8>> {
        let stored = self.store.get_range(
            &pack::pack_key(&hex::encode(loc.pack)),
            loc.offset,
            loc.stored_len as usize,
        )?;
        let stored = match self.keys {
            Some(_) => self.open_stored(kind, id, &stored)?.into_owned(), // owned: no copy
            None => stored,
        };
        let codec = codec_of(id, loc)?;
        Ok(chunk::decode_owned(
            &self.keyer,
            kind,
            id,
            codec,
            stored,
            loc.raw_len as usize,
        )?)
    }

    fn decode_at(
        &self,
        kind: BlobKind,
        id: &BlobId,
        loc: &ChunkLoc,
        stored: &[u8],
    ) -> Result<Vec<u8>> {
        let opened = self.open_stored(kind, id, stored)?;
        self.decode_at_plain(kind, id, loc, &opened)
    }

    fn decode_at_plain(
        &self,
        kind: BlobKind,
        id: &BlobId,
        loc: &ChunkLoc,
        stored: &[u8],
    ) -> Result<Vec<u8>> {
        let codec = codec_of(id, loc)?;
        Ok(chunk::decode(
            &self.keyer,
            kind,
            id,
            codec,
            stored,
            loc.raw_len as usize,
        )?)
    }

    /// Fetch, decode and verify several blobs: those in one pack are fetched together (one
    /// request per run of nearby blobs on a remote store). Results come in the order given.
    pub fn read_located(
        &self,
        store: &dyn ObjectStore,
        kind: BlobKind,
        items: &[(BlobId, ChunkLoc)],
    ) -> Vec<Result<Vec<u8>>> {
        let mut by_pack: std::collections::BTreeMap<PackId, Vec<usize>> = Default::default();
        for (i, (_, loc)) in items.iter().enumerate() {
            by_pack.entry(loc.pack).or_default().push(i);
        }
        let mut out: Vec<Option<Result<Vec<u8>>>> = (0..items.len()).map(|_| None).collect();
        for (pack_id, members) in by_pack {
            let key = pack::pack_key(&hex::encode(pack_id));
            let ranges: Vec<(u64, usize)> = members
                .iter()
                .map(|&i| (items[i].1.offset, items[i].1.stored_len as usize))
                .collect();
            match store.get_ranges(&key, &ranges) {
                Ok(stored) => {
                    for (&i, bytes) in members.iter().zip(stored) {
                        let (id, loc) = &items[i];
                        out[i] = Some(self.decode_at(kind, id, loc, &bytes));
                    }
                }
                // Read one by one, so each blob gets its own error.
                Err(_) => {
                    for &i in &members {
                        let (id, loc) = &items[i];
                        out[i] = Some(
                            store
                                .get_range(&key, loc.offset, loc.stored_len as usize)
                                .map_err(Error::from)
                                .and_then(|b| self.decode_at(kind, id, loc, &b)),
                        );
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.expect("every item was read"))
            .collect()
    }

    /// Read and check the entry tables of `packs` from `store` (the read cache, or past it),
    /// in parallel: the
    /// packs whose tables cannot be read or do not check out (a flipped byte, a table moved
    /// from another pack, another key), with the reason, in pack order. A blob in such a pack
    /// still authenticates on its own, but a pack that was tampered with is damage, and
    /// `catalog rebuild` could not recover it.
    pub fn check_pack_tables(
        &self,
        store: &dyn ObjectStore,
        packs: &std::collections::BTreeSet<PackId>,
    ) -> Vec<(PackId, String)> {
        let packs: Vec<&PackId> = packs.iter().collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let bad = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..self.io_workers().min(packs.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(p) = packs.get(i) else { break };
                    let key = pack::pack_key(&hex::encode(p));
                    if let Err(e) = pack::read_footer(store, &key, self.keys.as_deref()) {
                        crate::sys::lock(&bad).push((**p, e.to_string()));
                    }
                });
            }
        });
        let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
        bad.sort();
        bad
    }

    /// Read many blobs by id, fetched together where they share a pack; the error names the
    /// index of the first blob that failed.
    pub fn read_blobs(
        &self,
        kind: BlobKind,
        ids: &[BlobId],
    ) -> std::result::Result<Vec<Vec<u8>>, (usize, Error)> {
        let mut items = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            items.push((*id, self.locate(id).map_err(|e| (i, e))?));
        }
        self.read_located(self.store.as_ref(), kind, &items)
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.map_err(|e| (i, e)))
            .collect()
    }

    /// Threads that keep the store busy: the CPU count locally; more for a remote store, whose
    /// requests mostly wait on the network.
    pub fn io_workers(&self) -> usize {
        let cpus = crate::sys::workers();
        if self.remote.is_some() {
            (cpus * 4).clamp(8, 32)
        } else {
            cpus
        }
    }

    /// All committed manifests, oldest first within each VM.
    pub fn manifests(&self, vm: Option<&str>) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for (_, id, json) in self.catalog.backups(vm)? {
            let m: Manifest = serde_json::from_slice(&json).map_err(|e| {
                Error::damaged(
                    "manifest",
                    format!(
                        "manifest of backup {id} in the catalog is damaged ({e}); run \
                             `holdfast catalog rebuild`"
                    ),
                )
            })?;
            out.push(m);
        }
        out.sort_by(|a, b| {
            (a.vm.as_str(), a.time, a.time_ms, a.id.as_str()).cmp(&(
                b.vm.as_str(),
                b.time,
                b.time_ms,
                b.id.as_str(),
            ))
        });
        Ok(out)
    }

    /// Resolve `VM`, `VM@latest`, `VM@ID` or `VM@ID-PREFIX` to one backup.
    pub fn resolve(&self, spec: &str) -> Result<Manifest> {
        let (vm, id) = spec.split_once('@').unwrap_or((spec, "latest"));
        crate::names::check("VM", vm)?;
        let all = self.manifests(Some(vm))?;
        if all.is_empty() {
            return Err(Error::not_found(
                What::Backup,
                vm,
                format!(
                    "no backups of VM {vm:?}; `holdfast backups` lists the VMs that have backups"
                ),
            ));
        }
        if id == "latest" || id.is_empty() {
            return Ok(all.into_iter().last().expect("not empty"));
        }
        let hits: Vec<Manifest> = all.into_iter().filter(|m| m.id.starts_with(id)).collect();
        match hits.len() {
            1 => Ok(hits.into_iter().next().expect("one")),
            0 => Err(Error::not_found(
                What::Backup,
                spec,
                format!("VM {vm} has no backup {id:?}; `holdfast backups {vm}` lists them"),
            )),
            n => Err(Error::usage(format!(
                "{id:?} matches {n} backups of {vm}; give more of the id"
            ))),
        }
    }

    /// The segment list ids of one disk, one per segment (None = all hole).
    pub fn disk_segments(&self, disk: &DiskEntry) -> Result<Vec<Option<BlobId>>> {
        let n_segs = disk.size.div_ceil(u64::from(disk.segment_size)) as usize;
        let mut segs = Vec::with_capacity(n_segs);
        for hex_id in &disk.index {
            let id = BlobId::parse(hex_id)?;
            let b = self.read_blob(BlobKind::Index, &id)?;
            let (first, part) = format::decode_index(&b).map_err(|e| {
                Error::damaged("disk index", format!("index blob {}: {e}", id.to_hex()))
            })?;
            if first != segs.len() as u64 {
                return Err(Error::damaged(
                    "disk index",
                    format!(
                        "index blob {} starts at segment {first}, expected {}",
                        id.to_hex(),
                        segs.len()
                    ),
                ));
            }
            segs.extend(part);
        }
        if segs.len() != n_segs {
            return Err(Error::damaged(
                "disk index",
                format!(
                    "disk {} has {} segments in its index, expected {n_segs}",
                    disk.name,
                    segs.len()
                ),
            ));
        }
        Ok(segs)
    }

    /// Read and check one segment list.
    pub fn seglist(&self, id: &BlobId, segment_len: u64) -> Result<Vec<format::SegEntry>> {
        let b = self.read_blob(BlobKind::SegList, id)?;
        format::decode_seglist(&b, segment_len).map_err(|e| {
            Error::damaged("segment list", format!("segment list {}: {e}", id.to_hex()))
        })
    }

    /// The ids of `vm`'s backups that are protected (`protected/<vm>/<id>` in the store: no
    /// rule and no forget removes them until they are unprotected).
    pub fn protected(&self, vm: &str) -> Result<std::collections::HashSet<String>> {
        crate::names::check("VM", vm)?;
        let prefix = format!("protected/{vm}/");
        Ok(self
            .store
            .list(&prefix)?
            .into_iter()
            .filter_map(|k| k.strip_prefix(&prefix).map(String::from))
            .collect())
    }

    /// Protect backup `m`, or take its protection away.
    pub fn set_protected(&self, m: &Manifest, on: bool) -> Result<()> {
        let key = format!("protected/{}/{}", m.vm, m.id);
        if on {
            match self.store.put(&key, b"") {
                Ok(()) | Err(StoreError::Exists(_)) => Ok(()),
                Err(e) => Err(e.into()),
            }
        } else {
            Ok(self.store.delete(&key)?)
        }
    }

    pub fn new_pack_id() -> Result<PackId> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| Error::internal(format!("no randomness: {e}")))?;
        Ok(id)
    }

    pub fn local(&self) -> Option<LocalStore> {
        self.remote.is_none().then(|| LocalStore::new(&self.dir))
    }
}

fn read_requests(dir: &Path) -> RequestCounts {
    std::fs::read(dir.join(REQUESTS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

impl Drop for Repo {
    /// Add this process's S3 requests to the repository's running totals (under a lock, as
    /// several processes may end at once). Best effort: the counts are statistics.
    fn drop(&mut self) {
        let Some(r) = &self.remote else { return };
        let mine = r.requests.snapshot();
        if mine == RequestCounts::default() {
            return;
        }
        let Ok(_lock) = crate::sys::FileLock::acquire(&self.dir.join("requests.lock")) else {
            return;
        };
        let total = read_requests(&self.dir).plus(&mine);
        if let Ok(json) = serde_json::to_vec_pretty(&total) {
            let _ = crate::sys::write_atomic(&self.dir.join(REQUESTS_FILE), &json, false);
        }
    }
}

/// Where the pack entry `e` of pack `pack` lies, as the catalog records it.
pub fn loc_of(pack: PackId, e: &pack::PackEntry) -> ChunkLoc {
    ChunkLoc {
        pack,
        kind: e.kind,
        codec: e.codec,
        offset: e.offset,
        stored_len: e.stored_len,
        raw_len: e.raw_len,
    }
}

/// The codec a catalog location names; an unknown one means the catalog or pack is damaged.
fn codec_of(id: &BlobId, loc: &ChunkLoc) -> Result<Codec> {
    Codec::from_u8(loc.codec).ok_or_else(|| {
        Error::damaged(
            "blob",
            format!("blob {} has an unknown codec {}", id.to_hex(), loc.codec),
        )
    })
}
