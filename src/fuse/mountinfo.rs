//! Finding, cleaning and unmounting holdfast's FUSE mounts through `/proc/self/mountinfo`.
//!
//! A holdfast mount has the filesystem type `fuse` and the source `holdfast:PID` (the serving
//! process). It is stale when that process is gone: the kernel then answers ENOTCONN
//! for the mount point, and the next `holdfast mount` there detaches it first.

use crate::{Error, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undo mountinfo's octal escapes (`\040` for a space, …).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of mountinfo: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`.
fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mountpoint = left.split(' ').nth(4)?;
    let mut r = right.split(' ');
    let fstype = r.next()?;
    let source = r.next()?;
    Some(MountEntry {
        mountpoint: PathBuf::from(unescape(mountpoint)),
        fstype: fstype.into(),
        source: unescape(source),
    })
}

pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| s.lines().filter_map(parse_line).collect())
        .unwrap_or_default()
}

/// `path` made absolute without touching the mount itself (a stale mount cannot be stat'ed).
fn absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => parent.canonicalize().map(|p| p.join(name)).unwrap_or(abs),
        _ => abs,
    }
}

/// The holdfast mount at `path`, if there is one (the last one mounted there).
pub fn holdfast_mount(path: &Path) -> Option<MountEntry> {
    let want = absolute(path);
    mounts().into_iter().rev().find(|m| {
        m.mountpoint == want && m.fstype.starts_with("fuse") && m.source.starts_with("holdfast:")
    })
}

fn serving_pid(m: &MountEntry) -> Option<u32> {
    m.source.strip_prefix("holdfast:")?.parse().ok()
}

/// Detach a holdfast mount at `path` whose process is gone. True when one was cleaned.
pub fn clean_stale(path: &Path) -> Result<bool> {
    let Some(m) = holdfast_mount(path) else {
        return Ok(false);
    };
    let dead = matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
        || serving_pid(&m).is_some_and(|pid| !crate::sys::pid_alive(pid));
    if !dead {
        return Ok(false);
    }
    umount2(&m.mountpoint, libc::MNT_DETACH)
        .map_err(|e| Error::io(format!("detach the stale mount {}", path.display()), e))?;
    Ok(true)
}

fn umount2(path: &Path, flags: i32) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmount the holdfast mount at `path` (`lazy`: detach it now even while files are open).
/// The serving process ends once the kernel lets go.
pub fn unmount(path: &Path, lazy: bool) -> Result<()> {
    let Some(m) = holdfast_mount(path) else {
        return Err(Error::not_found(
            crate::error::What::Mount,
            path.display().to_string(),
            format!(
                "{} is not a holdfast mount (`grep holdfast: /proc/self/mountinfo` lists them)",
                path.display()
            ),
        ));
    };
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    match umount2(&m.mountpoint, flags) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error::busy(
            "mount",
            format!(
                "{} is busy: a process has files or its working directory there; close them, or \
                 use `holdfast umount --lazy {}`",
                path.display(),
                path.display()
            ),
        )),
        Err(e) => Err(Error::io(format!("unmount {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let l = "36 35 0:42 / /mnt/with\\040space rw,nosuid shared:1 - fuse.holdfast holdfast:1234 ro,user_id=0";
        let m = parse_line(l).unwrap();
        assert_eq!(m.mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(
            (m.fstype.as_str(), m.source.as_str()),
            ("fuse.holdfast", "holdfast:1234")
        );
        assert_eq!(serving_pid(&m), Some(1234));
        assert!(parse_line("garbage").is_none());
        assert_eq!(unescape("a\\134b"), "a\\b");
    }
}
