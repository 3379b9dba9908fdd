//! Single files and directory trees out of a backup, without mounting: `holdfast cat` and
//! `holdfast restore-files`.
//!
//! Invariants:
//! - Nothing half-written: a tree is restored into a hidden temporary directory beside the
//!   target and renamed into place only when every file is complete and synced; on any error
//!   the temporary directory is removed and the target does not exist.
//! - An existing target is never overwritten.
//! - Files keep their mode, owner (when run as root), timestamps, symlinks and hard links
//!   (within the restored tree); holes in the guest files stay holes.
//! - Damaged data is an error (exit 3) naming the file, never wrong bytes.

use crate::browse::{guest_error, locate, Browser, FileSpec, Located};
use crate::error::What;
use crate::guestfs::{Attr, Filesystem, Kind};
use crate::task::{Ctx, Events};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const BLOCK: usize = 1 << 20;
/// Deepest directory nesting followed (a hostile guest could build cycles).
const MAX_DEPTH: usize = 256;

/// Write the file at `spec` to `out` (a final symlink is followed inside the guest).
pub fn cat(b: &Browser, spec: &FileSpec, out: &mut dyn Write) -> Result<u64> {
    let l = locate(b, spec, true)?;
    match l.attr.kind {
        Kind::File => {}
        Kind::Dir => {
            return Err(Error::usage(format!(
                "/{} is a directory; copy it out with `holdfast restore-files`, or browse with \
                 `holdfast mount`",
                spec.path
            )))
        }
        _ => {
            return Err(Error::usage(format!(
                "/{} is not a regular file",
                spec.path
            )))
        }
    }
    let mut buf = vec![0u8; BLOCK];
    let mut at = 0u64;
    while at < l.attr.size {
        let n =
            l.fs.read(l.attr.ino, at, &mut buf)
                .map_err(|e| guest_error(&l.part, &spec.path, e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| Error::io("write to standard output", e))?;
        at += n as u64;
    }
    out.flush()
        .map_err(|e| Error::io("write to standard output", e))?;
    Ok(at)
}

#[derive(Debug, Default, Serialize)]
pub struct FilesReport {
    /// Where the tree or file now is.
    pub path: PathBuf,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub special: u64,
    /// Device nodes left out (without `--devices`, or when not run as root).
    pub skipped_devices: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// One item of the tree to restore, in creation order (parents first).
struct Item {
    rel: PathBuf,
    attr: Attr,
}

/// Removes the temporary tree unless disarmed.
struct TempTree(Option<PathBuf>);

impl Drop for TempTree {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
}

/// Temporary trees that restores into the directory `to` left behind when their processes
/// died (`.NAME.holdfast-PID`).
pub fn stale_trees(to: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(to) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with('.')
                && n.rsplit_once(".holdfast-")
                    .and_then(|(_, pid)| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !crate::sys::pid_alive(pid))
        })
        .map(|e| e.path())
        .collect()
}

/// Where `spec` is restored to inside `to` (an existing directory): `(name, TO/name)`, which
/// must not exist yet.
fn target_of(spec: &FileSpec, to: &Path) -> Result<(String, PathBuf)> {
    if !to.is_dir() {
        return Err(Error::not_found(
            What::Directory,
            to.display().to_string(),
            format!(
                "{} is not a directory; create it first, or pick another --to",
                to.display()
            ),
        ));
    }
    let name = match spec.path.rsplit('/').next().filter(|s| !s.is_empty()) {
        Some(n) => n.to_string(),
        None => format!("{}-{}", spec.disk, spec.part),
    };
    let target = to.join(&name);
    if target.symlink_metadata().is_ok() {
        return Err(Error::exists(
            What::File,
            target.display().to_string(),
            format!(
                "{} exists; holdfast never overwrites: remove it or pick another --to",
                target.display()
            ),
        ));
    }
    Ok((name, target))
}

