//! Human and JSON output of every command.

use crate::jobs::{gc::GcReport, restore::RestoreReport, stats::Stats, verify::VerifyReport};
use crate::ops::InitReport;
use crate::repo::{Manifest, SyncReport};
use indicatif::{HumanBytes, HumanDuration};
use serde::Serialize;
use std::time::Duration;

pub struct Out {
    pub json: bool,
}

fn rate(bytes: u64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    format!("{}/s", HumanBytes((bytes as f64 / secs) as u64))
}

impl Out {
    pub(crate) fn json<T: Serialize>(&self, v: &T) -> bool {
        if self.json {
            say!(
                "{}",
                serde_json::to_string_pretty(v)
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            );
        }
        self.json
    }

    pub fn init(&self, r: &InitReport) {
        if self.json(r) {
            return;
        }
        let c = &r.chunker;
        say!("created repository {}", r.repo.display());
        if let Some(cache) = r.cache_bytes {
            say!(
                "  store: {} (read cache {} in {}/cache)",
                r.store,
                HumanBytes(cache),
                r.repo.display()
            );
        }
        say!(
            "  segments {} · chunks {}/{}/{} (min/avg/max) · zstd level {}",
            HumanBytes(c.segment_size.into()),
            HumanBytes(c.min_size.into()),
            HumanBytes(c.avg_size.into()),
            HumanBytes(c.max_size.into()),
            r.compression.level
        );
        match r.encryption.as_str() {
            "none" => say!(
                "  keep a copy of {}/config: its id key is needed to read the backups",
                r.store
            ),
            mode => say!(
                "  encrypted ({mode}, format {}): keep `holdfast key export`'s copy of the key \
                 offline; without the key nothing in the store can be read",
                r.format_version
            ),
        }
    }

    pub fn backup(&self, m: &Manifest) {
        if self.json(m) {
            return;
        }
        let s = &m.stats;
        let deduped = s.data_bytes.saturating_sub(s.new_raw_bytes);
        say!("backup {}@{} committed", m.vm, m.id);
        for d in &m.disks {
            say!(
                "  disk {:<10} {:>10} ({} data) from {}",
                d.name,
                HumanBytes(d.size).to_string(),
                HumanBytes(d.data_bytes),
                d.source
            );
        }
        say!(
            "  read      {:>10}  at {}",
            HumanBytes(s.read_bytes).to_string(),
            rate(s.read_bytes, s.seconds)
        );
        say!(
            "  new       {:>10}  ({} new chunks, {} reused)",
            HumanBytes(s.new_raw_bytes).to_string(),
            s.new_chunks,
            s.reused_chunks
        );
        say!("  deduped   {:>10}", HumanBytes(deduped).to_string());
        say!(
            "  stored    {:>10}  in {} pack(s)",
            HumanBytes(s.new_stored_bytes).to_string(),
            s.packs_written
        );
        let ratio = if s.new_stored_bytes > 0 {
            format!("{:.1}x", s.data_bytes as f64 / s.new_stored_bytes as f64)
        } else {
            "all deduplicated".into()
        };
        say!("  ratio     {ratio:>10}  (data / newly stored)");
        say!(
            "  time      {:>10}",
            HumanDuration(Duration::from_secs_f64(s.seconds)).to_string()
        );
        if let Some(r) = &s.store_requests {
            say!(
                "  S3        {:>10}  up in {} PUT, {} GET, {} HEAD, {} LIST",
                HumanBytes(r.bytes_up).to_string(),
                r.put,
                r.get,
                r.head,
                r.list
            );
        }
    }

    pub fn backups(&self, ms: &[Manifest]) {
        if self.json(&ms) {
            return;
        }
        if ms.is_empty() {
            say!("no backups yet; make one with `holdfast backup VM --disk NAME=PATH`");
            return;
        }
        say!(
            "{:<16} {:<22} {:<21} {:<20} {:>10} {:>10}",
            "VM",
            "ID",
            "TIME",
            "DISKS",
            "SIZE",
            "NEW"
        );
        for m in ms {
            let disks: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
            say!(
                "{:<16} {:<22} {:<21} {:<20} {:>10} {:>10}",
                m.vm,
                m.id,
                crate::timefmt::rfc3339(m.time),
                disks.join(","),
                HumanBytes(m.stats.logical_bytes).to_string(),
                HumanBytes(m.stats.new_stored_bytes).to_string()
            );
        }
    }

