//! A damaged or hostile pack footer: parsing never panics and never yields an entry outside the pack.
#![no_main]
use holdfast::store::pack::{parse_entries, parse_trailer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_trailer(data);
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap());
    let table = &data[8..];
    let digest = *blake3::hash(table).as_bytes();
    if let Ok(es) = parse_entries(table, &digest, size) {
        for e in es {
            assert!(e.offset + u64::from(e.stored_len) <= size);
        }
    }
});
