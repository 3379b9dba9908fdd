//! The `holdfast` command line: clap commands, progress bars, human and `--json` output.

mod export;
mod output;
mod progress;
mod vm;

use crate::jobs::{self, backup::DiskSpec};
use crate::repo::Repo;
use crate::source::FileSource;
use crate::{Error, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Back up VM disks into a deduplicating store, and restore them.",
    long_about = "Back up VM disks into a deduplicating store, and restore them.\n\n\
Disks are cut into content-defined chunks inside aligned 4 MiB segments, named by a keyed hash,\n\
compressed with zstd and stored once. Every backup is a complete map of its disks; only new\n\
chunks take space.\n\n\
Quick start:\n  holdfast init --repo /srv/backups\n  holdfast backup web-01 --disk root=/var/lib/vm/web-01.img\n  \
holdfast backups\n  holdfast restore web-01 --disk root --to /tmp/root.img\n  holdfast verify"
)]
pub struct Cli {
    /// Repository directory [default: /var/lib/holdfast as root, else ~/.local/share/holdfast]
    #[arg(long, global = true, env = "HOLDFAST_REPO")]
    repo: Option<PathBuf>,
    /// Print machine-readable JSON on stdout instead of text
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars
    #[arg(long, short, global = true)]
    quiet: bool,
    /// The VM declarations (QMP sockets, disks) [default: REPO/vms.toml]
    #[arg(long, global = true, env = "HOLDFAST_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a repository: store config (chunker, id key, compression) and catalog
    Init {
        /// Segment size in bytes; chunks never cross a segment edge
        #[arg(long, default_value_t = 4 << 20)]
        segment_size: u32,
        /// Smallest chunk in bytes
        #[arg(long, default_value_t = 16 << 10)]
        chunk_min: u32,
        /// Average chunk in bytes
        #[arg(long, default_value_t = 64 << 10)]
        chunk_avg: u32,
        /// Largest chunk in bytes
        #[arg(long, default_value_t = 256 << 10)]
        chunk_max: u32,
        /// zstd level (1 is fastest; 3 compresses a little better)
        #[arg(long, default_value_t = 1)]
        compression_level: i32,
        /// Keep the store in an S3 bucket (AWS, MinIO, Ceph RGW, Garage, ...): s3://BUCKET/PREFIX.
        /// Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
        /// AWS_PROFILE, ...). The repository directory then holds only the catalog, locks and a read cache.
        #[arg(long, value_name = "URL")]
        s3: Option<String>,
        /// S3 endpoint for servers other than AWS, e.g. http://127.0.0.1:9000
        #[arg(long, value_name = "URL", requires = "s3")]
        endpoint: Option<String>,
        /// S3 region (default: AWS_REGION, else us-east-1)
        #[arg(long, requires = "s3")]
        region: Option<String>,
        /// Address the bucket in the path (http://host/bucket/key), as most self-hosted servers need
        #[arg(long, requires = "s3")]
        path_style: bool,
        /// Local read-cache size for an S3 store, e.g. 512M, 4G (0 turns it off)
        #[arg(long, value_name = "SIZE", requires = "s3", default_value = "2G")]
        cache_size: String,
        /// Attach to a repository that already exists in the bucket (a new appliance, or after
        /// losing this machine): the catalog is rebuilt from the bucket alone
        #[arg(long, requires = "s3")]
        existing: bool,
    },
    /// Back up a VM: its disks as files, block devices or NBD exports, or a running VM through QEMU
    #[command(
        after_help = "Examples:\n  holdfast backup web-01 --disk root=/var/lib/vm/web-01.img --disk data=/dev/vg0/web-01-data\n  \
holdfast backup web-01 --disk root='nbd+unix:///root?socket=/run/qsd.sock' --bitmap hf-1\n  \
holdfast backup web-01                       (a VM declared with `holdfast vm add`)\n  \
holdfast backup web-01 --qmp /run/qemu/web-01.qmp --disk root=disk0 --quiesce\n\n\
A VM in QEMU is read from a point-in-time read point while it keeps running; only the 4 MiB\n\
segments its dirty bitmap marks since the last backup are read. With --bitmap (NBD disks), only\n\
the segments that hold dirty blocks are read; every other segment is taken unread from the\n\
backup the bitmap started from (--since, default: the latest backup)."
    )]
    Backup {
        /// VM name: letters, digits, '-', '_', '.'
        vm: String,
        /// A disk as NAME=PATH or NAME=NBD-URI (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH); with --qmp, NAME=NODE; repeat for each disk
        #[arg(long = "disk", value_name = "NAME=SOURCE")]
        disks: Vec<String>,
        /// Read changed blocks from the NBD context qemu:dirty-bitmap:NAME (NBD disks only)
        #[arg(long, value_name = "NAME", conflicts_with = "qmp")]
        bitmap: Option<String>,
        /// The backup the bitmap started from (default: the latest backup of the VM)
        #[arg(long, value_name = "ID", requires = "bitmap")]
        since: Option<String>,
        /// Back up a running VM through its QMP socket (disks as --disk NAME=NODE)
        #[arg(long, value_name = "SOCKET")]
        qmp: Option<PathBuf>,
        /// The VM's guest agent socket (for --quiesce)
        #[arg(long, value_name = "SOCKET")]
        agent: Option<PathBuf>,
        /// Freeze the guest's filesystems around the read point (needs the guest agent)
        #[arg(long)]
        quiesce: bool,
        /// Read every allocated extent, ignoring the dirty bitmap (a VM in QEMU)
        #[arg(long)]
        full: bool,
    },
    /// List backups, oldest first
    Backups {
        /// Only this VM
        vm: Option<String>,
    },
    /// Show one backup: disks, sizes, what it stored
    Show {
        /// VM@ID (an id prefix works; VM alone or VM@latest means the newest)
        spec: String,
    },
    /// Restore one disk to a sparse raw image (every chunk is re-hashed)
    #[command(
        after_help = "Example: holdfast restore web-01@20261122-101500 --disk root --to /tmp/root.img"
    )]
    Restore {
        /// VM or VM@ID (default: the newest backup)
        spec: String,
        /// Disk name (may be left out when the backup has one disk)
        #[arg(long)]
        disk: Option<String>,
        /// Where to write the image (a new file, or a block device)
        #[arg(long)]
        to: PathBuf,
        /// Overwrite an existing file
        #[arg(long)]
        force: bool,
    },
    /// Re-read and re-hash what backups reference; name what any damage affects (exit 3)
    Verify {
        /// VM or VM@ID (default: every backup)
        spec: Option<String>,
        /// Check only this percentage of the chunks (a stable sample)
        #[arg(long, default_value_t = 100.0)]
        sample: f64,
    },
    /// Remove a backup; `holdfast gc` then frees what nothing else uses
    Forget {
        /// VM@ID
        spec: String,
    },
    /// Delete chunks and packs no backup references; safe beside running backups
    Gc,
    /// Stored bytes, dedup and compression ratios, and what the storage costs
    Stats {
        /// Storage price in dollars per GB-month
        #[arg(long, default_value_t = 0.05)]
        price: f64,
    },
    /// Serve a backup's disk over NBD (read-only, or writes to a local overlay); Ctrl-C stops it
    #[command(
        after_help = "Examples:\n  holdfast export web-01 --listen unix:/run/hf-web01.sock\n  \
holdfast export web-01@20261122-101500 --disk root --listen tcp:10809 --writable\n\n\
Clients: nbdinfo/nbdcopy/qemu-img with nbd+unix:///DISK?socket=PATH or nbd://HOST:PORT/DISK.\n\
The store is never written: with --writable, writes go to an overlay file that is deleted on\n\
exit unless --keep-overlay PATH keeps it (PATH, plus its block map PATH.map)."
    )]
    Export {
        /// VM or VM@ID (default: the newest backup)
        spec: String,
        /// Disk name (may be left out when the backup has one disk)
        #[arg(long)]
        disk: Option<String>,
        /// unix:PATH, tcp:PORT (on 127.0.0.1) or tcp:HOST:PORT
        #[arg(long)]
        listen: String,
        /// Accept writes (into a local overlay, never the store)
        #[arg(long)]
        writable: bool,
        /// Keep the overlay at PATH (and its map at PATH.map) on exit
        #[arg(long, value_name = "PATH")]
        keep_overlay: Option<PathBuf>,
        /// Memory for decoded chunks, e.g. 64M, 1G (at least 256 chunks). Clients that read
        /// several streams at once (nbdcopy: 4 connections) need room for each stream's
        /// read-ahead (16 MiB)
        #[arg(long, value_name = "SIZE", default_value = "256M")]
        cache: String,
    },
    /// Browse every backup as a read-only filesystem, down to the files inside the guests
    #[command(
        after_help = "Layout:\n  MOUNTPOINT/<vm>/latest                 the newest backup (a symlink)\n  \
MOUNTPOINT/<vm>/<id>/<disk>.img         the raw disk\n  \
MOUNTPOINT/<vm>/<id>/<disk>/p1.img      a raw partition\n  \
MOUNTPOINT/<vm>/<id>/<disk>/p1/...      its files (ext2/3/4, FAT12/16/32, NTFS)\n  \
MOUNTPOINT/<vm>/<id>/<disk>/fs/...      a disk that is one filesystem without a partition table\n\n\
Runs in the foreground until `holdfast umount MOUNTPOINT`, Ctrl-C or SIGTERM. Damaged data is an\n\
I/O error for the reads that touch it, never wrong bytes.\n\n\
Example:\n  mkdir -p /mnt/holdfast && holdfast mount /mnt/holdfast &\n  ls /mnt/holdfast/web-01/latest/root/p2/etc"
    )]
    Mount {
        /// An existing empty directory
        mountpoint: PathBuf,
        /// Show only this VM's backups
        #[arg(long)]
        vm: Option<String>,
        /// Only root may browse (default: every user, with the guests' own permissions)
        #[arg(long)]
        private: bool,
    },
    /// Unmount a `holdfast mount`; its process then ends
    Umount {
        /// Where `holdfast mount` mounted the backups
        mountpoint: PathBuf,
        /// Detach now even if files are open there (the mount ends when they close)
        #[arg(long)]
        lazy: bool,
    },
    /// Print a file from inside a backup to standard output, without mounting
    #[command(
        after_help = "Example: holdfast cat web-01@20261122-101500:root/p2/etc/fstab\n\n\
PART is p1, p2, ... (as `holdfast mount` shows them), or fs for a disk without a partition table."
    )]
    Cat {
        /// VM[@ID]:DISK/PART/PATH (VM alone means the newest backup)
        spec: String,
    },
    /// Copy files or a directory tree out of a backup, with owners, modes, times and links
    #[command(
        name = "restore-files",
        after_help = "Example: holdfast restore-files web-01:root/p2/etc/nginx --to /tmp/restored\n\n\
Creates TO/<last path component> (or TO/DISK-PART for a whole filesystem); an existing one is\n\
never overwritten. Nothing is left behind if the copy fails."
    )]
    RestoreFiles {
        /// VM[@ID]:DISK/PART/PATH (VM alone means the newest backup)
        spec: String,
        /// An existing directory to restore into
        #[arg(long)]
        to: PathBuf,
        /// Recreate the guest's device nodes too (as root; they are host devices here)
        #[arg(long)]
        devices: bool,
    },
    /// VMs that run in QEMU: declare them once, then `holdfast backup VM` and snapshots need no more
    Vm {
        #[command(subcommand)]
        cmd: vm::VmCmd,
    },
    /// VM snapshots: rollback points taken before risky changes
    Snapshot {
        #[command(subcommand)]
        cmd: vm::SnapshotCmd,
    },
    /// Find (and remove) what an interrupted holdfast left in a VM's QEMU
    Doctor {
        /// A VM declared with `holdfast vm add`
        vm: String,
        /// Only report
        #[arg(long)]
        dry_run: bool,
    },
    /// Catalog maintenance
    Catalog {
        #[command(subcommand)]
        cmd: CatalogCmd,
    },
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// Throw the catalog away and rebuild it from the store alone (pack footers and manifests)
    Rebuild,
}

