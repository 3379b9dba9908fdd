//! The local directory backend (the embedded default).
//!
//! `put` writes `<key>.tmp.<pid>.<n>`, fsyncs it, links it to the key (a link never replaces
//! an existing file: keys are write-once, and a different write to an existing key is refused
//! with `Exists`), removes the temp name and fsyncs the directory; a guard removes the temp
//! file if anything fails. Temp files left by a killed
//! process are removed by `sweep_temp`.
//!
//! Ranged reads keep the last few files open (objects are immutable once written, so an open
//! file can only hold the right bytes); `delete` closes the deleted key's file. A file deleted
//! by another process stays readable, and its space held, until it leaves that small set.

use super::{check_key, ObjectStore, StoreError, StoreResult};
use crate::sys::{fsync_dir, pid_alive};
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct LocalStore {
    root: PathBuf,
    seq: AtomicU64,
    /// Files open for ranged reads, most recently opened last.
    open: Mutex<VecDeque<(String, Arc<File>)>>,
}

/// Most files [`LocalStore`] keeps open for ranged reads.
const OPEN_FILES: usize = 16;

struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore {
            root: root.into(),
            seq: AtomicU64::new(0),
            open: Mutex::new(VecDeque::new()),
        }
    }

    fn open_files(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, Arc<File>)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `key` opened for reading, from the set of open files when it is there.
    fn open_for_read(&self, key: &str) -> StoreResult<Arc<File>> {
        if let Some((_, f)) = self.open_files().iter().find(|(k, _)| k == key) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.path(key)?).map_err(|e| StoreError::io(key, e))?);
        let mut open = self.open_files();
        open.push_back((key.to_string(), f.clone()));
        if open.len() > OPEN_FILES {
            open.pop_front();
        }
        Ok(f)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> StoreResult<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Remove temp files whose writer process is gone. Returns how many were removed.
    pub fn sweep_temp(&self) -> usize {
        let mut n = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    if p.file_name()
                        .is_some_and(|n| n != "catalog" && n != "locks" && n != "tasks")
                    {
                        stack.push(p);
                    }
                    continue;
                }
                let name = e.file_name().to_string_lossy().to_string();
                if let Some(pid) = temp_pid(&name) {
                    if !pid_alive(pid) && fs::remove_file(&p).is_ok() {
                        n += 1;
                    }
                }
            }
        }
        n
    }
}

/// `len` bytes of `f` at `offset` into a new buffer that is not zeroed first.
fn pread_exact(f: &File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::io::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = i64::try_from(offset + buf.len() as u64)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let spare = buf.spare_capacity_mut();
        // SAFETY: pread writes at most `spare.len()` bytes into the spare capacity we own.
        let r = unsafe { libc::pread(f.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // SAFETY: the kernel initialized the next `r` bytes (r <= spare.len()).
        unsafe { buf.set_len(buf.len() + r as usize) };
    }
    Ok(buf)
}

fn temp_pid(name: &str) -> Option<u32> {
    let rest = &name[name.find(".tmp.")? + 5..];
    rest.split('.').next()?.parse().ok()
}

impl ObjectStore for LocalStore {
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        let path = self.path(key)?;
        let dir = path
            .parent()
            .ok_or_else(|| StoreError::BadKey(key.to_string()))?;
        fs::create_dir_all(dir).map_err(|e| StoreError::io(key, e))?;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = dir.join(format!("{name}.tmp.{}.{n}", std::process::id()));
        let guard = TempGuard(Some(tmp.clone()));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| StoreError::io(key, e))?;
        f.write_all(data).map_err(|e| StoreError::io(key, e))?;
        f.sync_all().map_err(|e| StoreError::io(key, e))?;
        drop(f);
        // Write-once: a hard link never replaces an existing key (unlike rename), so two
        // writers cannot overwrite each other. The same bytes again are a retried write.
        match fs::hard_link(&tmp, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let same = fs::read(&path).map_err(|e| StoreError::io(key, e))? == data;
                return if same {
                    Ok(())
                } else {
                    Err(StoreError::Exists(key.to_string()))
                };
            }
            Err(e) => return Err(StoreError::io(key, e)),
        }
        drop(guard); // removes the temp name; the key keeps the data
        fsync_dir(dir).map_err(|e| StoreError::io(key, e))?;
        Ok(())
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        fs::read(self.path(key)?).map_err(|e| StoreError::io(key, e))
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        let f = self.open_for_read(key)?;
        pread_exact(&f, len, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Corrupt {
                    key: key.to_string(),
                    what: format!("shorter than {} bytes", offset + len as u64),
                }
            } else {
                StoreError::io(key, e)
            }
        })
    }

    fn size(&self, key: &str) -> StoreResult<u64> {
        fs::metadata(self.path(key)?)
            .map(|m| m.len())
            .map_err(|e| StoreError::io(key, e))
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let dir_key = prefix.trim_end_matches('/');
        let base = self.path(dir_key)?;
        let mut out = Vec::new();
        let mut stack = vec![(base, dir_key.to_string())];
        while let Some((dir, key)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(&key, e)),
            };
            for e in rd {
                let e = e.map_err(|e| StoreError::io(&key, e))?;
                let name = e.file_name().to_string_lossy().to_string();
                let child = format!("{key}/{name}");
                if e.file_type()
                    .map_err(|e| StoreError::io(&child, e))?
                    .is_dir()
                {
                    stack.push((e.path(), child));
                } else if temp_pid(&name).is_none() {
                    out.push(child);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        self.open_files().retain(|(k, _)| k != key);
        match fs::remove_file(self.path(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        let d = tempfile::tempdir().unwrap();
        crate::store::testing::run(&super::LocalStore::new(d.path()));
    }

    #[test]
    fn temp_names() {
        assert_eq!(super::temp_pid("abc.tmp.123.4"), Some(123));
        assert_eq!(super::temp_pid("abc"), None);
    }
}