/// Copy the file or directory at `spec` into the existing directory `to`. Device nodes are
/// recreated only with `devices` (and as root): a guest's device node is a host device here.
pub fn restore_files(
    b: &Browser,
    spec: &FileSpec,
    to: &Path,
    devices: bool,
    ctx: &Ctx,
) -> Result<FilesReport> {
    let progress = ctx.events;
    let started = std::time::Instant::now();
    let (name, target) = target_of(spec, to)?;
    let l = locate(b, spec, false)?;
    let items = walk(&l, &spec.path)?;
    let total: u64 = items
        .iter()
        .filter(|i| i.attr.kind == Kind::File)
        .map(|i| i.attr.size)
        .sum();
    progress.phase("restore-files", total);
    let tmp = to.join(format!(".{name}.holdfast-{}", std::process::id()));
    let mut guard = TempTree(Some(tmp.clone()));
    let mut rep = FilesReport::default();
    let as_root = crate::sys::is_root();
    let mut links: HashMap<u64, PathBuf> = HashMap::new();
    for it in &items {
        ctx.check()?;
        if matches!(it.attr.kind, Kind::CharDev | Kind::BlockDev) && !(devices && as_root) {
            rep.skipped_devices += 1;
            continue;
        }
        let dst = if it.rel.as_os_str().is_empty() {
            tmp.clone()
        } else {
            tmp.join(&it.rel)
        };
        if it.attr.kind != Kind::Dir && it.attr.nlink > 1 {
            if let Some(first) = links.get(&it.attr.ino) {
                std::fs::hard_link(first, &dst)
                    .map_err(|e| Error::io(format!("link {}", dst.display()), e))?;
                rep.hardlinks += 1;
                continue;
            }
            links.insert(it.attr.ino, dst.clone());
        }
        create(&l, spec, it, &dst, &mut rep, progress)?;
        if it.attr.kind != Kind::Dir {
            set_meta(&dst, &it.attr, as_root)?;
        }
    }
    // Directories last and deepest first, so adding their entries does not change their times.
    for it in items.iter().rev().filter(|i| i.attr.kind == Kind::Dir) {
        let dst = if it.rel.as_os_str().is_empty() {
            tmp.clone()
        } else {
            tmp.join(&it.rel)
        };
        set_meta(&dst, &it.attr, as_root)?;
    }
    sync_tree(to)?;
    rename_noreplace(&tmp, &target)?;
    guard.0 = None;
    crate::sys::fsync_dir(to).map_err(|e| Error::io(format!("sync {}", to.display()), e))?;
    rep.path = target;
    rep.seconds = started.elapsed().as_secs_f64();
    Ok(rep)
}

/// Everything under the located node, parents before children.
fn walk(l: &Located, path: &str) -> Result<Vec<Item>> {
    let mut out = vec![Item {
        rel: PathBuf::new(),
        attr: l.attr.clone(),
    }];
    let mut seen_dirs = HashSet::from([l.attr.ino]);
    let mut i = 0;
    while i < out.len() {
        if out[i].attr.kind == Kind::Dir {
            let depth = out[i].rel.components().count();
            if depth >= MAX_DEPTH {
                return Err(Error::Guest {
                    part: l.part.label().to_string(),
                    path: format!("/{path}"),
                    source: crate::guestfs::GuestFsError::TooLarge(format!(
                        "directories nested deeper than {MAX_DEPTH}"
                    )),
                });
            }
            let mut entries =
                l.fs.readdir(out[i].attr.ino)
                    .map_err(|e| guest_error(&l.part, path, e))?;
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            let base = out[i].rel.clone();
            for e in entries {
                let name = OsStr::from_bytes(&e.name);
                if e.name.contains(&b'/') || name == "." || name == ".." || e.name.is_empty() {
                    continue; // not a name a Linux filesystem can hold
                }
                let attr =
                    l.fs.getattr(e.ino)
                        .map_err(|e| guest_error(&l.part, path, e))?;
                if attr.kind == Kind::Dir && !seen_dirs.insert(attr.ino) {
                    continue; // a directory reached twice: a damaged or hostile tree
                }
                out.push(Item {
                    rel: base.join(name),
                    attr,
                });
            }
        }
        i += 1;
    }
    Ok(out)
}

