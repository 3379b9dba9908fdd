//! One operation at a time per VM.
//!
//! `locks/<vm>.lock` is held with `flock` for the life of the operation (the kernel releases it
//! if the process dies), and `locks/<vm>.json` says what runs and how far it got, so a second
//! operation fails at once with a useful message. GC reads the `.json` files of live processes
//! to know which backups are in flight.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LockState {
    pub vm: String,
    pub op: String,
    pub pid: u32,
    /// Unix milliseconds when the operation started.
    pub started_ms: u64,
    pub done: u64,
    pub total: u64,
}

pub struct VmLock {
    _file: File,
    json: PathBuf,
    state: Mutex<(LockState, Instant)>,
}

fn locks_dir(repo_dir: &Path) -> PathBuf {
    repo_dir.join("locks")
}

fn human(b: u64) -> String {
    indicatif::HumanBytes(b).to_string()
}

impl VmLock {
    pub fn acquire(repo_dir: &Path, vm: &str, op: &str) -> Result<VmLock> {
        let dir = locks_dir(repo_dir);
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let path = dir.join(format!("{vm}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        // SAFETY: flock on a valid fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let json = dir.join(format!("{vm}.json"));
            let what = fs::read(&json)
                .ok()
                .and_then(|b| serde_json::from_slice::<LockState>(&b).ok())
                .map(|s| {
                    let pct = (s.done * 100)
                        .checked_div(s.total)
                        .map(|p| format!(", {p}% done ({} of {})", human(s.done), human(s.total)))
                        .unwrap_or_default();
                    format!(
                        "a {} (pid {}, started {}{pct})",
                        s.op,
                        s.pid,
                        crate::timefmt::rfc3339(s.started_ms / 1000)
                    )
                })
                .unwrap_or_else(|| "another operation".to_string());
            return Err(Error::Busy(format!(
                "VM {vm} is busy: {what} is running; wait for it to finish, then retry"
            )));
        }
        let state = LockState {
            vm: vm.into(),
            op: op.into(),
            pid: std::process::id(),
            started_ms: crate::timefmt::now_millis(),
            done: 0,
            total: 0,
        };
        let lock = VmLock {
            _file: file,
            json: dir.join(format!("{vm}.json")),
            state: Mutex::new((state, Instant::now())),
        };
        lock.write_state()?;
        Ok(lock)
    }

    pub fn started_ms(&self) -> u64 {
        self.state.lock().map(|s| s.0.started_ms).unwrap_or(0)
    }

    fn write_state(&self) -> Result<()> {
        let s = self
            .state
            .lock()
            .map(|s| s.0.clone())
            .map_err(|_| Error::Invalid("lock state poisoned".into()))?;
        let tmp = self
            .json
            .with_extension(format!("json.{}", std::process::id()));
        let body = serde_json::to_vec(&s).map_err(|e| Error::Invalid(e.to_string()))?;
        fs::write(&tmp, body)
            .and_then(|_| fs::rename(&tmp, &self.json))
            .map_err(|e| Error::io(format!("write {}", self.json.display()), e))
    }

    /// Record progress (written at most once a second).
    pub fn progress(&self, done: u64, total: u64) {
        let due = {
            let Ok(mut s) = self.state.lock() else { return };
            let first = s.0.total != total;
            s.0.done = done;
            s.0.total = total;
            let due = first || done == total || s.1.elapsed().as_millis() >= 1000;
            if due {
                s.1 = Instant::now();
            }
            due
        };
        if due {
            let _ = self.write_state();
        }
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.json);
    }
}

/// Operations running now (their processes are alive), as recorded in `locks/`.
pub fn running(repo_dir: &Path) -> Vec<LockState> {
    let Ok(rd) = fs::read_dir(locks_dir(repo_dir)) else {
        return vec![];
    };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice::<LockState>(&fs::read(e.path()).ok()?).ok())
        .filter(|s| crate::store::pid_alive(s.pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_is_refused_with_the_running_one_named() {
        let d = tempfile::tempdir().unwrap();
        let a = VmLock::acquire(d.path(), "vm1", "backup").unwrap();
        a.progress(50, 200);
        let err = VmLock::acquire(d.path(), "vm1", "restore")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("VM vm1 is busy: a backup (pid"), "{err}");
        assert!(VmLock::acquire(d.path(), "vm2", "backup").is_ok());
        assert_eq!(running(d.path()).len(), 1);
        drop(a);
        assert!(VmLock::acquire(d.path(), "vm1", "restore").is_ok());
    }
}