    pub fn show(&self, m: &Manifest) {
        if self.json(m) {
            return;
        }
        say!("backup {}@{}", m.vm, m.id);
        say!("  time      {}", crate::timefmt::rfc3339(m.time));
        for d in &m.disks {
            say!(
                "  disk {}: {} ({} bytes), {} data, from {}",
                d.name,
                HumanBytes(d.size),
                d.size,
                HumanBytes(d.data_bytes),
                d.source
            );
        }
        let s = &m.stats;
        say!(
            "  read {} · new {} · stored {} · {} new chunks · {} reused · {:.1}s",
            HumanBytes(s.read_bytes),
            HumanBytes(s.new_raw_bytes),
            HumanBytes(s.new_stored_bytes),
            s.new_chunks,
            s.reused_chunks,
            s.seconds
        );
    }

    pub fn restore(&self, r: &RestoreReport) {
        if !self.json(r) {
            say!(
                "restored {}@{} disk {} to {}: {} ({} data) at {}",
                r.vm,
                r.backup,
                r.disk,
                r.to,
                HumanBytes(r.size),
                HumanBytes(r.data_bytes),
                rate(r.data_bytes, r.seconds)
            );
        }
    }

    pub fn verify(&self, r: &VerifyReport) {
        let affects = |list: &[crate::jobs::verify::Affected]| {
            for a in list {
                note!(
                    "  affects {}@{} disk {} bytes {}..{}",
                    a.vm,
                    a.backup,
                    a.disk,
                    a.offset,
                    a.offset + a.len
                );
            }
        };
        if self.json(r) {
            return;
        }
        for d in &r.damaged {
            note!("DAMAGED {} {}: {}", d.kind, d.blob, d.error);
            affects(&d.affects);
        }
        for d in &r.damaged_packs {
            note!(
                "DAMAGED pack {}: {}; restores that read it are refused: back up the VMs it \
                 affects again",
                d.pack,
                d.error
            );
            affects(&d.affects);
        }
        for d in &r.damaged_manifests {
            let fix = match (d.repaired, d.repairable) {
                (true, _) => "repaired from the catalog's copy".to_string(),
                (false, true) => "the catalog holds a good copy: `holdfast verify --repair`".into(),
                (false, false) => format!(
                    "`holdfast forget {} --damaged` removes it (the backup is lost)",
                    d.backup
                ),
            };
            note!("DAMAGED manifest of {}: {}; {fix}", d.backup, d.error);
        }
        for b in &r.missing_manifests {
            if r.restored_manifests.contains(b) {
                note!("MISSING manifest of {b}: written back from the catalog's copy");
            } else {
                note!(
                    "MISSING manifest of {b}: gone from the store; the catalog keeps it (`holdfast \
                     verify --repair` writes it back)"
                );
            }
        }
        let mut problems = Vec::new();
        if !r.damaged.is_empty() {
            problems.push(format!("{} damaged blob(s)", r.damaged.len()));
        }
        if !r.damaged_packs.is_empty() {
            problems.push(format!("{} damaged pack(s)", r.damaged_packs.len()));
        }
        let bad_manifests = r.damaged_manifests.iter().filter(|d| !d.repaired).count();
        if bad_manifests > 0 {
            problems.push(format!("{bad_manifests} damaged manifest(s)"));
        }
        let missing = r.missing_manifests.len() - r.restored_manifests.len();
        if missing > 0 {
            problems.push(format!("{missing} missing manifest(s)"));
        }
        let verdict = if problems.is_empty() {
            "OK".to_string()
        } else {
            problems.join(", ")
        };
        say!(
            "verified {} backup(s): {} of {} chunks ({}) re-hashed, {} manifest(s) read: {verdict}",
            r.backups,
            r.chunks_checked,
            r.chunks_total,
            HumanBytes(r.bytes_checked),
            r.manifests_checked
        );
    }

