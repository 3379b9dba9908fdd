//! What a hostile client can send a holdfast NBD server: client flags, options with their
//! payloads, transmission requests.
#![no_main]
use holdfast::nbd::proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_client_flags(data, 3);
    if let Ok((h, payload, used)) = parse_option(data) {
        assert!(used <= data.len());
        let _ = (h, parse_go(payload), parse_meta_request(payload), parse_export_name(payload));
    }
    if let Ok((req, payload, used)) = parse_request(data) {
        assert!(used <= data.len() && payload.len() <= used);
        for (size, read_only, structured) in [(0u64, true, false), (1 << 30, false, true), (u64::MAX, false, true)] {
            let st = TransmissionState { size, read_only, structured, meta_contexts: 1, shutting_down: false };
            if validate_request(&req, &st).is_ok() && (req.cmd == CMD_READ || req.cmd == CMD_WRITE) {
                assert!(req.offset.checked_add(u64::from(req.len)).is_some_and(|end| end <= size));
            }
        }
    }
});
