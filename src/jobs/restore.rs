//! Restore one disk of a backup to a sparse raw image (or a block device).
//!
//! Every chunk is re-hashed as it is read; a damaged chunk stops the restore with an error and
//! the partial file is removed: wrong bytes are never left behind. A regular-file target is
//! written to a hidden temp file beside it and renamed into place at the end.

use crate::catalog::PackId;
use crate::chunk::{BlobId, BlobKind};
use crate::error::What;
use crate::repo::format::SegEntry;
use crate::repo::{DiskEntry, Manifest, Repo};
use crate::task::{Ctx, Events};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub vm: String,
    pub backup: String,
    pub disk: String,
    pub to: String,
    pub size: u64,
    pub data_bytes: u64,
    pub seconds: f64,
    /// What went to an NBD target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdCounts>,
}

/// Requests a restore sent to an NBD target, and the holes it skipped.
#[derive(Debug, Serialize, Default, Clone)]
pub struct NbdCounts {
    pub writes: u64,
    /// WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO that the server did fast.
    pub fast_zeroes: u64,
    /// Plain WRITE_ZEROES (no fast zero offered, or the server said it would be slow).
    pub zeroes: u64,
    /// The target read zeros throughout (base:allocation), so holes were skipped.
    pub target_read_zeros: bool,
    pub holes_skipped: u64,
}

/// Pick the disk to restore: the named one, or the only one.
pub fn pick_disk<'m>(m: &'m Manifest, name: Option<&str>) -> Result<&'m DiskEntry> {
    let names = || {
        m.disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(n) => m.disks.iter().find(|d| d.name == n).ok_or_else(|| {
            Error::not_found(
                What::Disk,
                n,
                format!(
                    "backup {}@{} has no disk {n:?}; it has: {}",
                    m.vm,
                    m.id,
                    names()
                ),
            )
        }),
        None if m.disks.len() == 1 => Ok(&m.disks[0]),
        None => Err(Error::usage(format!(
            "backup {}@{} has several disks ({}); choose one with --disk",
            m.vm,
            m.id,
            names()
        ))),
    }
}

/// Where a restore writes.
enum Sink {
    File(File),
    Nbd(NbdSink),
}

/// An NBD export written to (qemu-nbd or qemu-storage-daemon serving raw or qcow2, RBD, …):
/// data runs are written, several requests in flight while the next segments are decoded;
/// holes are skipped on a target that reads zeros throughout (base:allocation says so), else
/// become WRITE_ZEROES (with NBD_CMD_FLAG_FAST_ZERO where offered, plain ones once the server
/// says fast zeroing is not available); the end waits for every request, then flushes.
struct NbdSink {
    rt: tokio::runtime::Runtime,
    client: std::sync::Arc<crate::nbd::Client>,
    /// Permits for requests in flight.
    inflight: std::sync::Arc<tokio::sync::Semaphore>,
    /// The first failed request's error.
    failed: std::sync::Arc<Mutex<Option<String>>>,
    /// The whole target reads zeros: holes need no request.
    zeroed: bool,
    /// Try NBD_CMD_FLAG_FAST_ZERO (offered, and not yet refused as slow).
    fast_zero: AtomicBool,
    writes: AtomicU64,
    fast_zeroes: AtomicU64,
    zeroes: AtomicU64,
    holes_skipped: AtomicU64,
}

/// Requests a restore keeps in flight to an NBD target.
const NBD_INFLIGHT: u32 = 16;

/// What a restore sends to an NBD target.
enum NbdOp {
    Write(Vec<u8>),
    Zero(u32),
}

