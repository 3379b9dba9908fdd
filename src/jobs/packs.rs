//! Packs being written: new blobs go into an open pack; a full pack is sealed and uploaded on
//! its own thread while the next one fills, and the catalog learns a pack's blobs only once
//! its upload has succeeded (DESIGN §5 invariant 1). Backups and gc's pack rewrites use it.

use crate::catalog::{Batch, PackId, PackInfo};
use crate::chunk::{BlobId, BlobKind, Codec};
use crate::repo::{BackupStats, Repo};
use crate::store::pack::{self, PackEntry, PackWriter};
use crate::{Error, Result};
use std::collections::{HashSet, VecDeque};
/// Writes new blobs into packs. A full pack is sealed and uploaded on its own thread while
/// the next one fills (a few in flight: a remote PUT mostly waits on the network); the catalog
/// learns a pack's blobs only once its upload has succeeded.
pub(crate) struct PackSink<'a> {
    repo: &'a Repo,
    writer: PackWriter,
    /// Blobs in the open pack or in packs still uploading.
    pending: HashSet<[u8; 32]>,
    uploads: VecDeque<Upload>,
    pub stats: BackupStats,
    crash_after: Option<u64>,
}

struct Upload {
    pack_id: PackId,
    size: u64,
    entries: Vec<PackEntry>,
    done: std::thread::JoinHandle<crate::store::StoreResult<()>>,
}

impl<'a> PackSink<'a> {
    pub(crate) fn new(repo: &'a Repo) -> Self {
        let crash_after = crate::hooks::crash_after_packs();
        PackSink {
            repo,
            writer: Self::fresh_writer(repo),
            pending: HashSet::new(),
            uploads: VecDeque::new(),
            stats: BackupStats::default(),
            crash_after,
        }
    }

    fn fresh_writer(repo: &Repo) -> PackWriter {
        // Room for a full pack, its last blob and the footer, so the buffer never doubles.
        PackWriter::with_capacity(
            repo.config.pack_target as usize + (2 << 20),
            repo.keys.clone(),
        )
    }

    /// Packs uploading at once: each holds a pack's bytes in memory.
    fn max_uploads(&self) -> usize {
        if self.repo.remote.is_some() {
            4
        } else {
            2 // the next pack compresses while the last one is fsynced
        }
    }

    /// True when the blob is already stored (or waiting in the open pack).
    pub(crate) fn known(&self, id: &BlobId) -> Result<bool> {
        Ok(self.pending.contains(&id.0) || self.repo.catalog.chunk(&id.0)?.is_some())
    }

    pub(crate) fn add(&mut self, b: NewBlobRef<'_>) -> Result<bool> {
        if self.known(&b.id)? {
            return Ok(false);
        }
        self.add_unchecked(b)
    }

    /// Add without the dedup check (gc copies blobs that the catalog still lists elsewhere).
    pub(crate) fn add_unchecked(&mut self, b: NewBlobRef<'_>) -> Result<bool> {
        let (id, kind, codec) = (b.id.0, b.kind as u8, b.codec as u8);
        match b.sealed {
            true => self.writer.add_sealed(id, kind, codec, b.stored, b.raw_len),
            false => self.writer.add(id, kind, codec, b.stored, b.raw_len),
        };
        self.pending.insert(b.id.0);
        self.stats.new_raw_bytes += u64::from(b.raw_len);
        self.stats.new_stored_bytes += b.stored.len() as u64;
        if b.kind == BlobKind::Chunk {
            self.stats.new_chunks += 1;
        }
        if self.writer.len() >= self.repo.config.pack_target as usize {
            self.seal()?;
        }
        Ok(true)
    }

    /// Start uploading the open pack; waits only while too many uploads are in flight.
    fn seal(&mut self) -> Result<()> {
        if self.writer.is_empty() {
            return Ok(());
        }
        let pack_id = Repo::new_pack_id()?;
        let (bytes, entries) =
            std::mem::replace(&mut self.writer, Self::fresh_writer(self.repo)).finish(&pack_id);
        let store = self.repo.store.clone();
        let size = bytes.len() as u64;
        let done = std::thread::Builder::new()
            .name("holdfast-upload".into())
            .spawn(move || store.put(&pack::pack_key(&hex::encode(pack_id)), &bytes))
            .map_err(|e| Error::io("start an upload thread", e))?;
        self.uploads.push_back(Upload {
            pack_id,
            size,
            entries,
            done,
        });
        while self.uploads.len() > self.max_uploads() - 1 {
            self.finish_one()?;
        }
        Ok(())
    }

    /// Wait for the oldest upload and record its pack in the catalog.
    fn finish_one(&mut self) -> Result<()> {
        let Some(u) = self.uploads.pop_front() else {
            return Ok(());
        };
        let stored = u.done.join().unwrap_or_else(|_| {
            Err(crate::store::StoreError::Remote {
                key: hex::encode(u.pack_id),
                msg: "the upload thread panicked".into(),
            })
        });
        stored?;
        let mut batch = Batch::default();
        for e in &u.entries {
            let loc = crate::repo::loc_of(u.pack_id, e);
            batch.put_chunk(&e.id, &loc);
        }
        batch.put_pack(
            &u.pack_id,
            &PackInfo {
                created: crate::timefmt::now_millis(),
                size: u.size,
                entries: u.entries.len() as u32,
            },
        );
        self.repo.catalog.write(batch)?;
        for e in &u.entries {
            self.pending.remove(&e.id);
        }
        self.stats.packs_written += 1;
        if self
            .crash_after
            .is_some_and(|n| self.stats.packs_written >= n)
        {
            tracing::warn!("HOLDFAST_TEST_CRASH_AFTER_PACKS reached, aborting");
            std::process::abort();
        }
        Ok(())
    }

    /// Seal the open pack and wait until every pack is stored and in the catalog.
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.seal()?;
        while !self.uploads.is_empty() {
            self.finish_one()?;
        }
        Ok(())
    }
}

impl Drop for PackSink<'_> {
    /// On an error, let uploads in flight end before returning (their packs are unreferenced
    /// until a later sync imports them or gc removes them).
    fn drop(&mut self) {
        for u in self.uploads.drain(..) {
            let _ = u.done.join();
        }
    }
}

pub(crate) struct NewBlobRef<'b> {
    pub id: BlobId,
    pub kind: BlobKind,
    pub codec: Codec,
    pub stored: &'b [u8],
    pub raw_len: u32,
    /// `stored` is sealed already (an encrypted store's workers seal in parallel).
    pub sealed: bool,
}
