//! `holdfast backup`, `backups`, `show`, `forget`.

use super::Cmdline;
use crate::ops::{parse_named, BackupRequest};
use crate::Result;
use clap::Args;
use std::path::PathBuf;

pub const BACKUP_HELP: &str = "Examples:\n  \
holdfast backup web-01 --disk root=/var/lib/vm/web-01.img --disk data=/dev/vg0/web-01-data\n  \
holdfast backup web-01 --disk root='nbd+unix:///root?socket=/run/qsd.sock' --bitmap hf-1\n  \
holdfast backup web-01                       (a VM declared with `holdfast vm add`)\n  \
holdfast backup web-01 --qmp /run/qemu/web-01.qmp --disk root=disk0 --quiesce\n\n\
A VM in QEMU is read from a point-in-time read point while it keeps running; only the 4 MiB\n\
segments its dirty bitmap marks since the last backup are read. With --bitmap (NBD disks), only\n\
the segments that hold dirty blocks are read; every other segment is taken unread from the\n\
backup the bitmap started from (--since, default: the latest backup).\n\n\
Ctrl-C (or a closed terminal) stops the backup: nothing is committed and nothing is left in\n\
QEMU; the next run reuses what was already uploaded. `holdfast task ID` shows what it did.";

#[derive(Args)]
pub struct BackupArgs {
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
}

pub fn backup(cx: &Cmdline, a: BackupArgs) -> Result<i32> {
    crate::names::check("VM", &a.vm)?;
    let disks = a
        .disks
        .iter()
        .map(|d| match a.qmp {
            Some(_) => parse_named(d, "NODE", "root=disk0"),
            None => parse_named(d, "PATH", "root=/var/lib/vm/web-01.img"),
        })
        .collect::<Result<Vec<_>>>()?;
    let req = BackupRequest {
        vm: a.vm,
        disks,
        bitmap: a.bitmap,
        since: a.since,
        qmp: a.qmp,
        agent: a.agent,
        quiesce: a.quiesce,
        full: a.full,
        scheduled: false,
    };
    let r = cx.app.backup(req, &cx.term())?;
    cx.out.backup(&r.manifest);
    Ok(0)
}

pub fn backups(cx: &Cmdline, vm: Option<String>) -> Result<i32> {
    cx.out.backups(&cx.app.backups(vm.as_deref())?);
    Ok(0)
}

pub fn show(cx: &Cmdline, spec: &str) -> Result<i32> {
    cx.out.show(&cx.app.show(spec)?);
    Ok(0)
}

pub fn forget(cx: &Cmdline, spec: &str, damaged: bool) -> Result<i32> {
    if damaged {
        let gone = cx.app.forget_damaged(spec, &cx.term())?;
        if cx.json {
            say!("{}", serde_json::json!({ "forgot": gone, "damaged": true }));
        } else {
            say!(
                "removed the damaged manifest of {gone}: that backup is lost; `holdfast gc` frees \
                 what only it used"
            );
        }
        return Ok(0);
    }
    cx.out.forget(&cx.app.forget(spec, &cx.term())?);
    Ok(0)
}