impl NbdSink {
    /// Send `op` at `off` without waiting for its reply (at most NBD_INFLIGHT in flight); a
    /// failure is kept and returned by the next call, and by [`NbdSink::drain`].
    fn send(&self, off: u64, op: NbdOp, what: &Path) -> Result<()> {
        self.check(what)?;
        if let NbdOp::Zero(len) = op {
            // Fast zero waits for its reply: a server that says "slow" once gets plain
            // WRITE_ZEROES from then on.
            if self.fast_zero.load(Ordering::Relaxed) {
                match self.rt.block_on(self.client.write_zeroes_fast(off, len)) {
                    Ok(true) => {
                        self.fast_zeroes.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Ok(false) => self.fast_zero.store(false, Ordering::Relaxed),
                    Err(e) => {
                        return Err(Error::io(
                            format!("zero {} at {off}", what.display()),
                            std::io::Error::other(e.to_string()),
                        ))
                    }
                }
            }
        }
        let permit = self
            .rt
            .block_on(self.inflight.clone().acquire_owned())
            .map_err(|e| Error::internal(format!("NBD request slots: {e}")))?;
        let counter = match op {
            NbdOp::Write(_) => &self.writes,
            NbdOp::Zero(_) => &self.zeroes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let client = self.client.clone();
        let failed = self.failed.clone();
        self.rt.spawn(async move {
            let r = match op {
                NbdOp::Write(data) => client.write(off, &data).await,
                NbdOp::Zero(len) => client.write_zeroes(off, len, false).await,
            };
            if let Err(e) = r {
                crate::sys::lock(&failed).get_or_insert(format!("at {off}: {e}"));
            }
            drop(permit);
        });
        Ok(())
    }

    fn check(&self, what: &Path) -> Result<()> {
        match crate::sys::lock(&self.failed).clone() {
            None => Ok(()),
            Some(e) => Err(Error::io(
                format!("write {}", what.display()),
                std::io::Error::other(e),
            )),
        }
    }

    /// Wait for every request in flight; the first failure is the error.
    fn drain(&self, what: &Path) -> Result<()> {
        let all = self
            .rt
            .block_on(self.inflight.acquire_many(NBD_INFLIGHT))
            .map_err(|e| Error::internal(format!("NBD request slots: {e}")))?;
        drop(all);
        self.check(what)
    }
}

/// Whether the whole NBD export reads zeros (base:allocation says ZERO everywhere): a bounded
/// walk that stops at the first extent that is not.
async fn reads_zeros(client: &crate::nbd::Client) -> bool {
    use crate::nbd::proto::STATE_ZERO;
    let size = client.size();
    let mut at = 0u64;
    for _ in 0..100_000 {
        if at >= size {
            return true;
        }
        let len = (size - at).min(1 << 30) as u32;
        let Ok(extents) = client.block_status_for(at, len, "base:allocation").await else {
            return false;
        };
        let Some(last) = extents.last() else {
            return false;
        };
        if extents.iter().any(|e| e.flags & STATE_ZERO == 0) {
            return false;
        }
        at = last.offset + u64::from(last.len);
    }
    false
}

struct Target {
    sink: Sink,
    final_path: PathBuf,
    temp: Option<PathBuf>,
    /// Holes are written too (zeros on a block device, WRITE_ZEROES over NBD): the target is
    /// not a new sparse file.
    is_block: bool,
    /// The packs the restore read from (their entry tables are checked before the commit).
    read_from: Mutex<BTreeSet<PackId>>,
}

/// `nbd://…` or `nbd+unix://…`: an NBD export, not a file path.
pub fn is_nbd(to: &Path) -> bool {
    to.to_str().is_some_and(crate::source::is_nbd_uri)
}

impl Target {
    fn write(&self, b: &[u8], at: u64) -> Result<()> {
        match &self.sink {
            Sink::File(f) => f
                .write_all_at(b, at)
                .map_err(|e| Error::io(format!("write {}", self.final_path.display()), e)),
            Sink::Nbd(n) => {
                let max = crate::nbd::proto::MAX_PAYLOAD as usize;
                for (i, part) in b.chunks(max).enumerate() {
                    let off = at + (i * max) as u64;
                    n.send(off, NbdOp::Write(part.to_vec()), &self.final_path)?;
                }
                Ok(())
            }
        }
    }

    /// Zeros over `len` bytes at `at`: on NBD a WRITE_ZEROES (explicit zeros where the server
    /// has none); on a block device plain zeros; nothing in a new sparse file.
    fn zero(&self, at: u64, len: u64, zeros: &[u8]) -> Result<()> {
        match &self.sink {
            Sink::Nbd(n) if n.zeroed => {
                n.holes_skipped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Sink::Nbd(n) if n.client.flags() & crate::nbd::proto::FLAG_SEND_WRITE_ZEROES != 0 => {
                n.send(at, NbdOp::Zero(len as u32), &self.final_path)
            }
            _ if self.is_block => self.write(&zeros[..len as usize], at),
            _ => Ok(()),
        }
    }
}

/// Connect to the NBD export `uri` for writing `size` bytes: refused before a byte is
/// written when it is read-only or smaller.
fn open_nbd(uri: &str, size: u64) -> Result<Target> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the NBD client", e))?;
    let opts = crate::nbd::ConnectOptions {
        structured_replies: true,
        meta_contexts: vec!["base:allocation".into()],
        max_in_flight: NBD_INFLIGHT as usize,
    };
    let client = rt
        .block_on(crate::nbd::Client::connect(uri, &opts))
        .map_err(|e| {
            Error::Source(crate::source::SourceError::Nbd {
                uri: uri.to_string(),
                msg: format!("cannot connect ({e}); is the NBD server running and the URI right?"),
            })
        })?;
    if client.is_read_only() {
        return Err(Error::usage(format!(
            "{uri} is a read-only export; serve it writable (qemu-nbd without -r)"
        )));
    }
    if client.size() < size {
        return Err(Error::usage(format!(
            "{uri} holds {} bytes, the disk {size}: a smaller target is refused before a byte \
             is written",
            client.size()
        )));
    }
    let zeroed = rt.block_on(reads_zeros(&client));
    let fast_zero = client.flags() & crate::nbd::proto::FLAG_SEND_FAST_ZERO != 0;
    Ok(Target {
        sink: Sink::Nbd(NbdSink {
            rt,
            client: std::sync::Arc::new(client),
            inflight: std::sync::Arc::new(tokio::sync::Semaphore::new(NBD_INFLIGHT as usize)),
            failed: Default::default(),
            zeroed,
            fast_zero: AtomicBool::new(fast_zero),
            writes: AtomicU64::new(0),
            fast_zeroes: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            holes_skipped: AtomicU64::new(0),
        }),
        final_path: PathBuf::from(uri),
        temp: None,
        is_block: true,
        read_from: Default::default(),
    })
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(t) = self.temp.take() {
            let _ = fs::remove_file(t);
        }
    }
}

/// Refuse a target a restore must not destroy: a directory; a symlink (a dangling one would
/// be silently replaced, a live one replaced instead of what it names); a character device,
/// FIFO or socket (only regular files and block devices take images); a file or block device
/// another process holds a lock on (QEMU locks the images it has open: overwriting one is
/// destroying a running VM's disk); a qcow2 or other container (a raw image would replace it,
/// with its snapshots and backing chain). `force` overrides only "the file exists". Checked
/// again when the target is opened; checking first refuses a request before its task starts.
pub fn check_target(to: &Path, force: bool) -> Result<()> {
    if is_nbd(to) {
        return Ok(()); // checked when connected: writable, large enough
    }
    let lm = match fs::symlink_metadata(to) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("look at {}", to.display()), e)),
    };
    if lm.file_type().is_symlink() {
        let link = fs::read_link(to)
            .map(|l| l.display().to_string())
            .unwrap_or_else(|_| "?".into());
        let says = match fs::metadata(to) {
            Ok(_) => format!(
                "{} is a symlink to {link}; give the real path (a restore would replace the \
                 link, not what it names)",
                to.display()
            ),
            Err(_) => format!(
                "{} is a symlink to {link}, which does not exist; nothing is written to a \
                 dangling link: give the real path",
                to.display()
            ),
        };
        return Err(Error::usage(says));
    }
    let ft = lm.file_type();
    if lm.is_dir() {
        return Err(Error::usage(format!(
            "{} is a directory; give the path of the image file to write",
            to.display()
        )));
    }
    if !ft.is_file() && !ft.is_block_device() {
        let what = if ft.is_char_device() {
            "a character device"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(Error::usage(format!(
            "{} is {what}: a restore writes only to an image file or a block device",
            to.display()
        )));
    }
    if let Some(holder) = lock_holder(to)? {
        return Err(Error::Conflict(format!(
            "{} is in use: {holder} holds a lock on it (QEMU locks the images of running VMs); \
             restoring over it would destroy that disk. Shut the VM down first, or restore to \
             another path",
            to.display()
        )));
    }
    if ft.is_block_device() {
        return Ok(());
    }
    if let Some(format) = container(to) {
        return Err(Error::Conflict(format!(
            "{} is a {format} image: a restore writes a raw image and would replace it, with \
             any snapshots and backing chain in it; --force does not override this. Remove it \
             first, or restore to another path",
            to.display()
        )));
    }
    if !force {
        return Err(Error::exists(
            What::File,
            to.display().to_string(),
            format!("{} exists; pass --force to overwrite it", to.display()),
        ));
    }
    Ok(())
}