pub fn default_repo() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/holdfast");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/holdfast")
}

fn parse_disk(s: &str) -> Result<(String, PathBuf)> {
    let (name, path) = s.split_once('=').ok_or_else(|| {
        Error::Invalid(format!(
            "--disk {s:?} must be NAME=PATH, e.g. --disk root=/var/lib/vm/web-01.img"
        ))
    })?;
    crate::names::check("disk", name)?;
    if path.is_empty() {
        return Err(Error::Invalid(format!(
            "--disk {s:?} has no path after '='"
        )));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Run the command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    let repo_dir = cli.repo.clone().unwrap_or_else(default_repo);
    let out = output::Out { json: cli.json };
    let bar = progress::Bar::new(cli.quiet || cli.json);
    let open = || {
        tracing::debug!("opening the repository");
        let r = Repo::open(&repo_dir);
        tracing::debug!("repository open");
        r
    };
    let config = vm::config_path(cli.config.as_deref(), &repo_dir);
    match cli.cmd {
        Cmd::Init {
            segment_size,
            chunk_min,
            chunk_avg,
            chunk_max,
            compression_level,
            s3,
            endpoint,
            region,
            path_style,
            cache_size,
            existing,
        } => {
            let params = crate::chunk::ChunkerParams {
                segment_size,
                min_size: chunk_min,
                avg_size: chunk_avg,
                max_size: chunk_max,
            };
            let repo = match s3 {
                Some(url) => {
                    let mut loc =
                        crate::store::s3::S3Location::parse(&url).map_err(Error::Invalid)?;
                    (loc.endpoint, loc.region, loc.path_style) = (endpoint, region, path_style);
                    Repo::init_s3(
                        &repo_dir,
                        loc,
                        params,
                        compression_level,
                        parse_size(&cache_size)?,
                        existing,
                    )?
                }
                None => Repo::init(&repo_dir, params, compression_level)?,
            };
            out.init(&repo);
        }
        Cmd::Backup {
            vm,
            disks,
            bitmap,
            since,
            qmp,
            agent,
            quiesce,
            full,
        } => {
            crate::names::check("VM", &vm)?;
            jobs::catch_interrupts();
            let repo = open()?;
            if qmp.is_some() || disks.is_empty() {
                if qmp.is_some() && disks.is_empty() {
                    return Err(Error::Invalid(
                        "--qmp needs the disks as --disk NAME=NODE (QEMU block node names)".into(),
                    ));
                }
                let a = vm::VmBackupArgs {
                    vm,
                    qmp,
                    agent,
                    disks,
                    quiesce,
                    full,
                };
                let m = vm::backup(&repo, &config, a, &bar)?;
                out.backup(&m);
                return Ok(0);
            }
            if quiesce || full || agent.is_some() {
                return Err(Error::Invalid(
                    "--quiesce, --full and --agent are for VMs in QEMU (declared, or with --qmp)"
                        .into(),
                ));
            }
            let mut specs = Vec::new();
            for d in &disks {
                let (name, path) = parse_disk(d)?;
                let p = path.to_string_lossy();
                let source: Box<dyn crate::source::Source> = if crate::source::is_nbd_uri(&p) {
                    Box::new(crate::source::NbdSource::connect(&p, bitmap.as_deref())?)
                } else if bitmap.is_some() {
                    return Err(Error::Invalid(format!("--bitmap needs NBD disks, but disk {name} is the file {p}; give an nbd:// or nbd+unix:// URI")));
                } else {
                    Box::new(FileSource::open(&path)?)
                };
                specs.push(DiskSpec {
                    name,
                    source,
                    since: since.clone(),
                    checkpoint: None,
                    origin: None,
                });
            }
            let m = jobs::backup::backup(&repo, &vm, specs, &test_hooks(), &bar)?;
            out.backup(&m);
        }
        Cmd::Backups { vm } => {
            if let Some(v) = &vm {
                crate::names::check("VM", v)?;
            }
            let repo = open()?;
            repo.sync()?;
            let ms = repo.manifests(vm.as_deref())?;
            if ms.is_empty() {
                if let Some(v) = &vm {
                    return Err(Error::NotFound(format!(
                        "no backups of VM {v:?}; `holdfast backups` lists every VM's backups"
                    )));
                }
            }
            out.backups(&ms);
        }
        Cmd::Show { spec } => {
            let repo = open()?;
            repo.sync()?;
            out.show(&repo.resolve(&spec)?);
        }
        Cmd::Restore {
            spec,
            disk,
            to,
            force,
        } => {
            let repo = open()?;
            repo.sync()?;
            let m = repo.resolve(&spec)?;
            let d = jobs::restore::pick_disk(&m, disk.as_deref())?;
            let _lock = jobs::lock::VmLock::acquire(&repo.dir, &m.vm, "restore")?;
            let r = jobs::restore::restore(&repo, &m, d, &to, force, &bar)?;
            out.restore(&r);
        }
        Cmd::Verify { spec, sample } => {
            if !(sample > 0.0 && sample <= 100.0) {
                return Err(Error::Invalid(format!(
                    "--sample {sample} must be a percentage above 0 and at most 100"
                )));
            }
            let repo = open()?;
            repo.sync()?;
            let ms = match &spec {
                Some(s) if s.contains('@') => vec![repo.resolve(s)?],
                Some(vm) => {
                    let ms = repo.manifests(Some(vm))?;
                    if ms.is_empty() {
                        repo.resolve(vm)?; // the not-found error
                    }
                    ms
                }
                None => repo.manifests(None)?,
            };
            let r = jobs::verify::verify(&repo, &ms, sample, &bar)?;
            out.verify(&r);
            if !r.damaged.is_empty() {
                return Ok(3);
            }
        }
        Cmd::Forget { spec } => {
            if !spec.contains('@') {
                return Err(Error::Invalid(format!(
                    "{spec:?}: give VM@ID (`holdfast backups VM` lists the ids)"
                )));
            }
            let repo = open()?;
            repo.sync()?;
            let m = jobs::gc::forget(&repo, &spec)?;
            out.forget(&m);
        }
        Cmd::Gc => {
            let repo = open()?;
            let r = jobs::gc::gc(&repo, &bar)?;
            out.gc(&r);
        }
        Cmd::Stats { price } => {
            let repo = open()?;
            repo.sync()?;
            out.stats(&jobs::stats::stats(&repo, price)?);
        }
        Cmd::Export {
            spec,
            disk,
            listen,
            writable,
            keep_overlay,
            cache,
        } => {
            let cache_bytes =
                parse_size(&cache).map_err(|e| Error::Invalid(format!("--cache: {e}")))?;
            let args = export::ExportArgs {
                spec: &spec,
                disk: disk.as_deref(),
                listen: &listen,
                writable,
                keep_overlay: keep_overlay.as_deref(),
                cache_bytes,
            };
            export::run(&repo_dir, args)?;
        }
        Cmd::Mount {
            mountpoint,
            vm,
            private,
        } => {
            if let Some(v) = &vm {
                crate::names::check("VM", v)?;
            }
            let repo = std::sync::Arc::new(open()?);
            repo.sync()?;
            if let Some(v) = &vm {
                if repo.manifests(Some(v))?.is_empty() {
                    return Err(Error::NotFound(format!(
                        "no backups of VM {v:?}; `holdfast backups` lists every VM's backups"
                    )));
                }
            }
            let cfg = crate::fuse::MountConfig {
                vm,
                allow_other: !private,
                threads: 4,
            };
            let at = mountpoint.display().to_string();
            crate::fuse::serve(repo, &mountpoint, cfg, || {
                println!("mounted holdfast backups at {at} (read-only); unmount with `holdfast umount {at}` or Ctrl-C");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })?;
        }
        Cmd::Umount { mountpoint, lazy } => {
            if crate::fuse::clean_stale(&mountpoint)? {
                println!(
                    "removed a stale holdfast mount at {} (its process had died)",
                    mountpoint.display()
                );
            } else {
                crate::fuse::unmount(&mountpoint, lazy)?;
                println!("unmounted {}", mountpoint.display());
            }
        }
        Cmd::Cat { spec } => {
            let fspec = jobs::browse::FileSpec::parse(&spec)?;
            let repo = std::sync::Arc::new(open()?);
            repo.sync()?;
            let b = jobs::browse::Browser::new(repo, 256, false);
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            jobs::files::cat(&b, &fspec, &mut lock)?;
        }
        Cmd::RestoreFiles { spec, to, devices } => {
            let fspec = jobs::browse::FileSpec::parse(&spec)?;
            let repo = std::sync::Arc::new(open()?);
            repo.sync()?;
            let b = jobs::browse::Browser::new(repo, 256, false);
            let r = jobs::files::restore_files(&b, &fspec, &to, devices, &bar)?;
            out.restore_files(&r);
        }
        Cmd::Vm { cmd } => vm::vm(cmd, &config, &repo_dir, cli.json)?,
        Cmd::Snapshot { cmd } => {
            let repo = open()?;
            vm::snapshot(cmd, &repo, &config, cli.json)?;
        }
        Cmd::Doctor { vm: name, dry_run } => {
            let repo = open()?;
            vm::doctor(&repo, &config, &name, dry_run, cli.json)?;
        }
        Cmd::Catalog {
            cmd: CatalogCmd::Rebuild,
        } => {
            refuse_if_busy(&repo_dir)?;
            let r = crate::repo::rebuild_catalog(&repo_dir)?;
            out.rebuild(&r);
        }
    }
    Ok(0)
}

/// Test-only: `HOLDFAST_TEST_PAUSE_BEFORE_COMMIT=PATH` makes a backup create `PATH.waiting`
/// when all its packs are durable, then wait (at most 5 minutes) until `PATH` exists.
pub(crate) fn test_hooks() -> jobs::backup::Hooks {
    let Some(flag) = std::env::var_os("HOLDFAST_TEST_PAUSE_BEFORE_COMMIT").map(PathBuf::from)
    else {
        return Default::default();
    };
    jobs::backup::Hooks {
        before_commit: Some(Box::new(move || {
            let _ = std::fs::write(flag.with_extension("waiting"), b"");
            let start = std::time::Instant::now();
            while !flag.exists() && start.elapsed().as_secs() < 300 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })),
    }
}

fn refuse_if_busy(dir: &Path) -> Result<()> {
    if let Some(s) = jobs::lock::running(dir).first() {
        return Err(Error::Busy(format!("a {} of VM {} (pid {}) is running; rebuild the catalog when no holdfast operation runs", s.op, s.vm, s.pid)));
    }
    Ok(())
}

/// `512M`, `4G`, `1T`, `0` or plain bytes.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => 0,
            };
            (&t[..i], mul)
        }
        _ => (t, 1),
    };
    match num.parse::<u64>() {
        Ok(n) if mul > 0 => n
            .checked_mul(mul)
            .ok_or_else(|| Error::Invalid(format!("size {s:?} is too large"))),
        _ => Err(Error::Invalid(format!(
            "{s:?} is not a size; write e.g. 512M or 4G"
        ))),
    }
}
