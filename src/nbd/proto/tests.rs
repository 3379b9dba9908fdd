//! Unit tests for the wire format: a corpus of malformed messages with the
//! exact expected error, and proptest round trips / no-panic checks.

use super::*;
use proptest::prelude::*;

fn st(size: u64, read_only: bool) -> TransmissionState {
    TransmissionState {
        size,
        read_only,
        structured: false,
        meta_contexts: 0,
        shutting_down: false,
    }
}

fn req(cmd: u16, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        cmd,
        cookie: 9,
        offset,
        len,
    }
}

#[test]
fn request_header_corpus() {
    let good = req(CMD_READ, 0, 4096, 512).encode();
    assert_eq!(
        parse_request_header(&good).unwrap(),
        req(CMD_READ, 0, 4096, 512)
    );
    let mut bad = good;
    bad[0] = 0;
    assert_eq!(
        parse_request_header(&bad),
        Err(ProtoError::BadMagic {
            expected: REQUEST_MAGIC.into(),
            got: 0x0060_9513
        })
    );
    assert_eq!(
        parse_request_header(&good[..27]),
        Err(ProtoError::Truncated { need: 4, have: 3 })
    );
    assert_eq!(
        parse_request(&good[..27]),
        Err(ProtoError::Truncated { need: 28, have: 27 })
    );
    assert_eq!(
        parse_request(&req(99, 0, 0, 0).encode()),
        Err(ProtoError::UnknownCommand(99))
    );
    let huge = req(CMD_WRITE, 0, 0, 64 << 20).encode();
    assert_eq!(
        parse_request(&huge),
        Err(ProtoError::TooLarge {
            what: "request length",
            len: 64 << 20,
            max: MAX_PAYLOAD.into()
        })
    );
    let mut short_write = req(CMD_WRITE, 0, 0, 512).encode().to_vec();
    short_write.extend_from_slice(&[0u8; 10]);
    assert_eq!(
        parse_request(&short_write),
        Err(ProtoError::Truncated {
            need: 512,
            have: 10
        })
    );
    short_write.resize(REQUEST_LEN + 512 + 3, 1);
    let (r, payload, used) = parse_request(&short_write).unwrap();
    assert_eq!((r.len, payload.len(), used), (512, 512, REQUEST_LEN + 512));
}

