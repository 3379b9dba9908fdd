//! Hostile and misbehaving clients: garbage, oversized lengths, invalid
//! requests, idle handshakes, connection limit, shutdown. After each, a
//! normal client must still be served.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed
#[path = "nbd_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use holdfast::nbd::proto::*;
use holdfast::nbd::{Client, ClientError, ConnectOptions, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn start(dir: &std::path::Path, config: ServerConfig) -> TestServer {
    let ro = dir.join("ro.raw");
    let rw = dir.join("rw.raw");
    make_sparse_image(&ro);
    make_sparse_image(&rw);
    let exports = vec![
        (String::new(), file_export(&ro, true)),
        ("rw".to_string(), file_export(&rw, false)),
    ];
    TestServer::start(dir, exports, config)
}

/// True if the server closes the connection within 5 s (reads drain to EOF).
async fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    let fut = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or(false)
}

async fn greet(srv: &TestServer) -> UnixStream {
    let mut s = UnixStream::connect(&srv.socket).await.unwrap();
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(
        parse_server_greeting(&g).unwrap(),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    s
}

/// Handshake by hand; `structured` negotiates structured replies.
async fn raw_connect(srv: &TestServer, export: &str, structured: bool) -> UnixStream {
    let mut s = greet(srv).await;
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    if structured {
        s.write_all(&encode_option(OPT_STRUCTURED_REPLY, &[]).unwrap())
            .await
            .unwrap();
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(parse_option_reply_header(&h).unwrap().kind, REP_ACK);
    }
    s.write_all(&encode_option(OPT_EXPORT_NAME, export.as_bytes()).unwrap())
        .await
        .unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(parse_export_name_reply(&r).unwrap().0, IMG_SIZE);
    s
}

async fn send_req(
    s: &mut UnixStream,
    cmd: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) {
    let req = Request {
        flags,
        cmd,
        cookie,
        offset,
        len,
    };
    // One write, so the server can't hang up between header and payload.
    s.write_all(&[&req.encode()[..], payload].concat())
        .await
        .unwrap();
}

async fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    s.read_exact(&mut b).await.unwrap();
    match parse_reply(&b).unwrap().0 {
        ReplyHeader::Simple { error, cookie } => (error, cookie),
        other => panic!("expected simple reply, got {other:?}"),
    }
}

