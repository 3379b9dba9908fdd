//! Snapshot records: `snapshots/<vm>/<name>` in the store, JSON, versioned. They survive a
//! lost catalog like the backups do; QEMU's immutable tag is inside, so a rename touches only
//! the record.

use crate::error::What;
use crate::qmp::ops;
use crate::repo::Repo;
use crate::store::StoreError;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Kind {
    /// qcow2 internal snapshots (with or without memory).
    Internal,
    /// qcow2 overlays on top of the disks.
    External,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapDisk {
    pub name: String,
    /// The node the snapshot was taken of.
    pub node: String,
    /// Its image file and format (for offline revert and delete).
    pub file: String,
    pub format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<ops::Overlay>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub version: u32,
    pub vm: String,
    pub name: String,
    /// QEMU's tag (internal snapshots); never changes.
    pub tag: String,
    pub kind: Kind,
    pub memory: bool,
    pub quiesced: bool,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The node holding the memory state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmstate: Option<String>,
    pub disks: Vec<SnapDisk>,
    /// VMs snapshotted together (a group snapshot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<String>,
    /// How long taking it took (QEMU's part, freeze and thaw included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
}

pub(super) fn key(vm: &str, name: &str) -> String {
    format!("snapshots/{vm}/{name}")
}

/// Snapshot names: 1–64 of `[A-Za-z0-9_-]`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        return Ok(());
    }
    let mut example: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    if example.is_empty() {
        example = "PreUpdate".into();
    }
    Err(crate::names::NameError::Snapshot {
        name: name.to_string(),
        example,
    }
    .into())
}

fn parse(k: &str, raw: &[u8]) -> Result<Snapshot> {
    serde_json::from_slice(raw).map_err(|e| {
        Error::damaged(
            "snapshot record",
            format!("snapshot record {k} is damaged ({e}); delete it from the store"),
        )
    })
}

/// Every snapshot record of `vm` (all VMs when None), oldest first.
pub fn records(repo: &Repo, vm: Option<&str>) -> Result<Vec<Snapshot>> {
    let prefix = match vm {
        Some(v) => format!("snapshots/{v}/"),
        None => "snapshots/".into(),
    };
    let mut out = Vec::new();
    for k in repo.store.list(&prefix)? {
        out.push(parse(&k, &repo.store.get(&k)?)?);
    }
    out.sort_by_key(|s| (s.created_ms, s.name.clone()));
    Ok(out)
}

/// The snapshot `name` of `vm`; not found names the ones it has.
pub fn record(repo: &Repo, vm: &str, name: &str) -> Result<Snapshot> {
    let k = key(vm, name);
    match repo.store.get(&k) {
        Ok(raw) => parse(&k, &raw),
        Err(StoreError::NotFound(_)) => {
            let have: Vec<String> = records(repo, Some(vm))?
                .into_iter()
                .map(|s| s.name)
                .collect();
            let have = if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            };
            Err(Error::not_found(
                What::Snapshot,
                format!("{vm}/{name}"),
                format!("VM {vm} has no snapshot {name:?} (its snapshots: {have})"),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) fn save(repo: &Repo, s: &Snapshot) -> Result<()> {
    let json = serde_json::to_vec_pretty(s).map_err(Error::internal)?;
    Ok(repo.store.put(&key(&s.vm, &s.name), &json)?)
}

pub(super) fn remove_record(repo: &Repo, s: &Snapshot) -> Result<()> {
    match repo.store.delete(&key(&s.vm, &s.name)) {
        Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The node a disk's data is written to now: the newest holdfast overlay over `node`, or
/// `node` itself.
pub fn active_node(repo: &Repo, vm: &str, node: &str) -> Result<String> {
    let mut cur = node.to_string();
    for s in records(repo, Some(vm))? {
        for d in &s.disks {
            if let Some(ov) = &d.overlay {
                if ov.base == cur {
                    cur = ov.overlay_node.clone();
                }
            }
        }
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        for good in ["PreUpdate", "pre-update_2", "a"] {
            assert!(super::check_name(good).is_ok(), "{good}");
        }
        let e = super::check_name("Pre Update").unwrap_err().to_string();
        assert!(e.contains("e.g. PreUpdate, not \"Pre Update\""), "{e}");
        assert!(super::check_name("").is_err());
        assert!(super::check_name("a/b").is_err());
        assert!(super::check_name(&"x".repeat(65)).is_err());
    }
}