/// Who holds a lock on `path` (any process, POSIX or OFD locks), if anyone.
pub(super) fn lock_holder(path: &Path) -> Result<Option<String>> {
    use std::os::fd::AsRawFd;
    let f = match OpenOptions::new().read(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
    };
    // SAFETY: flock is plain data; all-zero is a valid value that is filled in below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // the whole file
                  // SAFETY: F_OFD_GETLK reads and writes the flock struct we own; the fd is open.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(Error::io(
            format!("check the locks on {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    // OFD locks belong to open files, not processes (l_pid is -1): name the holder if a
    // process lock says who it is.
    Ok(Some(match fl.l_pid {
        p if p > 0 => format!("process {p}"),
        _ => "another process".to_string(),
    }))
}

/// The container format of an existing image file, by its magic (None: raw or unknown).
fn container(path: &Path) -> Option<&'static str> {
    let mut head = [0u8; 8];
    let f = File::open(path).ok()?;
    let n = f.read_at(&mut head, 0).ok()?;
    let h = &head[..n];
    [
        (&b"QFI\xfb"[..], "qcow2"),
        (&b"KDMV"[..], "vmdk"),
        (&b"QED\0"[..], "qed"),
        (&b"vhdxfile"[..], "vhdx"),
        (&b"conectix"[..], "vpc"),
    ]
    .into_iter()
    .find(|(magic, _)| h.starts_with(magic))
    .map(|(_, name)| name)
    .or_else(|| {
        // VDI: "<<< " at 0 and the signature at 64.
        let mut sig = [0u8; 4];
        (f.read_at(&mut sig, 64).ok()? == 4 && sig == [0x7f, 0x10, 0xda, 0xbe]).then_some("vdi")
    })
}