async fn normal_client_works(srv: &TestServer) {
    let c = Client::connect(&srv.uri(""), &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(c.read(1 << 20, 4).await.unwrap().len(), 4);
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_garbage_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), ServerConfig::default());
    // Unknown client flags.
    let mut s = greet(&srv).await;
    s.write_all(&[0xde; 4096]).await.unwrap();
    assert!(closed_by_server(&mut s).await);
    // Option data length far above the cap: closed, nothing allocated.
    let mut s = greet(&srv).await;
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    let mut hdr = encode_option(OPT_GO, &[]).unwrap();
    hdr[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&hdr).await.unwrap();
    assert!(closed_by_server(&mut s).await);
    // Bad option magic.
    let mut s = greet(&srv).await;
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    s.write_all(b"NOTAMAGIC_______").await.unwrap();
    assert!(closed_by_server(&mut s).await);
    // Unknown option and malformed GO get error replies; connection stays.
    let mut s = greet(&srv).await;
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    for (opt, data, want) in [
        (99, &b"xx"[..], REP_ERR_UNSUP),
        (OPT_GO, &b"\0\0\0\x09ab"[..], REP_ERR_INVALID),
    ] {
        s.write_all(&encode_option(opt, data).unwrap())
            .await
            .unwrap();
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut h).await.unwrap();
        let h = parse_option_reply_header(&h).unwrap();
        assert_eq!((h.opt, h.kind), (opt, want));
        let mut msg = vec![0u8; h.len as usize];
        s.read_exact(&mut msg).await.unwrap();
    }
    // Unknown export with EXPORT_NAME: the server must hang up.
    s.write_all(&encode_option(OPT_EXPORT_NAME, b"missing").unwrap())
        .await
        .unwrap();
    assert!(closed_by_server(&mut s).await);
    normal_client_works(&srv).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_replies() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), ServerConfig::default());
    let mut s = raw_connect(&srv, "", false).await;
    let cases: [(u16, u16, u64, u32, u32); 7] = [
        (CMD_READ, 0, IMG_SIZE - 1, 2, EINVAL),  // past the end
        (99, 0, 0, 0, EINVAL),                   // unknown command
        (CMD_READ, CMD_FLAG_DF, 0, 512, EINVAL), // DF without structured replies
        (CMD_READ, 0, 0, 64 << 20, EINVAL),      // over the payload cap
        (CMD_READ, 0, u64::MAX, 2, EINVAL),      // offset overflow
        (CMD_FLUSH, 0, 4096, 0, EINVAL),         // flush with an offset
        (CMD_BLOCK_STATUS, 0, 0, 512, EINVAL),   // no metadata context
    ];
    for (i, (cmd, flags, off, len, want)) in cases.into_iter().enumerate() {
        send_req(&mut s, cmd, flags, i as u64, off, len, &[]).await;
        assert_eq!(simple_reply(&mut s).await, (want, i as u64), "case {i}");
    }
    // Write to a read-only export: EPERM, payload consumed, stream in sync.
    send_req(&mut s, CMD_WRITE, 0, 100, 0, 512, &[7u8; 512]).await;
    assert_eq!(simple_reply(&mut s).await, (EPERM, 100));
    send_req(&mut s, CMD_READ, 0, 101, 1 << 20, 512, &[]).await;
    assert_eq!(simple_reply(&mut s).await, (0, 101));
    let mut data = [0u8; 512];
    s.read_exact(&mut data).await.unwrap();
    assert_eq!(data[0], pattern(1 << 20));
    // A write whose payload can never be accepted: error reply, then hang-up.
    send_req(&mut s, CMD_WRITE, 0, 102, 0, u32::MAX, &[0u8; 64]).await;
    assert_eq!(simple_reply(&mut s).await, (EPERM, 102));
    assert!(closed_by_server(&mut s).await);

    let mut s = raw_connect(&srv, "rw", false).await;
    send_req(&mut s, CMD_WRITE, 0, 1, IMG_SIZE - 256, 512, &[1u8; 512]).await;
    assert_eq!(simple_reply(&mut s).await, (ENOSPC, 1));
    send_req(&mut s, CMD_WRITE, CMD_FLAG_REQ_ONE, 2, 0, 512, &[1u8; 512]).await;
    assert_eq!(simple_reply(&mut s).await, (EINVAL, 2));
    send_req(&mut s, CMD_WRITE, CMD_FLAG_FUA, 3, 0, 512, &[1u8; 512]).await;
    assert_eq!(simple_reply(&mut s).await, (0, 3));
    // Garbage instead of a request header: hard disconnect.
    s.write_all(&[0x55; 28]).await.unwrap();
    assert!(closed_by_server(&mut s).await);
    normal_client_works(&srv).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_read_sends_holes_as_holes() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), ServerConfig::default());
    let mut s = raw_connect(&srv, "", true).await;
    send_req(&mut s, CMD_READ, 0, 7, 0, 2 << 20, &[]).await;
    let mut got = Vec::new();
    for _ in 0..16 {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        s.read_exact(&mut h).await.unwrap();
        let mut msg = h.to_vec();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        msg.resize(CHUNK_HEADER_LEN + len, 0);
        s.read_exact(&mut msg[CHUNK_HEADER_LEN..]).await.unwrap();
        let (ReplyHeader::Chunk(ch), Some(chunk), _) = parse_reply(&msg).unwrap() else {
            panic!()
        };
        assert_eq!(ch.cookie, 7);
        got.push(match chunk {
            Chunk::OffsetHole { offset, len } => ("hole", offset, u64::from(len)),
            Chunk::OffsetData { offset, data } => ("data", offset, data.len() as u64),
            other => panic!("{other:?}"),
        });
        if ch.is_done() {
            break;
        }
    }
    let (d0, d1) = DATA[0];
    assert_eq!(
        got,
        [
            ("hole", 0, d0),
            ("data", d0, d1),
            ("hole", d0 + d1, (2 << 20) - d0 - d1)
        ]
    );
    // Error in structured mode: an ERROR chunk, not a simple reply.
    send_req(&mut s, CMD_READ, 0, 8, IMG_SIZE, 1, &[]).await;
    let mut msg = vec![0u8; CHUNK_HEADER_LEN];
    s.read_exact(&mut msg).await.unwrap();
    let len = u32::from_be_bytes(msg[16..20].try_into().unwrap()) as usize;
    msg.resize(CHUNK_HEADER_LEN + len, 0);
    s.read_exact(&mut msg[CHUNK_HEADER_LEN..]).await.unwrap();
    let (_, chunk, _) = parse_reply(&msg).unwrap();
    assert!(
        matches!(chunk, Some(Chunk::Error { errno: EINVAL, .. })),
        "{chunk:?}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_handshake_times_out_and_limit_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        max_connections: 1,
        ..Default::default()
    };
    let srv = start(dir.path(), config);
    let mut idle = greet(&srv).await;
    assert!(
        closed_by_server(&mut idle).await,
        "idle handshake must be dropped"
    );

    // Connection limit 1: a second client gets no greeting until the first leaves.
    let c1 = Client::connect(&srv.uri(""), &ConnectOptions::default())
        .await
        .unwrap();
    let uri = srv.uri("");
    let second =
        tokio::spawn(async move { Client::connect(&uri, &ConnectOptions::default()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished());
    c1.disconnect().await.unwrap();
    let c2 = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(c2.read(0, 16).await.unwrap(), vec![0u8; 16]);

    // Shutdown with a connected client: server returns, client sees the close.
    srv.stop().await;
    let e = c2.read(0, 16).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Disconnected(_) | ClientError::Io(_)),
        "{e}"
    );
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024
}