#[test]
fn validate_request_corpus() {
    let s = st(1 << 20, false);
    let ro = st(1 << 20, true);
    let cases: Vec<(Request, TransmissionState, ProtoError)> = vec![
        (
            req(CMD_READ, 0, (1 << 20) - 1, 2),
            s,
            ProtoError::OutOfRange {
                offset: (1 << 20) - 1,
                len: 2,
                size: 1 << 20,
            },
        ),
        (
            req(CMD_WRITE, 0, 1 << 20, 1),
            s,
            ProtoError::NoSpace {
                offset: 1 << 20,
                len: 1,
                size: 1 << 20,
            },
        ),
        (
            req(CMD_READ, 0, u64::MAX, 1),
            s,
            ProtoError::OutOfRange {
                offset: u64::MAX,
                len: 1,
                size: 1 << 20,
            },
        ),
        (req(CMD_WRITE, 0, 0, 1), ro, ProtoError::ReadOnly),
        (req(CMD_TRIM, 0, 0, 1), ro, ProtoError::ReadOnly),
        (req(CMD_WRITE_ZEROES, 0, 0, 1), ro, ProtoError::ReadOnly),
        (
            req(CMD_READ, CMD_FLAG_DF, 0, 1),
            s,
            ProtoError::BadFlags {
                cmd: CMD_READ,
                flags: CMD_FLAG_DF,
            },
        ),
        (
            req(CMD_DISC, CMD_FLAG_FUA, 0, 0),
            s,
            ProtoError::BadFlags {
                cmd: CMD_DISC,
                flags: CMD_FLAG_FUA,
            },
        ),
        (
            req(CMD_WRITE, 0x80, 0, 1),
            s,
            ProtoError::BadFlags {
                cmd: CMD_WRITE,
                flags: 0x80,
            },
        ),
        (
            req(CMD_FLUSH, 0, 1, 0),
            s,
            ProtoError::Invalid("offset/length must be zero"),
        ),
        (
            req(CMD_BLOCK_STATUS, 0, 0, 1),
            s,
            ProtoError::Invalid("block status without meta context"),
        ),
        (req(5, 0, 0, 1), s, ProtoError::UnknownCommand(5)),
        (
            req(CMD_READ, 0, 0, MAX_PAYLOAD + 1),
            st(u64::MAX, false),
            ProtoError::TooLarge {
                what: "request length",
                len: (MAX_PAYLOAD + 1).into(),
                max: MAX_PAYLOAD.into(),
            },
        ),
        (
            req(CMD_READ, 0, 0, 1),
            TransmissionState {
                shutting_down: true,
                ..s
            },
            ProtoError::Shutdown,
        ),
    ];
    for (r, state, want) in cases {
        assert_eq!(validate_request(&r, &state), Err(want.clone()), "{r:?}");
    }
    let meta = TransmissionState {
        structured: true,
        meta_contexts: 1,
        ..s
    };
    assert_eq!(
        validate_request(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &meta),
        Ok(())
    );
    assert_eq!(
        validate_request(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &meta),
        Ok(())
    );
    assert_eq!(validate_request(&req(CMD_TRIM, 0, 0, 0x1000), &s), Ok(()));
    assert_eq!(
        validate_request(&req(CMD_BLOCK_STATUS, 0, 0, 0), &meta),
        Err(ProtoError::Invalid("zero-length block status"))
    );
}

#[test]
fn errno_mapping() {
    let table = [
        (ProtoError::ReadOnly, EPERM),
        (
            ProtoError::NoSpace {
                offset: 0,
                len: 0,
                size: 0,
            },
            ENOSPC,
        ),
        (ProtoError::Overflow("x"), EOVERFLOW),
        (ProtoError::NotSupported("x"), ENOTSUP),
        (ProtoError::Shutdown, ESHUTDOWN),
        (
            ProtoError::OutOfRange {
                offset: 0,
                len: 0,
                size: 0,
            },
            EINVAL,
        ),
        (ProtoError::UnknownCommand(1), EINVAL),
        (ProtoError::BadString, EINVAL),
    ];
    for (e, n) in table {
        assert_eq!(e.errno(), n, "{e}");
    }
    assert_eq!(
        errno_from_io(&std::io::Error::from(std::io::ErrorKind::StorageFull)),
        ENOSPC
    );
    assert_eq!(errno_from_io(&std::io::Error::other("x")), EIO);
}

#[test]
fn handshake_corpus() {
    let g = encode_server_greeting(FLAG_FIXED_NEWSTYLE);
    assert_eq!(parse_server_greeting(&g), Ok(FLAG_FIXED_NEWSTYLE));
    let mut bad = g;
    bad[9] ^= 0xff;
    assert!(matches!(
        parse_server_greeting(&bad),
        Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            ..
        })
    ));
    assert_eq!(
        parse_server_greeting(&g[..17]),
        Err(ProtoError::Truncated { need: 2, have: 1 })
    );
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 4], 3),
        Err(ProtoError::Invalid("unknown client flags"))
    );
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 3], FLAG_FIXED_NEWSTYLE),
        Err(ProtoError::Invalid("unknown client flags"))
    );
    assert_eq!(parse_client_flags(&[0, 0, 0, 3], 3), Ok(3));

    let mut opt = encode_option(OPT_GO, &[]).unwrap();
    assert_eq!(
        parse_option(&opt).unwrap().0,
        OptionHeader {
            opt: OPT_GO,
            len: 0
        }
    );
    opt[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    assert_eq!(
        parse_option_header(&opt),
        Err(ProtoError::TooLarge {
            what: "option data",
            len: (MAX_OPTION_LEN + 1).into(),
            max: MAX_OPTION_LEN.into()
        })
    );
    opt[0] = b'X';
    assert!(matches!(
        parse_option_header(&opt),
        Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            ..
        })
    ));
    assert!(encode_option(OPT_GO, &vec![0; MAX_OPTION_LEN as usize + 1]).is_err());
    let mut rep = encode_option_reply(OPT_GO, REP_ACK, &[]).unwrap();
    rep[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        parse_option_reply(&rep),
        Err(ProtoError::TooLarge {
            what: "option reply",
            ..
        })
    ));
}

