//! A new image from a snapshot's disk state ("create a new server from this snapshot").
//!
//! The snapshot's state is immutable once taken, so it is read beside a running VM without
//! stopping it: an internal snapshot is a set of qcow2 clusters the running image only ever
//! copies on write (`qemu-img convert -l snapshot.name=TAG`), an external one is the base image
//! under the overlay, which QEMU opened read-only. Both are read with `-U` (QEMU holds the
//! image's lock) while the VM's lock (the task's) keeps the snapshot from being deleted or
//! reverted meanwhile. The image is written under a partial name beside the target and renamed
//! into place when whole; a failure leaves nothing.

use super::offline::{holds_tag, path};
use super::records::{record, Kind, SnapDisk, Snapshot};
use crate::jobs::restore::{check_target, partial_beside, Partial};
use crate::jobs::vms::Vm;
use crate::task::Ctx;
use crate::{Error, Result};
use serde::Serialize;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct CloneReport {
    pub vm: String,
    pub snapshot: String,
    pub disk: String,
    pub to: String,
    pub format: String,
    /// The disk's virtual size.
    pub size: u64,
    pub seconds: f64,
}

/// The image formats a clone writes.
pub fn check_format(f: &str) -> Result<()> {
    match f {
        "raw" | "qcow2" => Ok(()),
        _ => Err(Error::usage(format!("--format {f:?}: raw or qcow2"))),
    }
}

/// The disk of `s` to clone: the named one, or the only one.
fn pick<'s>(s: &'s Snapshot, disk: Option<&str>) -> Result<&'s SnapDisk> {
    let names = || {
        s.disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match disk {
        Some(n) => s.disks.iter().find(|d| d.name == n).ok_or_else(|| {
            Error::not_found(
                crate::error::What::Disk,
                n,
                format!(
                    "snapshot {} of VM {} has no disk {n:?}; it has: {}",
                    s.name,
                    s.vm,
                    names()
                ),
            )
        }),
        None if s.disks.len() == 1 => Ok(&s.disks[0]),
        None => Err(Error::usage(format!(
            "snapshot {} of VM {} has several disks ({}); choose one with --disk",
            s.name,
            s.vm,
            names()
        ))),
    }
}

/// Write disk `disk` of snapshot `name` of `vm` to a new image `to` of `format`. Refuses an
/// existing target unless `force` (and never one in use or a container a raw image would
/// replace, as restores do). The caller holds the VM's lock.
#[allow(clippy::too_many_arguments)] // one per option of the command
pub fn clone(
    repo: &crate::repo::Repo,
    vm: &Vm,
    name: &str,
    disk: Option<&str>,
    to: &Path,
    format: &str,
    force: bool,
    ctx: &Ctx,
) -> Result<CloneReport> {
    super::check_name(name)?;
    check_format(format)?;
    let s = record(repo, &vm.name, name)?;
    let d = pick(&s, disk)?;
    check_target(to, force)?;
    // What the snapshot's state is read from, and how.
    let mut source: Vec<String> = vec!["-f".into(), d.format.clone()];
    match s.kind {
        Kind::Internal => {
            if !holds_tag(&d.file, &s.tag)? {
                return Err(Error::Conflict(format!(
                    "disk {} ({}) no longer holds snapshot {} (tag {}); nothing was written",
                    d.name, d.file, s.name, s.tag
                )));
            }
            source.extend(["-l".into(), format!("snapshot.name={}", s.tag)]);
        }
        Kind::External => {
            // The base must still be the overlay's backing image: a base committed into (the
            // snapshot deleted behind holdfast's back) is no longer the snapshot's state.
            if let Some(ov) = &d.overlay {
                if !ov.file.exists() {
                    return Err(Error::Conflict(format!(
                        "the overlay {} of snapshot {} is gone: {} may no longer hold the \
                         snapshot's state; nothing was written",
                        ov.file.display(),
                        s.name,
                        d.file
                    )));
                }
            }
        }
    }
    let size = virtual_size(&d.file, &d.format)?;
    let started = Instant::now();
    let temp = partial_beside(to)?;
    let guard = Partial(temp.clone());
    ctx.events.phase("clone", size);
    let mut args: Vec<String> = vec!["convert".into(), "-U".into(), "-p".into()];
    args.extend(source);
    args.extend(["-O".into(), format.into()]);
    if format == "raw" {
        args.extend(["-S".into(), "4k".into()]); // holes stay holes
    }
    args.push(d.file.clone());
    args.push(path(&temp)?.to_string());
    convert(&args, size, ctx)?;
    guard.commit(to)?;
    Ok(CloneReport {
        vm: vm.name.clone(),
        snapshot: s.name.clone(),
        disk: d.name.clone(),
        to: to.display().to_string(),
        format: format.to_string(),
        size,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The virtual size of an image (read beside the QEMU that holds it).
fn virtual_size(file: &str, format: &str) -> Result<u64> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", format, file])
        .output()
        .map_err(|e| Error::io("run qemu-img (apt-get install qemu-utils)", e))?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: "qemu-img",
            message: format!(
                "qemu-img info {file} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(Error::internal)?;
    v["virtual-size"]
        .as_u64()
        .ok_or_else(|| Error::internal(format!("qemu-img info {file}: no virtual-size")))
}

/// Run `qemu-img convert` with `-p`, turning its percentages into the task's progress (of
/// `size` bytes); cancelling the task ends it.
fn convert(args: &[String], size: u64, ctx: &Ctx) -> Result<()> {
    let mut child = std::process::Command::new("qemu-img")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("run qemu-img (apt-get install qemu-utils)", e))?;
    let mut stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let mut out = child.stdout.take();
    let mut done = 0u64;
    let mut text = Vec::new();
    let mut buf = [0u8; 256];
    while let Some(o) = out.as_mut() {
        if ctx.cancel.is_cancelled() {
            // SAFETY: kill(2) takes no pointers; the pid is our child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            break;
        }
        let n = match o.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        text.extend_from_slice(&buf[..n]);
        // "    (12.34/100%)\r": the last whole reading.
        if let Some(pct) = last_percent(&text) {
            let now = (size as f64 * pct / 100.0) as u64;
            if now > done {
                ctx.events.progress(now - done);
                done = now;
            }
            text.clear();
        }
    }
    let status = child
        .wait()
        .map_err(|e| Error::io("wait for qemu-img", e))?;
    let err = err_reader.join().unwrap_or_default();
    ctx.check()?;
    if !status.success() {
        return Err(Error::Tool {
            tool: "qemu-img",
            message: format!(
                "qemu-img {} failed: {}",
                args.join(" "),
                err.trim().replace('\n', " ")
            ),
        });
    }
    if done < size {
        ctx.events.progress(size - done);
    }
    Ok(())
}

/// The last complete `(P/100%)` reading in qemu-img's progress output.
fn last_percent(text: &[u8]) -> Option<f64> {
    let s = String::from_utf8_lossy(text);
    let end = s.rfind("/100%)")?;
    let start = s[..end].rfind('(')? + 1;
    s[start..end].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn progress_readings_are_parsed_from_the_last_whole_one() {
        assert_eq!(super::last_percent(b"    (0.00/100%)\r"), Some(0.0));
        assert_eq!(
            super::last_percent(b"    (1.01/100%)\r    (42.50/100%)\r    (4"),
            Some(42.5)
        );
        assert_eq!(super::last_percent(b"    (4"), None);
        assert!(super::check_format("vmdk").is_err());
    }
}