    pub fn forget(&self, m: &Manifest) {
        let v = serde_json::json!({"forgot": format!("{}@{}", m.vm, m.id)});
        if !self.json(&v) {
            say!(
                "forgot {}@{}; run `holdfast gc` to free its unshared data",
                m.vm,
                m.id
            );
        }
    }

    pub fn gc(&self, r: &GcReport) {
        if self.json(r) {
            return;
        }
        say!(
            "gc: freed {} · {} pack(s) deleted · {} rewritten · {} condemned",
            HumanBytes(r.bytes_freed),
            r.packs_deleted,
            r.packs_rewritten,
            r.packs_condemned
        );
        if r.packs_deferred > 0 {
            say!(
                "  {} pack(s) wait for a running backup to finish; the next gc deletes them",
                r.packs_deferred
            );
        }
        if !r.missing_kept.is_empty() {
            say!(
                "  kept {} backup(s) whose manifests are gone from the store, and their data: {} \
                 (`holdfast verify --repair` writes them back; `gc --accept-missing` lets them go)",
                r.missing_kept.len(),
                r.missing_kept.join(", ")
            );
        }
        if !r.missing_dropped.is_empty() {
            say!(
                "  let go of {} backup(s) whose manifests were gone: {}",
                r.missing_dropped.len(),
                r.missing_dropped.join(", ")
            );
        }
    }

    pub fn stats(&self, s: &Stats) {
        if self.json(s) {
            return;
        }
        say!(
            "store            {} (format {}, encryption {})",
            s.store,
            s.format_version,
            s.encryption
        );
        say!("backups          {} of {} VM(s)", s.backups, s.vms);
        say!("logical          {}", HumanBytes(s.logical_bytes));
        say!("data             {}", HumanBytes(s.data_bytes));
        say!(
            "unique           {} in {} chunks",
            HumanBytes(s.unique_bytes),
            s.chunks
        );
        say!(
            "stored           {} in {} packs",
            HumanBytes(s.stored_bytes),
            s.packs
        );
        say!("dedup ratio      {:.2}x", s.dedup_ratio);
        say!("compression      {:.2}x", s.compression_ratio);
        say!("overall          {:.2}x", s.total_ratio);
        say!(
            "cost             ${:.4}/month at ${}/GB-month",
            s.cost_per_month,
            s.price_per_gb_month
        );
        if let Some(r) = &s.s3_requests {
            say!("store            {}", s.store);
            say!(
                "S3 requests      {} PUT · {} GET · {} HEAD · {} LIST · {} DELETE",
                r.put,
                r.get,
                r.head,
                r.list,
                r.delete
            );
            say!(
                "S3 traffic       {} up · {} down",
                HumanBytes(r.bytes_up),
                HumanBytes(r.bytes_down)
            );
        }
        if let Some(p) = s.backup_puts_per_gb {
            say!("backup PUTs      {p:.1} per GB of new data");
        }
    }

    pub fn restore_files(&self, r: &crate::jobs::files::FilesReport) {
        if self.json(r) {
            return;
        }
        say!("restored {}", r.path.display());
        say!(
            "  {} files ({}), {} directories, {} symlinks, {} hard links, {} special files in {}",
            r.files,
            HumanBytes(r.bytes),
            r.dirs,
            r.symlinks,
            r.hardlinks,
            r.special,
            HumanDuration(Duration::from_secs_f64(r.seconds))
        );
        if r.skipped_devices > 0 {
            say!(
                "  {} device node(s) left out (--devices, as root, recreates them)",
                r.skipped_devices
            );
        }
    }

    pub fn rebuild(&self, r: &SyncReport) {
        if self.json(r) {
            return;
        }
        say!(
            "catalog rebuilt: {} pack(s), {} blob(s), {} backup(s)",
            r.packs_added,
            r.blobs_added,
            r.backups_added
        );
        for d in &r.damaged {
            note!("  skipped: {d}");
        }
        if !r.damaged.is_empty() {
            note!(
                "  {} damaged object(s) skipped: `holdfast verify` names what they affect",
                r.damaged.len()
            );
        }
    }
}
