//! `holdfast export`, `mount`, `umount`, `cat`, `restore-files`.

use super::{usage, Cmdline};
use crate::jobs::export::Listen;
use crate::ops::{parse_size, CatRequest, ExportRequest, MountRequest, RestoreFilesRequest};
use crate::task::Serving;
use crate::Result;
use clap::Args;
use std::path::PathBuf;

pub const EXPORT_HELP: &str =
    "Examples:\n  holdfast export web-01 --listen unix:/run/hf-web01.sock\n  \
holdfast export web-01@20261122-101500 --disk root --listen tcp:10809 --writable\n\n\
Clients: nbdinfo/nbdcopy/qemu-img with nbd+unix:///DISK?socket=PATH or nbd://HOST:PORT/DISK.\n\
The store is never written: with --writable, writes go to an overlay file that is deleted on\n\
exit unless --keep-overlay PATH keeps it (PATH, plus its block map PATH.map). Ctrl-C, SIGTERM or\n\
SIGHUP stop the export cleanly.";

pub const MOUNT_HELP: &str = "Layout:\n  MOUNTPOINT/<vm>/latest                 the newest backup (a symlink)\n  \
MOUNTPOINT/<vm>/<id>/<disk>.img         the raw disk\n  \
MOUNTPOINT/<vm>/<id>/<disk>/p1.img      a raw partition\n  \
MOUNTPOINT/<vm>/<id>/<disk>/p1/...      its files (ext2/3/4, FAT12/16/32, NTFS)\n  \
MOUNTPOINT/<vm>/<id>/<disk>/fs/...      a disk that is one filesystem without a partition table\n\n\
Runs in the foreground until `holdfast umount MOUNTPOINT`, Ctrl-C, SIGTERM or SIGHUP. Damaged data\n\
is an I/O error for the reads that touch it, never wrong bytes.\n\n\
Example:\n  mkdir -p /mnt/holdfast && holdfast mount /mnt/holdfast &\n  ls /mnt/holdfast/web-01/latest/root/p2/etc";

pub const RESTORE_FILES_HELP: &str =
    "Example: holdfast restore-files web-01:root/p2/etc/nginx --to /tmp/restored\n\n\
Creates TO/<last path component> (or TO/DISK-PART for a whole filesystem); an existing one is\n\
never overwritten. Nothing is left behind if the copy fails.";

#[derive(Args)]
pub struct ExportArgs {
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
    /// Close a client that sends no request for this long, e.g. 30m (default: never, since a
    /// VM booted from the export may leave its disk idle for hours). Clients that never finish
    /// the handshake are closed after 10 s, and one address may hold 16 connections
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
}

pub fn export(cx: &Cmdline, a: ExportArgs) -> Result<i32> {
    let cache_bytes = parse_size(&a.cache).map_err(|e| usage(format!("--cache: {e}")))?;
    let req = ExportRequest {
        spec: a.spec,
        disk: a.disk,
        listen: Listen::parse(&a.listen)?,
        writable: a.writable,
        keep_overlay: a.keep_overlay,
        cache_bytes,
        idle_timeout: a
            .idle_timeout
            .as_deref()
            .map(crate::jobs::vms::parse_duration)
            .transpose()
            .map_err(|e| usage(format!("--idle-timeout: {e}")))?,
    };
    cx.app.export(req, &cx.term())?;
    Ok(0)
}

#[derive(Args)]
pub struct MountArgs {
    /// An existing empty directory
    mountpoint: PathBuf,
    /// Show only this VM's backups
    #[arg(long)]
    vm: Option<String>,
    /// Only root may browse (default: every user, with the guests' own permissions)
    #[arg(long)]
    private: bool,
}

fn mounted(s: &Serving) -> String {
    format!(
        "mounted {} at {} (read-only); unmount with {}",
        s.what, s.at, s.stop
    )
}

pub fn mount(cx: &Cmdline, a: MountArgs) -> Result<i32> {
    let req = MountRequest {
        mountpoint: a.mountpoint,
        vm: a.vm,
        private: a.private,
    };
    cx.app.mount(req, &cx.term().announce(mounted))?;
    Ok(0)
}

pub fn umount(cx: &Cmdline, mountpoint: PathBuf, lazy: bool) -> Result<i32> {
    let r = cx.app.umount(mountpoint, lazy)?;
    if r.stale {
        say!(
            "removed a stale holdfast mount at {} (its process had died)",
            r.mountpoint.display()
        );
    } else {
        say!("unmounted {}", r.mountpoint.display());
    }
    Ok(0)
}

pub fn cat(cx: &Cmdline, spec: String) -> Result<i32> {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    match cx.app.cat(&CatRequest { spec }, &mut lock) {
        // The reader went away (`holdfast cat … | head`): stop quietly.
        Err(crate::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(0)
        }
        Err(e) => Err(e),
        Ok(_) => Ok(0),
    }
}

#[derive(Args)]
pub struct RestoreFilesArgs {
    /// VM[@ID]:DISK/PART/PATH (VM alone means the newest backup)
    spec: String,
    /// An existing directory to restore into
    #[arg(long)]
    to: PathBuf,
    /// Recreate the guest's device nodes too (as root; they are host devices here)
    #[arg(long)]
    devices: bool,
}

pub fn restore_files(cx: &Cmdline, a: RestoreFilesArgs) -> Result<i32> {
    let req = RestoreFilesRequest {
        spec: a.spec,
        to: a.to,
        devices: a.devices,
    };
    cx.out
        .restore_files(&cx.app.restore_files(&req, &cx.term())?);
    Ok(0)
}
