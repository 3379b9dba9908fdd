//! An object store in memory: the semantics of the trait and nothing else, for tests.

use super::super::{check_key, ObjectStore, StoreError, StoreResult};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn get_obj(&self, key: &str) -> StoreResult<Vec<u8>> {
        check_key(key)?;
        crate::sys::lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(key.to_string()))
    }
}

impl ObjectStore for MemoryStore {
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        check_key(key)?;
        let mut objects = crate::sys::lock(&self.objects);
        match objects.get(key) {
            Some(old) if old.as_slice() == data => Ok(()),
            Some(_) => Err(StoreError::Exists(key.to_string())),
            None => {
                objects.insert(key.to_string(), data.to_vec());
                Ok(())
            }
        }
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        self.get_obj(key)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        let obj = self.get_obj(key)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start.checked_add(len) {
            Some(end) if end <= obj.len() => Ok(obj[start..end].to_vec()),
            _ => Err(StoreError::Corrupt {
                key: key.to_string(),
                what: format!("shorter than {} bytes", offset.saturating_add(len as u64)),
            }),
        }
    }

    fn size(&self, key: &str) -> StoreResult<u64> {
        Ok(self.get_obj(key)?.len() as u64)
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let dir = format!("{}/", prefix.trim_end_matches('/'));
        Ok(crate::sys::lock(&self.objects)
            .keys()
            .filter(|k| k.starts_with(&dir))
            .cloned()
            .collect())
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        check_key(key)?;
        crate::sys::lock(&self.objects).remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        super::super::run(&super::MemoryStore::new());
    }
}