fn open_target(to: &Path, size: u64, force: bool) -> Result<Target> {
    if is_nbd(to) {
        return open_nbd(&to.to_string_lossy(), size);
    }
    let meta = fs::metadata(to).ok();
    if let Some(m) = &meta {
        if m.file_type().is_block_device() {
            check_target(to, force)?;
            // O_EXCL: refused (EBUSY) while the device is mounted or held exclusively.
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_EXCL)
                .open(to)
                .map_err(|e| Error::io(format!("open {} (in use?)", to.display()), e))?;
            let have = {
                use std::io::Seek;
                (&file)
                    .seek(std::io::SeekFrom::End(0))
                    .map_err(|e| Error::io(format!("size {}", to.display()), e))?
            };
            if have < size {
                return Err(Error::usage(format!(
                    "{} holds {have} bytes, the disk {size}: a smaller target is refused \
                     before a byte is written",
                    to.display()
                )));
            }
            return Ok(Target {
                sink: Sink::File(file),
                final_path: to.into(),
                temp: None,
                is_block: true,
                read_from: Default::default(),
            });
        }
        check_target(to, force)?;
    }
    let temp = partial_beside(to)?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)
        .map_err(|e| Error::io(format!("create {}", temp.display()), e))?;
    file.set_len(size)
        .map_err(|e| Error::io(format!("size {}", to.display()), e))?;
    Ok(Target {
        sink: Sink::File(file),
        final_path: to.into(),
        temp: Some(temp),
        is_block: false,
        read_from: Default::default(),
    })
}

/// The partial file a restore to the file `to` writes first (beside it, so the final rename
/// stays in one filesystem), after removing what killed restores to `to` left there.
pub(super) fn partial_beside(to: &Path) -> Result<PathBuf> {
    let name = to
        .file_name()
        .ok_or_else(|| Error::usage(format!("{} is not a file path", to.display())))?;
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::not_found(
            What::Directory,
            dir.display().to_string(),
            format!(
                "directory {} does not exist; create it first",
                dir.display()
            ),
        ));
    }
    for stale in stale_partials(to) {
        let _ = fs::remove_file(stale);
    }
    Ok(dir.join(format!(
        "{}{}",
        partial_prefix(&name.to_string_lossy()),
        std::process::id()
    )))
}

