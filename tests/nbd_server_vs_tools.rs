//! Our server against real clients: nbdinfo, nbdcopy, qemu-img, qemu-io,
//! and our own client.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed
#[path = "nbd_common/mod.rs"]
mod common;

use std::sync::Arc;

use common::*;
use holdfast::nbd::proto::{STATE_HOLE, STATE_ZERO};
use holdfast::nbd::{Client, ClientError, ConnectOptions, ServerConfig};

fn setup(dir: &std::path::Path) -> (TestServer, Vec<u8>, std::path::PathBuf) {
    let ro = dir.join("ro.raw");
    let rw = dir.join("rw.raw");
    let contents = make_sparse_image(&ro);
    make_sparse_image(&rw);
    let exports = vec![
        (String::new(), file_export(&ro, true)),
        ("rw".to_string(), file_export(&rw, false)),
    ];
    (
        TestServer::start(dir, exports, ServerConfig::default()),
        contents,
        rw,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_holes_and_lists_exports() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _, _) = setup(dir.path());
    let (ok, out, err) = run_tool("nbdinfo", &["--map", &srv.uri("")]).await;
    assert!(ok, "nbdinfo failed: {err}");
    let got: Vec<(u64, u64, bool)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ty: u32 = f[2].parse().unwrap();
            assert!(ty == 0 || ty == STATE_HOLE | STATE_ZERO, "{l}");
            (f[0].parse().unwrap(), f[1].parse().unwrap(), ty == 0)
        })
        .collect();
    assert_eq!(got, expected_map(), "{out}");

    let (ok, out, err) = run_tool("nbdinfo", &["--list", &srv.uri("")]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("export=\"\"") && out.contains("export=\"rw\""),
        "{out}"
    );
    assert!(out.contains("base:allocation"), "{out}");
    assert!(
        out.contains("is_read_only: true") && out.contains("is_read_only: false"),
        "{out}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_and_qemu_img_compare_see_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, contents, _) = setup(dir.path());
    let out = dir.path().join("copy.raw");
    std::fs::File::create(&out).unwrap();
    let (ok, _, err) = run_tool("nbdcopy", &[&srv.uri(""), out.to_str().unwrap()]).await;
    assert!(ok, "nbdcopy: {err}");
    assert!(
        std::fs::read(&out).unwrap() == contents,
        "nbdcopy output differs"
    );

    let orig = dir.path().join("ro.raw");
    let args = [
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        orig.to_str().unwrap(),
        &srv.uri(""),
    ];
    let (ok, stdout, err) = run_tool("qemu-img", &args).await;
    assert!(ok, "qemu-img compare: {stdout} {err}");
    assert!(stdout.contains("Images are identical"), "{stdout}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _, rw) = setup(dir.path());
    let cmds = [
        "read -P 0 0 64k",
        "write -P 0xab 2M 64k",
        "read -P 0xab 2M 64k",
        "write -z 3M 64k",
        "read -P 0 3M 64k",
        "discard 7M 64k",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    let uri = srv.uri("rw");
    args.push(&uri);
    for c in &cmds {
        args.extend(["-c", c]);
    }
    let (ok, out, err) = run_tool("qemu-io", &args).await;
    assert!(ok, "qemu-io: {out} {err}");
    assert!(
        !out.contains("failed") && !err.contains("failed"),
        "{out} {err}"
    );
    assert_eq!(out.matches("read 65536/65536").count(), 3, "{out}");
    let data = std::fs::read(&rw).unwrap();
    assert!(data[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0xab));
    assert!(data[3 << 20..(3 << 20) + 65536].iter().all(|&b| b == 0));

    // Read-only export: qemu-io's write must fail with a permission error.
    let uri0 = srv.uri("");
    let (_, out, err) = run_tool("qemu-io", &["-f", "raw", &uri0, "-c", "write 0 512"]).await;
    let all = format!("{out}{err}");
    assert!(
        all.contains("ermission") || all.contains("read-only") || all.contains("Read-only"),
        "{all}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_against_own_server() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, contents, rw) = setup(dir.path());
    let c = Arc::new(
        Client::connect(&srv.uri("rw"), &ConnectOptions::default())
            .await
            .unwrap(),
    );
    assert!(!c.is_read_only() && c.can_multi_conn() && c.structured_replies());
    assert_eq!(c.block_size(), Some((1, 4096, 32 << 20)));

    // 16 writes in flight, then read back.
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.write(i * 65536, &vec![i as u8 + 1; 65536]).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    c.flush().await.unwrap();
    let back = c.read(0, 16 * 65536).await.unwrap();
    for i in 0..16usize {
        assert!(back[i * 65536..(i + 1) * 65536]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    // Reads spanning data and holes are reassembled (OFFSET_HOLE chunks).
    let r = c.read((3 << 20) - 4096, 256 << 10).await.unwrap();
    assert!(r[..] == contents[(3 << 20) - 4096..(3 << 20) + (252 << 10)]);
    // Punch a hole with write_zeroes and see it in block status.
    c.write_zeroes(7 << 20, 1 << 20, false).await.unwrap();
    let ext = c
        .block_status_for(7 << 20, 1 << 20, "base:allocation")
        .await
        .unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].flags, STATE_HOLE | STATE_ZERO);
    assert_eq!(ext[0].len, 1 << 20);
    // Errors come back per request; the connection keeps working.
    let e = c.read(IMG_SIZE, 1).await.unwrap_err();
    assert!(matches!(e, ClientError::Server { errno: 22, .. }), "{e}");
    let e = c.write(IMG_SIZE - 1, b"ab").await.unwrap_err();
    assert!(matches!(e, ClientError::Server { errno: 28, .. }), "{e}");
    assert_eq!(c.read(0, 1).await.unwrap(), vec![1]);
    Arc::try_unwrap(c).ok().unwrap().disconnect().await.unwrap();
    let on_disk = std::fs::read(&rw).unwrap();
    assert!(on_disk[..65536].iter().all(|&b| b == 1));

    // Without structured replies (simple replies only).
    let opts = ConnectOptions {
        structured_replies: false,
        ..Default::default()
    };
    let c = Client::connect(&srv.uri(""), &opts).await.unwrap();
    assert!(!c.structured_replies() && c.meta_contexts().is_empty());
    let r = c.read(3 << 20, 4096).await.unwrap();
    assert!(r[..] == contents[3 << 20..(3 << 20) + 4096]);
    c.disconnect().await.unwrap();

    // Unknown export is refused during GO.
    let e = Client::connect(&srv.uri("nope"), &ConnectOptions::default())
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::OptionRefused { .. }), "{e}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_and_nbd_uri() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.raw");
    let contents = make_sparse_image(&img);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let exports = vec![("disk".to_string(), file_export(&img, true))];
    let server = holdfast::nbd::Server::new(ServerConfig::default(), exports);
    let stop = server.shutdown_handle();
    let task = tokio::spawn(async move { server.serve_tcp(listener).await });
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let c = Client::connect(&uri, &ConnectOptions::default())
        .await
        .unwrap();
    assert!(c.read(7 << 20, 4096).await.unwrap()[..] == contents[7 << 20..(7 << 20) + 4096]);
    c.disconnect().await.unwrap();
    let (ok, out, err) = run_tool("nbdinfo", &["--size", &uri]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), IMG_SIZE.to_string());
    stop.shutdown();
    tokio::time::timeout(std::time::Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