fn create(
    l: &Located,
    spec: &FileSpec,
    it: &Item,
    dst: &Path,
    rep: &mut FilesReport,
    progress: &dyn Events,
) -> Result<()> {
    let err = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", dst.display()), e);
    match it.attr.kind {
        Kind::Dir => {
            std::fs::create_dir(dst).map_err(|e| err("create", e))?;
            rep.dirs += 1;
        }
        Kind::File => {
            let shown = Path::new(&spec.path).join(&it.rel);
            copy_file(l.fs.as_ref(), &it.attr, dst, progress).map_err(|e| match e {
                CopyError::Guest(g) => guest_error(&l.part, &shown.to_string_lossy(), g),
                CopyError::Local(e) => err("write", e),
            })?;
            rep.files += 1;
            rep.bytes += it.attr.size;
        }
        Kind::Symlink => {
            let t =
                l.fs.readlink(it.attr.ino)
                    .map_err(|e| guest_error(&l.part, &spec.path, e))?;
            std::os::unix::fs::symlink(OsStr::from_bytes(&t), dst)
                .map_err(|e| err("create symlink", e))?;
            rep.symlinks += 1;
        }
        Kind::Fifo | Kind::CharDev | Kind::BlockDev | Kind::Socket => {
            let kind = match it.attr.kind {
                Kind::Fifo => libc::S_IFIFO,
                Kind::CharDev => libc::S_IFCHR,
                Kind::BlockDev => libc::S_IFBLK,
                _ => libc::S_IFSOCK,
            };
            let c = cstr(dst)?;
            let dev = libc::makedev(
                (it.attr.rdev >> 8) & 0xfff,
                (it.attr.rdev & 0xff) | ((it.attr.rdev >> 12) & 0xfff00),
            );
            // SAFETY: a valid path; mknod has no other preconditions.
            if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) } != 0 {
                return Err(err("create", std::io::Error::last_os_error()));
            }
            rep.special += 1;
        }
    }
    Ok(())
}

enum CopyError {
    Guest(crate::guestfs::GuestFsError),
    Local(std::io::Error),
}

/// Copy one guest file; all-zero blocks are left as holes.
fn copy_file(
    fs: &dyn Filesystem,
    a: &Attr,
    dst: &Path,
    progress: &dyn Events,
) -> std::result::Result<(), CopyError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(CopyError::Local)?;
    let mut buf = vec![0u8; BLOCK];
    let mut at = 0u64;
    while at < a.size {
        let n = fs.read(a.ino, at, &mut buf).map_err(CopyError::Guest)?;
        if n == 0 {
            break;
        }
        // Runs of 4 KiB blocks that are not all zero; the rest stays a hole.
        let mut i = 0;
        while i < n {
            let zero = |k: usize| buf[k..(k + 4096).min(n)].iter().all(|&b| b == 0);
            if zero(i) {
                i += 4096;
                continue;
            }
            let start = i;
            while i < n && !zero(i) {
                i += 4096;
            }
            let end = i.min(n);
            f.write_all_at(&buf[start..end], at + start as u64)
                .map_err(CopyError::Local)?;
        }
        at += n as u64;
        progress.progress(n as u64);
    }
    f.set_len(a.size).map_err(CopyError::Local)?;
    Ok(())
}

/// Rename that fails instead of replacing a target created meanwhile.
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    let (a, b) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Err(Error::exists(
            What::File,
            to.display().to_string(),
            format!(
                "{} appeared while restoring; holdfast never overwrites: remove it or pick \
                 another --to",
                to.display()
            ),
        ));
    }
    Err(Error::io(
        format!("rename {} to {}", from.display(), to.display()),
        e,
    ))
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::usage(format!("{} has a NUL byte", p.display())))
}

/// Owner (as root), mode (not for symlinks) and times, without following symlinks.
fn set_meta(dst: &Path, a: &Attr, as_root: bool) -> Result<()> {
    let c = cstr(dst)?;
    let fail = |what: &str| {
        Error::io(
            format!("{what} {}", dst.display()),
            std::io::Error::last_os_error(),
        )
    };
    // SAFETY: valid NUL-terminated paths and initialized timespecs for each call.
    unsafe {
        if as_root && libc::lchown(c.as_ptr(), a.uid, a.gid) != 0 {
            return Err(fail("chown"));
        }
        if a.kind != Kind::Symlink
            && libc::chmod(c.as_ptr(), libc::mode_t::from(a.perm & 0o7777)) != 0
        {
            return Err(fail("chmod"));
        }
        let ts = |t: crate::guestfs::Time| libc::timespec {
            tv_sec: t.secs as libc::time_t,
            tv_nsec: libc::c_long::from(t.nanos.min(999_999_999) as i32),
        };
        let times = [ts(a.atime), ts(a.mtime)];
        if libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            return Err(fail("set times of"));
        }
    }
    Ok(())
}

/// Make everything written under `dir` durable (one syncfs for the whole filesystem).
fn sync_tree(dir: &Path) -> Result<()> {
    let f =
        std::fs::File::open(dir).map_err(|e| Error::io(format!("open {}", dir.display()), e))?;
    // SAFETY: a valid open file descriptor.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) } != 0 {
        return Err(Error::io(
            format!("sync {}", dir.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
