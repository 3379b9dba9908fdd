//! What a hostile server can send the holdfast NBD client: greeting, option replies, info,
//! meta contexts, simple and structured replies.
#![no_main]
use holdfast::nbd::proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_server_greeting(data);
    let _ = parse_export_name_reply(data);
    if let Ok((_, payload, used)) = parse_option_reply(data) {
        assert!(used <= data.len());
        let _ = (parse_info(payload), parse_meta_context_reply(payload), parse_rep_server(payload));
    }
    if let Ok((_, _, used)) = parse_reply(data) {
        assert!(used <= data.len());
    }
});