/// A client that sends 10,000 reads of the whole 8 MiB export (80 GiB asked for) and never
/// reads a reply: the server stops taking requests at its in-flight bound, its memory stays
/// bounded, other clients are served, and the flooder's first replies are still correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_in_flight_are_bounded() {
    const FLOOD: u64 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        max_in_flight: 16,
        max_buffered_bytes: 64 << 20,
        ..Default::default()
    };
    let srv = start(dir.path(), config);
    let before = rss_bytes();
    let s = raw_connect(&srv, "", false).await;
    let (mut rd, mut wr) = s.into_split();
    let flood = tokio::spawn(async move {
        let mut all = Vec::with_capacity(FLOOD as usize * REQUEST_LEN);
        for cookie in 0..FLOOD {
            let req = Request {
                flags: 0,
                cmd: CMD_READ,
                cookie,
                offset: 0,
                len: IMG_SIZE as u32,
            };
            all.extend_from_slice(&req.encode());
        }
        // Blocks once the server stops reading: that is the bound at work.
        wr.write_all(&all).await.map(|_| wr)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !flood.is_finished(),
        "the server took all 10,000 requests without reading limits"
    );
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 512 << 20,
        "server memory grew by {} MiB under a request flood",
        grown >> 20
    );

    // Other clients are still served while the flooder is stuck.
    tokio::time::timeout(Duration::from_secs(10), normal_client_works(&srv))
        .await
        .expect("a normal client was starved");

    // The flooder's replies (in any order, as NBD allows) are correct and complete.
    let expect = std::fs::read(dir.path().join("ro.raw")).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        rd.read_exact(&mut h).await.unwrap();
        let ReplyHeader::Simple { error, cookie } = parse_reply(&h).unwrap().0 else {
            panic!("expected a simple reply")
        };
        assert_eq!(error, 0);
        assert!(
            cookie < FLOOD && seen.insert(cookie),
            "reply for cookie {cookie} is unknown or repeated"
        );
        let mut data = vec![0u8; IMG_SIZE as usize];
        rd.read_exact(&mut data).await.unwrap();
        assert!(data == expect, "reply {cookie} has the wrong bytes");
    }
    // Hanging up with thousands of requests pending frees the connection.
    drop(rd);
    flood.abort();
    tokio::time::timeout(Duration::from_secs(10), normal_client_works(&srv))
        .await
        .expect("server stuck after the flooder left");
}

/// A server on 127.0.0.1:PORT (TCP) over the same exports, for tests of client addresses.
async fn start_tcp(
    dir: &std::path::Path,
    config: ServerConfig,
) -> (
    u16,
    holdfast::nbd::ShutdownHandle,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let ro = dir.join("tcp.raw");
    make_sparse_image(&ro);
    let exports = vec![(String::new(), file_export(&ro, true))];
    let server = holdfast::nbd::Server::new(config, exports);
    let stop = server.shutdown_handle();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move { server.serve_tcp(listener).await });
    (port, stop, task)
}

/// 200 idle connections from one address (no handshake sent) do not lock out a second
/// client: connections over the per-address limit are closed at once, and the other
/// address is served within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_do_not_lock_out_others() {
    let dir = tempfile::tempdir().unwrap();
    let (port, stop, task) = start_tcp(dir.path(), ServerConfig::default()).await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        idle.push(s);
    }
    // The first 16 wait in the handshake; the rest were closed by the server.
    let mut open = 0;
    for s in &mut idle {
        let mut g = [0u8; GREETING_LEN];
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut g)).await
        {
            open += 1;
        }
    }
    assert_eq!(open, 16, "connections greeted from one address");
    // A client from another address, through the same listener: greeted, its export opened
    // and a read answered, within a second.
    let t = std::time::Instant::now();
    let served = async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).await.unwrap();
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        s.write_all(&encode_option(OPT_EXPORT_NAME, b"").unwrap())
            .await
            .unwrap();
        let mut info = [0u8; 10]; // size u64, flags u16 (no zeroes)
        s.read_exact(&mut info).await.unwrap();
        assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), IMG_SIZE);
        let req = Request {
            flags: 0,
            cmd: CMD_READ,
            cookie: 7,
            offset: 0,
            len: 16,
        };
        s.write_all(&req.encode()).await.unwrap();
        let mut reply = [0u8; SIMPLE_REPLY_LEN + 16];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[SIMPLE_REPLY_LEN..], &[0u8; 16]);
    };
    tokio::time::timeout(Duration::from_secs(1), served)
        .await
        .expect("the other client is served within a second");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    drop(idle);
    stop.shutdown();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// With an idle timeout, a connection that sends nothing after its handshake is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transmission_is_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let srv = start(dir.path(), config);
    let mut s = raw_connect(&srv, "", false).await;
    let t = std::time::Instant::now();
    assert!(
        closed_by_server(&mut s).await,
        "an idle connection is closed"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    // A client that keeps asking is not idle.
    let c = Client::connect(&srv.uri(""), &ConnectOptions::default())
        .await
        .unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(c.read(0, 16).await.unwrap(), vec![0u8; 16]);
    }
    srv.stop().await;
}
