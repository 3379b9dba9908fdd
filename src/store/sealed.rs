//! The metadata of an encrypted store, sealed on its way in and opened on its way out: a
//! wrapper over any backend. Every object but `config`, `keys/…` and packs (whose blobs and
//! entry tables are sealed by the pack writer) is sealed whole, bound to the key it is stored
//! under (so objects cannot be swapped between names); VM and snapshot names in keys are
//! replaced by their deterministic encryption (`Keys::seal_name`), so listing a VM's backups
//! still works while the bucket names no VM. Callers see clear keys and bytes.

use super::{ObjectStore, StoreError, StoreResult};
use crate::crypto::{Keys, Purpose, OVERHEAD};
use std::sync::Arc;

pub struct SealedStore {
    inner: Arc<dyn ObjectStore>,
    keys: Arc<Keys>,
}

/// Key components (after the first) that are names: sealed in the store.
fn named(top: &str) -> &'static [usize] {
    match top {
        "snapshots" => &[1, 2],
        "backups" | "protected" => &[1],
        _ => &[],
    }
}

fn passes(key: &str) -> bool {
    key == "config" || key.starts_with("keys/") || key.starts_with("packs/")
}

fn ad(inner_key: &str) -> Vec<u8> {
    [b"holdfast object\0".as_slice(), inner_key.as_bytes()].concat()
}

impl SealedStore {
    pub fn new(inner: Arc<dyn ObjectStore>, keys: Arc<Keys>) -> SealedStore {
        SealedStore { inner, keys }
    }

    /// The key an object is stored under.
    fn inner_key(&self, key: &str) -> StoreResult<String> {
        if passes(key) {
            return Ok(key.to_string());
        }
        let parts: Vec<&str> = key.split('/').collect();
        let sealed = named(parts[0]);
        let mut out = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            if sealed.contains(&i) {
                if p.len() > crate::crypto::NAME_PAD || p.contains('\0') || p.is_empty() {
                    return Err(StoreError::BadKey(key.to_string()));
                }
                out.push(self.keys.seal_name(p));
            } else {
                out.push(p.to_string());
            }
        }
        Ok(out.join("/"))
    }

    /// The clear key of a stored one; None for an object that is not ours (a name that does
    /// not open: written with another key, or tampered with).
    fn outer_key(&self, inner: &str) -> Option<String> {
        if passes(inner) {
            return Some(inner.to_string());
        }
        let parts: Vec<&str> = inner.split('/').collect();
        let sealed = named(parts[0]);
        let mut out = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            if sealed.contains(&i) {
                out.push(self.keys.name_of(p)?);
            } else {
                out.push(p.to_string());
            }
        }
        Some(out.join("/"))
    }

    fn open(&self, key: &str, inner: &str, sealed: &[u8]) -> StoreResult<Vec<u8>> {
        self.keys
            .open(Purpose::Meta, &ad(inner), sealed)
            .map_err(|_| StoreError::Corrupt {
                key: key.to_string(),
                what: "it does not authenticate (tampered with, moved from another name, or \
                       written with another key)"
                    .into(),
            })
    }
}

