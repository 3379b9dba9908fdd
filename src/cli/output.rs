//! Human and JSON output of every command.

use crate::jobs::{gc::GcReport, restore::RestoreReport, stats::Stats, verify::VerifyReport};
use crate::repo::{Manifest, Repo, SyncReport};
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
    fn json<T: Serialize>(&self, v: &T) -> bool {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(v)
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            );
        }
        self.json
    }

    pub fn init(&self, r: &Repo) {
        let store = r.store_url();
        let v = serde_json::json!({"repo": r.dir, "store": store, "chunker": r.config.chunker, "compression": r.config.compression});
        if !self.json(&v) {
            let c = &r.config.chunker;
            println!("created repository {}", r.dir.display());
            if r.remote.is_some() {
                println!(
                    "  store: {store} (read cache {} in {}/cache)",
                    HumanBytes(r.remote.as_ref().map_or(0, |x| x.cache_bytes)),
                    r.dir.display()
                );
            }
            println!(
                "  segments {} · chunks {}/{}/{} (min/avg/max) · zstd level {}",
                HumanBytes(c.segment_size.into()),
                HumanBytes(c.min_size.into()),
                HumanBytes(c.avg_size.into()),
                HumanBytes(c.max_size.into()),
                r.config.compression.level
            );
            println!("  keep a copy of {store}/config: its id key is needed to read the backups");
        }
    }

    pub fn backup(&self, m: &Manifest) {
        if self.json(m) {
            return;
        }
        let s = &m.stats;
        let deduped = s.data_bytes.saturating_sub(s.new_raw_bytes);
        println!("backup {}@{} committed", m.vm, m.id);
        for d in &m.disks {
            println!(
                "  disk {:<10} {:>10} ({} data) from {}",
                d.name,
                HumanBytes(d.size).to_string(),
                HumanBytes(d.data_bytes),
                d.source
            );
        }
        println!(
            "  read      {:>10}  at {}",
            HumanBytes(s.read_bytes).to_string(),
            rate(s.read_bytes, s.seconds)
        );
        println!(
            "  new       {:>10}  ({} new chunks, {} reused)",
            HumanBytes(s.new_raw_bytes).to_string(),
            s.new_chunks,
            s.reused_chunks
        );
        println!("  deduped   {:>10}", HumanBytes(deduped).to_string());
        println!(
            "  stored    {:>10}  in {} pack(s)",
            HumanBytes(s.new_stored_bytes).to_string(),
            s.packs_written
        );
        let ratio = if s.new_stored_bytes > 0 {
            format!("{:.1}x", s.data_bytes as f64 / s.new_stored_bytes as f64)
        } else {
            "all deduplicated".into()
        };
        println!("  ratio     {ratio:>10}  (data / newly stored)");
        println!(
            "  time      {:>10}",
            HumanDuration(Duration::from_secs_f64(s.seconds)).to_string()
        );
        if let Some(r) = &s.store_requests {
            println!(
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
            println!("no backups yet; make one with `holdfast backup VM --disk NAME=PATH`");
            return;
        }
        println!(
            "{:<16} {:<22} {:<21} {:<20} {:>10} {:>10}",
            "VM", "ID", "TIME", "DISKS", "SIZE", "NEW"
        );
        for m in ms {
            let disks: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
            println!(
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
        println!("backup {}@{}", m.vm, m.id);
        println!("  time      {}", crate::timefmt::rfc3339(m.time));
        for d in &m.disks {
            println!(
                "  disk {}: {} ({} bytes), {} data, from {}",
                d.name,
                HumanBytes(d.size),
                d.size,
                HumanBytes(d.data_bytes),
                d.source
            );
        }
        let s = &m.stats;
        println!(
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
            println!(
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
        if self.json(r) {
            return;
        }
        for d in &r.damaged {
            eprintln!("DAMAGED {} {}: {}", d.kind, d.blob, d.error);
            for a in &d.affects {
                eprintln!(
                    "  affects {}@{} disk {} bytes {}..{}",
                    a.vm,
                    a.backup,
                    a.disk,
                    a.offset,
                    a.offset + a.len
                );
            }
        }
        let verdict = if r.damaged.is_empty() {
            "OK".to_string()
        } else {
            format!("{} damaged blob(s)", r.damaged.len())
        };
        println!(
            "verified {} backup(s): {} of {} chunks ({}) re-hashed: {verdict}",
            r.backups,
            r.chunks_checked,
            r.chunks_total,
            HumanBytes(r.bytes_checked)
        );
    }

    pub fn forget(&self, m: &Manifest) {
        let v = serde_json::json!({"forgot": format!("{}@{}", m.vm, m.id)});
        if !self.json(&v) {
            println!(
                "forgot {}@{}; run `holdfast gc` to free its unshared data",
                m.vm, m.id
            );
        }
    }

    pub fn gc(&self, r: &GcReport) {
        if self.json(r) {
            return;
        }
        println!(
            "gc: freed {} · {} pack(s) deleted · {} rewritten · {} condemned",
            HumanBytes(r.bytes_freed),
            r.packs_deleted,
            r.packs_rewritten,
            r.packs_condemned
        );
        if r.packs_deferred > 0 {
            println!(
                "  {} pack(s) wait for a running backup to finish; the next gc deletes them",
                r.packs_deferred
            );
        }
    }

    pub fn stats(&self, s: &Stats) {
        if self.json(s) {
            return;
        }
        println!("backups          {} of {} VM(s)", s.backups, s.vms);
        println!("logical          {}", HumanBytes(s.logical_bytes));
        println!("data             {}", HumanBytes(s.data_bytes));
        println!(
            "unique           {} in {} chunks",
            HumanBytes(s.unique_bytes),
            s.chunks
        );
        println!(
            "stored           {} in {} packs",
            HumanBytes(s.stored_bytes),
            s.packs
        );
        println!("dedup ratio      {:.2}x", s.dedup_ratio);
        println!("compression      {:.2}x", s.compression_ratio);
        println!("overall          {:.2}x", s.total_ratio);
        println!(
            "cost             ${:.4}/month at ${}/GB-month",
            s.cost_per_month, s.price_per_gb_month
        );
        if let Some(r) = &s.s3_requests {
            println!("store            {}", s.store);
            println!(
                "S3 requests      {} PUT · {} GET · {} HEAD · {} LIST · {} DELETE",
                r.put, r.get, r.head, r.list, r.delete
            );
            println!(
                "S3 traffic       {} up · {} down",
                HumanBytes(r.bytes_up),
                HumanBytes(r.bytes_down)
            );
        }
        if let Some(p) = s.backup_puts_per_gb {
            println!("backup PUTs      {p:.1} per GB of new data");
        }
    }

    pub fn restore_files(&self, r: &crate::jobs::files::FilesReport) {
        if self.json(r) {
            return;
        }
        println!("restored {}", r.path.display());
        println!(
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
            println!(
                "  {} device node(s) left out (--devices, as root, recreates them)",
                r.skipped_devices
            );
        }
    }

    pub fn rebuild(&self, r: &SyncReport) {
        if self.json(r) {
            return;
        }
        println!(
            "catalog rebuilt: {} pack(s), {} blob(s), {} backup(s)",
            r.packs_added, r.blobs_added, r.backups_added
        );
        for d in &r.damaged {
            eprintln!("  skipped: {d}");
        }
    }
}