/// A partial file, removed unless whatever writes it completes (and forgets the guard).
pub(super) struct Partial(pub(super) PathBuf);

impl Partial {
    /// The partial file is whole: sync it, rename it to `to`, sync the directory.
    pub(super) fn commit(self, to: &Path) -> Result<()> {
        let what = |e| Error::io(format!("write {}", to.display()), e);
        File::open(&self.0)
            .and_then(|f| f.sync_all())
            .map_err(what)?;
        fs::rename(&self.0, to).map_err(what)?;
        std::mem::forget(self);
        let dir = to
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(what)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The name a restore to a file named `name` writes first: `.NAME.holdfast-partial.PID`.
fn partial_prefix(name: &str) -> String {
    format!(".{name}.holdfast-partial.")
}

/// Partial files that restores to `to` left behind when their processes died (killed, or the
/// machine restarted).
pub fn stale_partials(to: &Path) -> Vec<PathBuf> {
    let (Some(name), Some(dir)) = (to.file_name(), to.parent()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = partial_prefix(&name.to_string_lossy());
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(&prefix)
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !crate::sys::pid_alive(pid))
        })
        .map(|e| e.path())
        .collect()
}

impl Target {
    fn commit(mut self) -> Result<()> {
        let what = || format!("write {}", self.final_path.display());
        match &self.sink {
            Sink::File(f) => f.sync_all().map_err(|e| Error::io(what(), e))?,
            Sink::Nbd(n) => {
                n.drain(&self.final_path)?;
                if n.client.flags() & crate::nbd::proto::FLAG_SEND_FLUSH != 0 {
                    n.rt.block_on(n.client.flush())
                        .map_err(|e| Error::io(what(), std::io::Error::other(e.to_string())))?;
                }
            }
        }
        if let Some(t) = self.temp.take() {
            fs::rename(&t, &self.final_path).map_err(|e| Error::io(what(), e))?;
            let dir = self
                .final_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(what(), e))?;
        }
        Ok(())
    }
}