impl ObjectStore for SealedStore {
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        let inner = self.inner_key(key)?;
        if passes(key) {
            return self.inner.put(&inner, data);
        }
        let sealed = self.keys.seal(Purpose::Meta, &ad(&inner), data);
        self.inner.put(&inner, &sealed)
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        let inner = self.inner_key(key)?;
        let raw = self.inner.get(&inner)?;
        if passes(key) {
            return Ok(raw);
        }
        self.open(key, &inner, &raw)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        if passes(key) {
            return self.inner.get_range(key, offset, len);
        }
        let all = self.get(key)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(all.len());
        Ok(all[start..(start + len).min(all.len())].to_vec())
    }

    fn get_ranges(&self, key: &str, ranges: &[(u64, usize)]) -> StoreResult<Vec<Vec<u8>>> {
        if passes(key) {
            return self.inner.get_ranges(key, ranges);
        }
        ranges
            .iter()
            .map(|&(o, l)| self.get_range(key, o, l))
            .collect()
    }

    fn size(&self, key: &str) -> StoreResult<u64> {
        let inner = self.inner_key(key)?;
        let n = self.inner.size(&inner)?;
        Ok(if passes(key) {
            n
        } else {
            n.saturating_sub(OVERHEAD as u64)
        })
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        // Whole components of the prefix map to stored ones; a partial last one filters.
        let (dir, partial) = match prefix.rfind('/') {
            Some(i) => (&prefix[..=i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        // Top-level names are clear: a prefix without a '/' lists as it is.
        let inner_dir = if dir.is_empty() {
            partial.to_string()
        } else {
            self.inner_key(dir.trim_end_matches('/'))? + "/"
        };
        let mut out: Vec<String> = self
            .inner
            .list(&inner_dir)?
            .iter()
            .filter_map(|k| self.outer_key(k))
            .filter(|k| k.starts_with(prefix) && k[dir.len()..].starts_with(partial))
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        let inner = self.inner_key(key)?;
        self.inner.delete(&inner)
    }

    fn exists(&self, key: &str) -> StoreResult<bool> {
        let inner = self.inner_key(key)?;
        self.inner.exists(&inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[test]
    fn names_and_bytes_are_sealed_and_listing_by_vm_still_works() {
        let d = tempfile::tempdir().unwrap();
        let inner: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(d.path()));
        let keys = Arc::new(Keys::new_random());
        let s = SealedStore::new(inner.clone(), keys.clone());
        s.put(
            "backups/secret-vm-name/20261202-000000-aaaa",
            b"{\"vm\":\"secret-vm-name\"}",
        )
        .unwrap();
        s.put("backups/other/20261202-000001-bbbb", b"{}").unwrap();
        s.put("snapshots/secret-vm-name/PreUpdate", b"snap")
            .unwrap();
        s.put("config", b"clear").unwrap();
        assert_eq!(
            s.list("backups/secret-vm-name/").unwrap(),
            vec!["backups/secret-vm-name/20261202-000000-aaaa"]
        );
        assert_eq!(s.list("backups/").unwrap().len(), 2);
        assert_eq!(
            s.list("snapshots/").unwrap(),
            vec!["snapshots/secret-vm-name/PreUpdate"]
        );
        assert_eq!(
            s.get("backups/secret-vm-name/20261202-000000-aaaa")
                .unwrap(),
            b"{\"vm\":\"secret-vm-name\"}"
        );
        assert_eq!(inner.get("config").unwrap(), b"clear");
        // Underneath: no name, no clear byte.
        let all: Vec<String> = ["backups/", "snapshots/"]
            .iter()
            .flat_map(|p| inner.list(p).unwrap())
            .collect();
        assert_eq!(all.len(), 3);
        for k in all {
            assert!(!k.contains("secret") && !k.contains("PreUpdate"), "{k}");
            if k != "config" {
                let raw = inner.get(&k).unwrap();
                assert!(!raw.windows(6).any(|w| w == b"secret"), "{k}");
            }
        }
        // Swapped between two names: neither opens.
        let keys_in: Vec<String> = inner.list("backups/").unwrap();
        let (a, b) = (
            inner.get(&keys_in[0]).unwrap(),
            inner.get(&keys_in[1]).unwrap(),
        );
        // (Manifests are write-once in the store: swapped on disk, as an attacker would.)
        std::fs::write(d.path().join(&keys_in[0]), &b).unwrap();
        std::fs::write(d.path().join(&keys_in[1]), &a).unwrap();
        for k in s.list("backups/").unwrap() {
            assert!(matches!(s.get(&k), Err(StoreError::Corrupt { .. })), "{k}");
        }
    }
}
