//! Names users give things: VMs, disks, backup ids. One rule, one error message.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NameError {
    #[error("invalid {kind} name {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.' (e.g. web-01)")]
    Invalid { kind: &'static str, name: String },
    #[error("invalid snapshot name {name:?}: use letters, digits, '-' and '_' only (e.g. {example}, not {name:?})")]
    Snapshot { name: String, example: String },
}

/// VM and disk names: letters, digits, `-`, `_`, `.`; 1–64 characters; no leading dot.
pub fn check(kind: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid {
            kind,
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn names() {
        for good in ["vm1", "web-01", "a_b.c", "X"] {
            assert!(check("VM", good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(65), ".."] {
            assert!(check("VM", bad).is_err(), "{bad}");
        }
    }
}
