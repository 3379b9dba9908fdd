//! Small operating-system helpers that every layer may use: worker counts, process checks,
//! poison-tolerant locking, file locks, crash-safe file writes and signals.
//!
//! A leaf: it imports nothing from the crate. Whatever several layers need from the OS lives
//! here, so that `repo`, `image` or `catalog` never reach up into `jobs` for it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Worker threads for CPU-bound stages (hashing, compression, decompression).
pub fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 64)
}

/// True while a process with this pid exists on this host.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    pid != 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// When the process started, in clock ticks since boot (field 22 of `/proc/PID/stat`), or
/// None when it does not exist. With the pid it names one process: pids are reused.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// True while the process `pid` that started at `start` (see [`process_start`]) runs.
pub fn process_alive(pid: u32, start: Option<u64>) -> bool {
    match (start, process_start(pid)) {
        (Some(want), Some(now)) => want == now,
        (None, _) => pid_alive(pid),
        (Some(_), None) => false,
    }
}

/// This process's pid and start time.
pub fn this_process() -> (u32, Option<u64>) {
    let pid = std::process::id();
    (pid, process_start(pid))
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The user this process runs as (for task records): `$USER`, else the numeric uid.
pub fn user_name() -> String {
    if let Some(u) = std::env::var_os("USER").filter(|u| !u.is_empty()) {
        return u.to_string_lossy().into_owned();
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        "root".into()
    } else {
        uid.to_string()
    }
}

/// Lock a mutex; a panic in another holder does not poison the data for us (every holder
/// leaves it consistent between statements).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`lock`] for reading an `RwLock`.
pub fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

/// [`lock`] for writing an `RwLock`.
pub fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// An exclusive lock on a file, held until dropped; the kernel releases it when the process
/// dies, so a lock is never left behind.
pub struct FileLock {
    file: File,
}

impl FileLock {
    fn open(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
    }

    /// The lock on `path` (created if missing), or None when another holder has it.
    pub fn try_acquire(path: &Path) -> std::io::Result<Option<FileLock>> {
        let file = Self::open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock { file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// The lock on `path`, waiting for it.
    pub fn acquire(path: &Path) -> std::io::Result<FileLock> {
        let file = Self::open(path)?;
        file.lock()?;
        Ok(FileLock { file })
    }

    /// Replace the file's contents (a note for whoever finds it locked).
    pub fn set_contents(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Seek;
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(bytes)
    }
}

/// fsync a directory, making the renames and creations in it durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `path` with `bytes` atomically: a temp file beside it, written, optionally fsynced,
/// renamed over it (and with `durable`, the directory fsynced). Readers see the old or the new
/// contents, never a mix; the temp file is removed on failure. The file is the owner's only
/// (0600), whatever the umask: these are repository state, user records and keys.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable {
            fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A temp file name of [`write_atomic`] left by a process that died: `(pid)`.
pub fn temp_file_pid(name: &str) -> Option<u32> {
    let rest = &name[name.find(".tmp.")? + 5..];
    rest.split('.').next()?.parse().ok()
}

/// Which signal asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
    Hangup,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
            Signal::Hangup => "SIGHUP",
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from the moment `catch` returns (they no longer end
/// the process by default), on a small runtime of their own so any thread can wait for them.
pub struct Signals {
    rt: tokio::runtime::Runtime,
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn catch() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (int, term, hup) = {
            let _in_rt = rt.enter();
            (
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::hangup())?,
            )
        };
        Ok(Signals { rt, int, term, hup })
    }

    /// Block until the next SIGINT, SIGTERM or SIGHUP.
    pub fn wait(&mut self) -> Signal {
        let Signals { rt, int, term, hup } = self;
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => Signal::Interrupt,
                _ = term.recv() => Signal::Terminate,
                _ = hup.recv() => Signal::Hangup,
            }
        })
    }
}

/// Make every file and directory this process creates private to its owner (umask 077):
/// repositories hold customer data and keys, whatever umask holdfast was started with. RocksDB
/// creates its own files, so only the umask reaches them.
pub fn private_files() {
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
}

/// Take group and other permissions off `dir` and everything under it (directories 0700,
/// files 0600); symlinks are left alone. Returns how many entries were changed.
pub fn tighten_tree(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let mut changed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        let want = mode & 0o700;
        if mode != want {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(want))?;
            changed += 1;
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(changed)
}

/// True when `path` may be read or written by other users (group or other bits set).
pub fn is_shared(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// The default repository directory: `/var/lib/holdfast` as root, else
/// `~/.local/share/holdfast`.
pub fn default_repo() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/holdfast");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/holdfast")
}

/// True when standard input is a terminal (a person can be asked).
pub fn stdin_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdin())
}

/// Standard input on a terminal: read a line with echo off (the prompt on stderr).
pub fn prompt_hidden(prompt: &str) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed termios they fill.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let saved = t;
        t.c_lflag &= !libc::ECHO;
        libc::tcsetattr(0, libc::TCSANOW, &t);
        let mut e = std::io::stderr();
        let _ = write!(e, "{prompt}");
        let _ = e.flush();
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line);
        libc::tcsetattr(0, libc::TCSANOW, &saved);
        let _ = writeln!(e);
        r?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

/// Why a secret file (key, passphrase) may not be used: others than its owner may read it.
pub fn secret_file_problem(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).ok()?;
    (md.mode() & 0o077 != 0).then(|| {
        format!(
            "{} is readable by others (mode {:o}): a secret must be 0600 (chmod 600 {})",
            path.display(),
            md.mode() & 0o777,
            path.display()
        )
    })
}

/// This machine's host name (for records that say where something was made).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_one_is_not() {
        let (pid, start) = this_process();
        assert!(start.is_some());
        assert!(process_alive(pid, start));
        assert!(!process_alive(pid, start.map(|s| s + 1)), "a reused pid");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let cpid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(cpid, None) || process_start(cpid).is_some());
    }

    #[test]
    fn file_lock_is_exclusive_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        let mut a = FileLock::try_acquire(&p).unwrap().unwrap();
        a.set_contents(b"task-1").unwrap();
        assert!(FileLock::try_acquire(&p).unwrap().is_none());
        assert_eq!(std::fs::read(&p).unwrap(), b"task-1");
        drop(a);
        assert!(FileLock::try_acquire(&p).unwrap().is_some());
    }

    #[test]
    fn a_shared_tree_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("f"), b"x").unwrap();
        for p in [d.path(), &d.path().join("a"), &sub] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(sub.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(is_shared(d.path()));
        assert_eq!(tighten_tree(d.path()).unwrap(), 4);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            (mode(d.path()), mode(&sub), mode(&sub.join("f"))),
            (0o700, 0o700, 0o600)
        );
        assert!(!is_shared(d.path()));
        assert_eq!(tighten_tree(d.path()).unwrap(), 0);
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write_atomic(&p, b"one", true).unwrap();
        write_atomic(&p, b"two two", false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two two");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temp file left");
        assert_eq!(temp_file_pid(".f.json.tmp.123.4"), Some(123));
        assert_eq!(temp_file_pid("f.json"), None);
    }
}
