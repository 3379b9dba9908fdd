//! Our client against real `qemu-nbd` servers.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed
#[path = "nbd_common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use holdfast::nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use holdfast::nbd::{Client, ConnectOptions, Extent};

/// Walk block status over the whole export (bounded number of calls) and
/// merge adjacent extents with equal `classify` values.
async fn full_map(c: &Client, ctx: &str, classify: fn(u32) -> bool) -> Vec<(u64, u64, bool)> {
    let mut merged: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = 0;
    for _ in 0..10_000 {
        if pos >= c.size() {
            break;
        }
        let len = (c.size() - pos).min(1 << 30) as u32;
        let ext: Vec<Extent> = c.block_status_for(pos, len, ctx).await.unwrap();
        assert!(!ext.is_empty());
        for e in ext {
            assert_eq!(e.offset, pos);
            let len = u64::from(e.len).min(c.size() - pos);
            match merged.last_mut() {
                Some(last) if last.2 == classify(e.flags) => last.1 += len,
                _ => merged.push((pos, len, classify(e.flags))),
            }
            pos += len;
        }
    }
    assert_eq!(pos, c.size());
    merged
}

#[tokio::test]
async fn reads_and_allocation_match_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let contents = make_sparse_image(&img);
    let sock = dir.path().join("q.sock");
    let _qemu = spawn_qemu_nbd(&sock, &["-r", "-t", "-f", "raw", img.to_str().unwrap()]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let c = Arc::new(
        Client::connect(&uri, &ConnectOptions::default())
            .await
            .unwrap(),
    );
    assert_eq!(c.size(), IMG_SIZE);
    assert!(c.is_read_only());
    assert!(c.structured_replies());
    assert_eq!(c.meta_contexts().len(), 1);

    // 32 reads of 256 KiB, all in flight at once over one connection.
    let chunk = 256 << 10;
    let mut tasks = Vec::new();
    for i in 0..(IMG_SIZE / chunk) {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            (i * chunk, c.read(i * chunk, chunk as u32).await.unwrap())
        }));
    }
    for t in tasks {
        let (off, data) = t.await.unwrap();
        assert!(
            data == contents[off as usize..(off + chunk) as usize],
            "mismatch at {off}"
        );
    }
    // Unaligned small read.
    let d = c.read((1 << 20) - 7, 20).await.unwrap();
    assert_eq!(d, &contents[(1 << 20) - 7..(1 << 20) + 13]);

    let map = full_map(&c, "base:allocation", |f| f & STATE_HOLE == 0).await;
    assert_eq!(map, expected_map());
    // Holes in a raw file also read as zero.
    let ext = c
        .block_status_for(0, 4096, "base:allocation")
        .await
        .unwrap();
    assert_eq!(ext[0].flags, STATE_HOLE | STATE_ZERO);

    // Past-the-end read is refused by the server, connection stays usable.
    let err = c.read(IMG_SIZE - 512, 1024).await.unwrap_err();
    assert!(
        matches!(err, holdfast::nbd::ClientError::Server { errno: 22, .. }),
        "{err}"
    );
    assert_eq!(c.read(0, 512).await.unwrap(), vec![0u8; 512]);
    // Writes on a read-only export are refused client side.
    assert!(c.write(0, b"x").await.is_err());
    Arc::try_unwrap(c).ok().unwrap().disconnect().await.unwrap();
}

#[tokio::test]
async fn dirty_bitmap_extents_match_written_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let img_s = img.to_str().unwrap();
    let run = |args: &[&str], tool: &str| {
        let st = Command::new(tool).args(args).output().unwrap();
        assert!(
            st.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    };
    run(&["create", "-q", "-f", "qcow2", img_s, "8M"], "qemu-img");
    run(&["bitmap", "--add", img_s, "b0"], "qemu-img");
    let written = [
        (1u64 << 20, 64u64 << 10),
        (3 << 20, 192 << 10),
        (6 << 20, 128 << 10),
    ];
    for (off, len) in written {
        let cmd = format!("write -P 0x55 {off} {len}");
        run(&["-f", "qcow2", img_s, "-c", &cmd], "qemu-io");
    }
    let sock = dir.path().join("q.sock");
    let _qemu = spawn_qemu_nbd(&sock, &["-r", "-t", "-f", "qcow2", "-B", "b0", img_s]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let opts = ConnectOptions {
        meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()],
        ..Default::default()
    };
    let c = Client::connect(&uri, &opts).await.unwrap();
    let names: Vec<&str> = c.meta_contexts().iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["base:allocation", "qemu:dirty-bitmap:b0"]);

    let mut expected = Vec::new();
    let mut pos = 0;
    for (off, len) in written {
        expected.push((pos, off - pos, false));
        expected.push((off, len, true));
        pos = off + len;
    }
    expected.push((pos, (8 << 20) - pos, false));
    let dirty = full_map(&c, "qemu:dirty-bitmap:b0", |f| f & STATE_DIRTY != 0).await;
    assert_eq!(dirty, expected);
    let alloc = full_map(&c, "base:allocation", |f| f & STATE_HOLE == 0).await;
    assert_eq!(alloc, expected, "qcow2 allocation follows the writes too");
    for (off, len) in written {
        assert!(c
            .read(off, len as u32)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0x55));
    }
    assert!(c.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    c.disconnect().await.unwrap();
}
