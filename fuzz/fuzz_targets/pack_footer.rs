//! A damaged or hostile pack: parsing its footer or scanning its blob headers never panics
//! and never yields an entry outside the pack.
#![no_main]
use holdfast::store::pack::{parse_entries, parse_trailer, scan_blobs, HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_trailer(data);
    let mut pack = HEADER.to_vec();
    pack.extend_from_slice(data);
    for e in scan_blobs(&pack) {
        assert!(e.offset + u64::from(e.stored_len) <= pack.len() as u64);
    }
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