#[test]
fn option_payload_corpus() {
    assert_eq!(
        parse_go(&[0, 0, 0]),
        Err(ProtoError::Truncated { need: 4, have: 3 })
    );
    assert_eq!(
        parse_go(&[0, 0, 0, 9, b'a']),
        Err(ProtoError::Truncated { need: 9, have: 1 })
    );
    assert_eq!(parse_go(&[0, 0, 0, 1, 0, 0, 0]), Err(ProtoError::BadString));
    assert_eq!(
        parse_go(&[0, 0, 0, 1, 0xff, 0, 0]),
        Err(ProtoError::BadString)
    );
    assert_eq!(
        parse_go(&[0, 0, 0, 0, 0, 5, 0, 1]),
        Err(ProtoError::Truncated { need: 2, have: 0 })
    );
    assert_eq!(
        parse_go(&[0, 0, 0, 0, 0, 0, 9]),
        Err(ProtoError::Invalid("trailing bytes"))
    );
    let long = [&[0u8, 0, 0x10, 1][..], &[b'a'; 4097][..], &[0, 0]].concat();
    assert_eq!(
        parse_go(&long),
        Err(ProtoError::TooLarge {
            what: "string",
            len: 4097,
            max: 4096
        })
    );
    // A huge query count with tiny data fails before allocating anything.
    let q = [0u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1];
    assert!(matches!(
        parse_meta_request(&q),
        Err(ProtoError::Truncated { have: 4, .. })
    ));
    assert_eq!(parse_export_name(b"a\0b"), Err(ProtoError::BadString));
    assert_eq!(
        parse_info(&[0, 0, 1, 2, 3]),
        Err(ProtoError::Truncated { need: 8, have: 3 })
    );
    assert_eq!(parse_info(&[0, 9, 1]), Ok(Info::Unknown(9)));
    assert_eq!(
        parse_info(&[0, 3, 0, 0, 0, 1, 0, 0, 16, 0, 0, 0, 16, 0, 1]),
        Err(ProtoError::Invalid("trailing bytes"))
    );
    assert_eq!(
        parse_rep_server(&[0, 0, 0, 5, b'a']),
        Err(ProtoError::Truncated { need: 5, have: 1 })
    );
}

fn chunk(kind: u16, flags: u16, payload: &[u8]) -> (ChunkHeader, Vec<u8>) {
    (
        ChunkHeader {
            flags,
            kind,
            cookie: 1,
            len: payload.len() as u32,
        },
        payload.to_vec(),
    )
}

