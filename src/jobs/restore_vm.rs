//! Restores that make or overwrite a VM's disks in any format QEMU reads: a new qcow2 image,
//! and a declared VM's own images in place. Both write through a qemu-nbd holdfast starts on a
//! private socket and stops (the NBD target of [`super::restore`]), so the image's format is
//! QEMU's business and its write lock refuses an image that is in use.

use super::restore::{check_target, lock_holder, partial_beside, restore, Partial, RestoreReport};
use crate::error::What;
use crate::repo::{DiskEntry, Manifest, Repo};
use crate::task::Ctx;
use crate::{Error, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Restore `disk` of backup `m` into a new qcow2 image at `to` ("a new VM from this
/// backup"): an empty qcow2 is created beside it under a partial name, served by a qemu-nbd
/// holdfast starts (on a private socket) and stops, written through NBD (only data; holes stay
/// unallocated), then renamed into place. Nothing is left behind on failure.
pub fn restore_qcow2(
    repo: &Repo,
    m: &Manifest,
    disk: &DiskEntry,
    to: &Path,
    force: bool,
    ctx: &Ctx,
) -> Result<RestoreReport> {
    check_target(to, force)?;
    let temp = partial_beside(to)?;
    let guard = Partial(temp.clone());
    tool(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&temp)
            .arg(disk.size.to_string()),
        "qemu-img",
    )?;
    let result = through_qemu_nbd(&temp, "qcow2", |uri| restore(repo, m, disk, uri, true, ctx));
    let mut report = result?;
    guard.commit(to)?;
    report.to = to.display().to_string();
    Ok(report)
}

/// Serve `image` (of `format`) with a qemu-nbd of our own on a private socket, run `f` with
/// its URI, stop it (whatever `f` returned). qemu-nbd takes the image's write lock: an image
/// another process has open is refused by it.
fn through_qemu_nbd<T>(
    image: &Path,
    format: &str,
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).map_err(|e| Error::internal(format!("no randomness: {e}")))?;
    let sock = std::env::temp_dir().join(format!("holdfast-restore-{}.sock", hex::encode(r)));
    let mut server = std::process::Command::new("qemu-nbd")
        .args(["-f", format, "--discard=unmap", "-k"])
        .arg(&sock)
        .arg(image)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| Error::Tool {
            tool: "qemu-nbd",
            message: format!("qemu-nbd: {e}; install qemu-utils"),
        })?;
    let stop = |server: &mut std::process::Child| {
        // SAFETY: kill(2) takes no pointers; the pid is our child, not yet reaped.
        unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
        let _ = server.wait();
        let _ = fs::remove_file(&sock);
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline || server.try_wait().ok().flatten().is_some() {
            stop(&mut server);
            return Err(Error::Tool {
                tool: "qemu-nbd",
                message: format!(
                    "qemu-nbd could not serve {} (in use, or not a {format} image?)",
                    image.display()
                ),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = PathBuf::from(format!("nbd+unix:///?socket={}", sock.display()));
    let result = f(&uri);
    stop(&mut server);
    result
}

/// The image file a disk of a VM backup was read from (`qemu node N file F`).
fn origin_file(d: &DiskEntry) -> Option<PathBuf> {
    let o = d.origin.as_deref()?;
    o.split_once(" file ").map(|(_, f)| PathBuf::from(f))
}

/// The format of an image file, as qemu-img says.
fn image_format(image: &Path) -> Result<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .map_err(|e| Error::Tool {
            tool: "qemu-img",
            message: format!("qemu-img: {e}; install qemu-utils"),
        })?;
    if !out.status.success() {
        return Err(Error::Conflict(format!(
            "cannot open {} for the restore: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(Error::internal)?;
    Ok(v["format"].as_str().unwrap_or("raw").to_string())
}

/// Restore backup `m` over the disks of the declared VM `vm`, in place. Refused while QEMU
/// is up (running, paused, or just holding the images); with it down, each disk's image
/// (where the backup read it) is written through a qemu-nbd holdfast starts and stops, so
/// any format QEMU reads works. A failure says which disks are complete; a re-run does the
/// whole job again.
pub fn restore_in_place(
    repo: &Repo,
    vm: &super::vms::Vm,
    m: &Manifest,
    ctx: &Ctx,
) -> Result<Vec<RestoreReport>> {
    if let Some(s) = super::vmsession::VmSession::try_connect(vm)? {
        let st = s.run("query-status", |c| async move {
            crate::qmp::ops::run_state(c).await
        });
        s.close();
        let status = st.map(|x| x.status).unwrap_or_else(|_| "up".into());
        return Err(Error::Conflict(format!(
            "VM {} is {status} (its QEMU answers on {}): a restore in place overwrites its \
             disks, so shut it down first (quit QEMU), then run this again",
            vm.name,
            vm.qmp.display()
        )));
    }
    let mut plan = Vec::new();
    for (name, _) in &vm.disks {
        let d = m.disks.iter().find(|d| &d.name == name).ok_or_else(|| {
            Error::not_found(
                What::Disk,
                name,
                format!("backup {}@{} has no disk {name}", m.vm, m.id),
            )
        })?;
        let file = origin_file(d).ok_or_else(|| {
            Error::usage(format!(
                "backup {}@{} does not say which image disk {name} was read from (not a \
                 backup through QEMU); restore it with --to PATH",
                m.vm, m.id
            ))
        })?;
        if let Some(holder) = lock_holder(&file)? {
            return Err(Error::Conflict(format!(
                "{} (disk {name}) is in use: {holder} holds a lock on it; shut the VM down first",
                file.display()
            )));
        }
        let format = image_format(&file)?;
        plan.push((d, file, format));
    }
    let mut done: Vec<RestoreReport> = Vec::new();
    for (d, file, format) in plan {
        ctx.info(&format!(
            "restoring disk {} into {} ({format})",
            d.name,
            file.display()
        ));
        let r = through_qemu_nbd(&file, &format, |uri| restore(repo, m, d, uri, true, ctx));
        match r {
            Ok(mut r) => {
                ctx.info(&format!("disk {} complete", d.name));
                r.to = file.display().to_string();
                done.push(r);
            }
            Err(e) => {
                let complete: Vec<&str> = done.iter().map(|r| r.disk.as_str()).collect();
                ctx.warn(&format!(
                    "disk {} is incomplete; complete: {}; run the restore again to finish",
                    d.name,
                    if complete.is_empty() {
                        "none".into()
                    } else {
                        complete.join(", ")
                    }
                ));
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Run a tool to completion; its stderr is the error.
fn tool(cmd: &mut std::process::Command, name: &'static str) -> Result<()> {
    let out = cmd.output().map_err(|e| Error::Tool {
        tool: name,
        message: format!("{name}: {e}; install qemu-utils"),
    })?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: name,
            message: format!(
                "{name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}