/// Restore `disk` of backup `m` to `to` (stops at the next segment when cancelled, and leaves
/// nothing behind).
pub fn restore(
    repo: &Repo,
    m: &Manifest,
    disk: &DiskEntry,
    to: &Path,
    force: bool,
    ctx: &Ctx,
) -> Result<RestoreReport> {
    let progress = ctx.events;
    let started = Instant::now();
    let segs = repo.disk_segments(disk)?;
    let target = open_target(to, disk.size, force)?;
    progress.phase("restore", disk.data_bytes);
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let seg = u64::from(disk.segment_size);
    std::thread::scope(|s| {
        for _ in 0..repo.io_workers() {
            s.spawn(|| {
                let mut buf = Vec::new();
                while !failed.load(Ordering::Relaxed) {
                    if let Err(e) = ctx.check() {
                        failed.store(true, Ordering::Relaxed);
                        crate::sys::lock(&first_err).get_or_insert(e);
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = segs.get(i as usize) else {
                        break;
                    };
                    crate::hooks::segment_delay();
                    let start = i * seg;
                    let len = seg.min(disk.size - start);
                    let r = restore_segment(
                        repo,
                        slot.as_ref(),
                        start,
                        len,
                        &target,
                        &mut buf,
                        progress,
                    );
                    if let Err(e) = r {
                        failed.store(true, Ordering::Relaxed);
                        crate::sys::lock(&first_err).get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e); // Target's drop removes the partial file
    }
    check_packs(repo, &crate::sys::lock(&target.read_from))?;
    let nbd = match &target.sink {
        Sink::Nbd(n) => Some(NbdCounts {
            writes: n.writes.load(Ordering::Relaxed),
            fast_zeroes: n.fast_zeroes.load(Ordering::Relaxed),
            zeroes: n.zeroes.load(Ordering::Relaxed),
            target_read_zeros: n.zeroed,
            holes_skipped: n.holes_skipped.load(Ordering::Relaxed),
        }),
        Sink::File(_) => None,
    };
    target.commit()?;
    Ok(RestoreReport {
        nbd,
        vm: m.vm.clone(),
        backup: m.id.clone(),
        disk: disk.name.clone(),
        to: to.display().to_string(),
        size: disk.size,
        data_bytes: disk.data_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Restore one segment: chunks are assembled in `buf` and each run of data goes out in one write
/// (fewer, larger writes: two workers writing one file contend on its inode lock).
fn restore_segment(
    repo: &Repo,
    seglist: Option<&BlobId>,
    start: u64,
    len: u64,
    t: &Target,
    buf: &mut Vec<u8>,
    progress: &dyn Events,
) -> Result<()> {
    let write = |b: &[u8], at: u64| t.write(b, at);
    let nbd = matches!(t.sink, Sink::Nbd(_));
    buf.clear();
    buf.resize(len as usize, 0);
    let Some(id) = seglist else {
        return t.zero(start, len, buf);
    };
    let entries = repo.seglist(id, len)?;
    // All of the segment's chunks in one go: a remote store fetches neighbours in one request.
    let mut ids = Vec::new();
    let mut offsets = Vec::new();
    let mut at = 0u64;
    for e in &entries {
        if let SegEntry::Chunk(cid, _) = e {
            ids.push(*cid);
            offsets.push(at);
        }
        at += u64::from(e.len());
    }
    let mut items = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let loc = repo
            .locate(id)
            .map_err(|e| located(e, start + offsets[i]))?;
        items.push((*id, loc));
    }
    crate::sys::lock(&t.read_from).extend(items.iter().map(|(_, l)| l.pack));
    let mut chunks = Vec::with_capacity(items.len());
    for (i, r) in repo
        .read_located(repo.store.as_ref(), BlobKind::Chunk, &items)
        .into_iter()
        .enumerate()
    {
        chunks.push(r.map_err(|e| located(e, start + offsets[i]))?);
    }
    let mut chunks = chunks.into_iter();
    let mut at = 0usize;
    let mut run: Option<usize> = None; // start of the current data run inside buf
                                       // Over NBD, data runs are written and holes zeroed, each as it ends; a block device
                                       // takes the whole segment in one write (zeros included); a new file only the data.
    let runs = nbd || !t.is_block;
    for e in entries {
        let l = e.len() as usize;
        match e {
            SegEntry::Hole(_) => {
                if let (Some(r), true) = (run.take(), runs) {
                    write(&buf[r..at], start + r as u64)?;
                }
                if nbd {
                    t.zero(start + at as u64, l as u64, &buf[at..at + l])?;
                }
            }
            SegEntry::Chunk(..) => {
                let data = chunks.next().expect("one blob per chunk entry");
                buf[at..at + l].copy_from_slice(&data);
                run.get_or_insert(at);
                progress.progress(l as u64);
            }
        }
        at += l;
    }
    match (run, runs) {
        (_, false) => write(buf, start),
        (Some(r), true) => write(&buf[r..at], start + r as u64),
        (None, true) => Ok(()),
    }
}

/// Before a restore is committed: the entry tables of every pack it read from check out. A
/// pack that was tampered with is damage even where the blobs read still authenticate, and
/// the restore is refused (its partial file removed) rather than trusted.
pub(super) fn check_packs(repo: &Repo, packs: &BTreeSet<PackId>) -> Result<()> {
    match repo
        .check_pack_tables(repo.store.as_ref(), packs)
        .into_iter()
        .next()
    {
        None => Ok(()),
        Some((p, e)) => Err(Error::damaged(
            "pack",
            format!(
                "pack {} is damaged ({e}); nothing was restored: run `holdfast verify` to see \
                 what it affects",
                hex::encode(p)
            ),
        )),
    }
}

fn located(e: Error, at: u64) -> Error {
    match e {
        Error::Chunk(c) => Error::damaged(
            "chunk",
            format!("{c} (disk offset {at}); nothing was restored"),
        ),
        Error::Damaged { what, message } => Error::Damaged {
            what,
            message: format!("{message} (disk offset {at}); nothing was restored"),
        },
        other => other,
    }
}