#[test]
fn chunk_corpus() {
    let cases: Vec<((ChunkHeader, Vec<u8>), ProtoError)> = vec![
        (
            chunk(REPLY_TYPE_NONE, 0, &[]),
            ProtoError::Invalid("NONE chunk without DONE"),
        ),
        (
            chunk(REPLY_TYPE_NONE, 1, &[1]),
            ProtoError::Invalid("trailing bytes"),
        ),
        (
            chunk(REPLY_TYPE_OFFSET_DATA, 1, &[0; 8]),
            ProtoError::Invalid("empty OFFSET_DATA"),
        ),
        (
            chunk(REPLY_TYPE_OFFSET_DATA, 1, &[0; 7]),
            ProtoError::Truncated { need: 8, have: 7 },
        ),
        (
            chunk(REPLY_TYPE_OFFSET_HOLE, 1, &[0; 12]),
            ProtoError::Invalid("zero-length hole"),
        ),
        (
            chunk(
                REPLY_TYPE_OFFSET_HOLE,
                1,
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            ),
            ProtoError::Invalid("trailing bytes"),
        ),
        (
            chunk(REPLY_TYPE_BLOCK_STATUS, 1, &[0; 4]),
            ProtoError::Invalid("block status length"),
        ),
        (
            chunk(REPLY_TYPE_BLOCK_STATUS, 1, &[0; 11]),
            ProtoError::Invalid("block status length"),
        ),
        (
            chunk(REPLY_TYPE_BLOCK_STATUS, 1, &[0; 12]),
            ProtoError::Invalid("zero-length extent"),
        ),
        (
            chunk(REPLY_TYPE_ERROR, 1, &[0, 0, 0, 0, 0, 0]),
            ProtoError::Invalid("error chunk with errno 0"),
        ),
        (
            chunk(REPLY_TYPE_ERROR, 1, &[0, 0, 0, 5, 0, 9, b'x']),
            ProtoError::Truncated { need: 9, have: 1 },
        ),
        (
            chunk(REPLY_TYPE_ERROR_OFFSET, 1, &[0, 0, 0, 5, 0, 0]),
            ProtoError::Truncated { need: 8, have: 0 },
        ),
        (chunk(77, 1, &[]), ProtoError::Invalid("unknown chunk type")),
    ];
    for ((h, p), want) in cases {
        assert_eq!(parse_chunk(&h, &p), Err(want.clone()), "{h:?}");
    }
    let (h, p) = chunk(0x8003, 1, &[0, 0, 0, 5, 0, 1, b'x', 9, 9]);
    assert_eq!(
        parse_chunk(&h, &p),
        Ok(Chunk::Error {
            errno: 5,
            message: "x".into(),
            offset: None
        })
    );
    let (h, _) = chunk(REPLY_TYPE_OFFSET_DATA, 1, &[0; 20]);
    assert_eq!(
        parse_chunk(&h, &[0; 5]),
        Err(ProtoError::Truncated { need: 20, have: 5 })
    );

    let mut big = encode_none_chunk(3);
    big[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        parse_reply(&big),
        Err(ProtoError::TooLarge {
            what: "chunk payload",
            ..
        })
    ));
    assert!(matches!(
        parse_reply(&[1, 2, 3, 4, 5]),
        Err(ProtoError::BadMagic {
            got: 0x0102_0304,
            ..
        })
    ));
    assert_eq!(
        parse_reply(&encode_simple_reply(5, 6)).unwrap().0,
        ReplyHeader::Simple {
            error: 5,
            cookie: 6
        }
    );
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:/_. -]{0,40}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn request_round_trip(cmd in prop::sample::select(vec![CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS]),
                          flags in 0u16..16, cookie: u64, offset: u64, len in 0u32..300) {
        let r = Request { flags, cmd, cookie, offset, len };
        let mut bytes = r.encode().to_vec();
        bytes.extend(std::iter::repeat_n(0xa5u8, r.payload_len() as usize));
        let (back, payload, used) = parse_request(&bytes).unwrap();
        prop_assert_eq!(back, r);
        prop_assert_eq!(payload.len() as u32, r.payload_len());
        prop_assert_eq!(used, bytes.len());
    }

    #[test]
    fn option_round_trips(n in name(), infos in prop::collection::vec(any::<u16>(), 0..8),
                          queries in prop::collection::vec(name(), 0..6), id: u32, size: u64, flags: u16) {
        let go = GoRequest { name: n.clone(), infos };
        prop_assert_eq!(parse_go(&encode_go(&go).unwrap()).unwrap(), go);
        let meta = MetaRequest { export: n.clone(), queries };
        prop_assert_eq!(parse_meta_request(&encode_meta_request(&meta).unwrap()).unwrap(), meta);
        prop_assert_eq!(parse_meta_context_reply(&encode_meta_context_reply(id, &n).unwrap()).unwrap(), (id, n.clone()));
        prop_assert_eq!(parse_rep_server(&encode_rep_server(&n).unwrap()).unwrap(), n.clone());
        for info in [Info::Export { size, flags }, Info::Name(n.clone()), Info::Description(n.clone()),
                     Info::BlockSize { min: id, preferred: id / 2, max: id / 3 }] {
            prop_assert_eq!(parse_info(&encode_info(&info).unwrap()).unwrap(), info);
        }
        let data = encode_go(&GoRequest { name: n, infos: vec![] }).unwrap();
        let wire = encode_option_reply(OPT_INFO, REP_INFO, &data).unwrap();
        let (h, d, used) = parse_option_reply(&wire).unwrap();
        prop_assert_eq!((h.opt, h.kind, d, used), (OPT_INFO, REP_INFO, &data[..], wire.len()));
    }

    #[test]
    fn chunk_round_trips(cookie: u64, offset: u64, data in prop::collection::vec(any::<u8>(), 1..64),
                         hole in 1u32.., ctx: u32, ext in prop::collection::vec((1u32.., any::<u32>()), 1..20),
                         errno in 1u32.., msg in "[ -~]{0,50}") {
        let cases: Vec<(Vec<u8>, Chunk<'_>)> = vec![
            ([encode_offset_data_header(0, cookie, offset, data.len() as u32).unwrap(), data.clone()].concat(),
             Chunk::OffsetData { offset, data: &data }),
            (encode_offset_hole(0, cookie, offset, hole).unwrap(), Chunk::OffsetHole { offset, len: hole }),
            (encode_block_status(1, cookie, ctx, &ext).unwrap(), Chunk::BlockStatus { context_id: ctx, extents: ext.clone() }),
            (encode_error_chunk(1, cookie, errno, &msg).unwrap(), Chunk::Error { errno, message: msg.clone(), offset: None }),
            (encode_none_chunk(cookie), Chunk::None),
        ];
        for (wire, want) in cases {
            let (h, c, used) = parse_reply(&wire).unwrap();
            let ok = matches!(h, ReplyHeader::Chunk(ChunkHeader { cookie: k, .. }) if k == cookie);
            prop_assert!(ok);
            prop_assert_eq!(c, Some(want));
            prop_assert_eq!(used, wire.len());
        }
    }

    #[test]
    fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), kind: u16, flags: u16) {
        let _ = parse_request(&bytes);
        let _ = parse_request_header(&bytes);
        let _ = parse_reply(&bytes);
        let _ = parse_option(&bytes);
        let _ = parse_option_reply(&bytes);
        let _ = parse_go(&bytes);
        let _ = parse_meta_request(&bytes);
        let _ = parse_info(&bytes);
        let _ = parse_server_greeting(&bytes);
        let _ = parse_client_flags(&bytes, flags);
        let _ = parse_meta_context_reply(&bytes);
        let _ = parse_rep_server(&bytes);
        let _ = parse_export_name(&bytes);
        let _ = parse_export_name_reply(&bytes);
        let h = ChunkHeader { flags, kind, cookie: 0, len: bytes.len() as u32 };
        let _ = parse_chunk(&h, &bytes);
        let _ = crate::nbd::parse_uri(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn validate_never_panics(cmd: u16, flags: u16, offset: u64, len: u32, size: u64, ro: bool, sr: bool, m in 0usize..2) {
        let state = TransmissionState { size, read_only: ro, structured: sr, meta_contexts: m, shutting_down: false };
        let r = Request { flags, cmd, cookie: 0, offset, len };
        if validate_request(&r, &state).is_ok() && cmd != CMD_DISC && cmd != CMD_FLUSH {
            prop_assert!(offset.checked_add(len.into()).is_some_and(|end| end <= size));
        }
    }
}
