//! The audit log: one JSON line per state-changing request — who, what, which VM, when, how
//! it ended. `audit.log` in the repository directory, appended (`O_APPEND`: lines from
//! several writers never interleave), private to the service's user. Secrets never enter it:
//! only the method, the route and the VM are recorded, not bodies.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditEntry {
    pub ms: u64,
    /// Who: `alice`, `alice!ci`, `local:root`, `cli:root`.
    pub who: String,
    /// What: `POST /api/v1/vms/web/backups`, or a CLI command.
    pub what: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// HTTP status (0 for the CLI).
    pub status: u16,
    /// The error code when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The task it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Where it came from: the client's address, or the unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    pub fn new(repo_dir: &Path) -> AuditLog {
        AuditLog {
            path: repo_dir.join("audit.log"),
        }
    }

    /// Append one entry (durably: an audit line is not lost in a crash after the reply).
    pub fn append(&self, e: &AuditEntry) -> Result<()> {
        let mut line = serde_json::to_vec(e).map_err(Error::internal)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|err| Error::io(format!("open {}", self.path.display()), err))?;
        f.write_all(&line)
            .and_then(|_| f.sync_data())
            .map_err(|err| Error::io(format!("write {}", self.path.display()), err))
    }

    /// The newest `limit` entries (of one VM), oldest first; a damaged line is skipped.
    pub fn read(&self, vm: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>> {
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("read {}", self.path.display()), e)),
        };
        let mut out: std::collections::VecDeque<AuditEntry> = Default::default();
        for line in std::io::BufReader::new(f)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let Ok(e) = serde_json::from_str::<AuditEntry>(&line) else {
                continue;
            };
            if vm.is_some_and(|v| e.vm.as_deref() != Some(v)) {
                continue;
            }
            out.push_back(e);
            if out.len() > limit {
                out.pop_front();
            }
        }
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_append_and_read_back_newest_last() {
        let d = tempfile::tempdir().unwrap();
        let log = AuditLog::new(d.path());
        for i in 0..5u64 {
            log.append(&AuditEntry {
                ms: i,
                who: "alice".into(),
                what: "POST /x".into(),
                vm: Some(if i % 2 == 0 { "web" } else { "db" }.into()),
                status: 200,
                code: None,
                task: None,
                addr: None,
            })
            .unwrap();
        }
        let all = log.read(None, 3).unwrap();
        assert_eq!(all.iter().map(|e| e.ms).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(log.read(Some("db"), 10).unwrap().len(), 2);
    }
}
