//! Test doubles beside the conformance suite: an in-memory [`MemoryStore`] and a
//! fault-injecting [`FaultyStore`] that wraps any backend (fail the Nth put or get, delay each
//! call, truncate reads). Compiled for unit tests and with the `testing` feature only.

// Test support: a failed call is a failed check, and unwrap says where.
#![allow(clippy::unwrap_used)]

mod faulty;
mod memory;

pub use faulty::{Faults, FaultyStore};
pub use memory::MemoryStore;

use super::{ObjectStore, StoreError};

/// The conformance suite every backend must pass (STYLE #4): the local directory, the
/// in-memory store, the fault-injecting wrapper, S3 on a real server, and S3 behind a
/// fault-injecting proxy all run it.
/// Run every check under `packs/`, `backups/` and `big/` of an empty store.
pub fn run(s: &dyn ObjectStore) {
    assert!(matches!(
        s.get("packs/aa/missing"),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.get_range("packs/aa/missing", 0, 10),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.size("packs/aa/missing"),
        Err(StoreError::NotFound(_))
    ));
    assert!(!s.exists("packs/aa/missing").unwrap());
    s.put("packs/aa/one", b"hello world").unwrap();
    s.put("packs/ab/two", &vec![7u8; 100_000]).unwrap();
    s.put("backups/vm1/b1", b"{}").unwrap();
    assert_eq!(s.get("packs/aa/one").unwrap(), b"hello world");
    assert_eq!(s.get_range("packs/aa/one", 6, 5).unwrap(), b"world");
    assert_eq!(s.get_range("packs/aa/one", 6, 0).unwrap(), b"");
    assert_eq!(
        s.get_ranges("packs/aa/one", &[(6, 5), (0, 5), (2, 3)])
            .unwrap(),
        vec![b"world".to_vec(), b"hello".to_vec(), b"llo".to_vec()]
    );
    assert!(
        s.get_range("packs/aa/one", 6, 50).is_err(),
        "reading past the end must fail"
    );
    assert!(
        s.get_ranges("packs/aa/one", &[(0, 5), (6, 50)]).is_err(),
        "one range past the end fails the call"
    );
    assert_eq!(s.size("packs/ab/two").unwrap(), 100_000);
    assert!(s.exists("packs/ab/two").unwrap());
    // Writing the same bytes again is harmless (a retried write).
    s.put("packs/ab/two", &vec![7u8; 100_000]).unwrap();
    assert_eq!(s.get("packs/ab/two").unwrap(), vec![7u8; 100_000]);
    // A large object (multipart on S3 with a small threshold): whole, and ranges across
    // part boundaries.
    let big: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    s.put("big/obj", &big).unwrap();
    assert_eq!(s.size("big/obj").unwrap(), big.len() as u64);
    assert!(
        s.get("big/obj").unwrap() == big,
        "large object comes back whole"
    );
    let ranges = [
        (0u64, 100usize),
        ((5 << 20) - 10, 20),
        ((10 << 20) - 3, 2 << 20),
        ((12 << 20) - 1, 1),
        (3 << 20, 1 << 20),
    ];
    for (r, got) in ranges.iter().zip(s.get_ranges("big/obj", &ranges).unwrap()) {
        assert!(got == big[r.0 as usize..r.0 as usize + r.1], "range {r:?}");
    }
    assert_eq!(
        s.list("packs/").unwrap(),
        vec!["packs/aa/one", "packs/ab/two"]
    );
    assert_eq!(s.list("backups/").unwrap(), vec!["backups/vm1/b1"]);
    assert!(s.list("nothing/").unwrap().is_empty());
    s.delete("packs/aa/one").unwrap();
    s.delete("packs/aa/one").unwrap();
    s.delete("big/obj").unwrap();
    assert!(!s.exists("packs/aa/one").unwrap());
    assert_eq!(s.list("packs/").unwrap(), vec!["packs/ab/two"]);
    assert!(matches!(
        s.put("../escape", b"x"),
        Err(StoreError::BadKey(_))
    ));
    assert!(matches!(s.put("a//b", b"x"), Err(StoreError::BadKey(_))));
    assert!(matches!(s.get("/abs"), Err(StoreError::BadKey(_))));
}
