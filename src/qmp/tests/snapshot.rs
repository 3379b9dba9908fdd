//! (e) internal snapshots with and without memory, (f) external overlays, (g) the guest agent
//! with no agent in the guest.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::harness::{hmp_io, qsd, run, vm, T};
use crate::qmp::ops::{
    commit_overlay, create_overlays, delete_internal_snapshot, find_disk, list_internal_snapshots,
    load_internal_snapshot, run_state, save_internal_snapshot, OverlayRequest,
};
use crate::qmp::{Agent, QmpError};

fn now_sec() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_snapshot_with_memory_reverts_data_and_run_state() {
    let q = vm(2, 16, false).await;
    let c = &q.client;
    let devices = vec![q.node(0), q.node(1)];
    hmp_io(c, "ide0", "write -P 0xa1 0 1M").await;
    hmp_io(c, "ide1", "write -P 0xb1 0 1M").await;
    let tag = "holdfast-s1";
    save_internal_snapshot(c, tag, &devices, Some("disk0"), T)
        .await
        .expect("save");
    let s0 = list_internal_snapshots(c, "ide0").await.expect("list");
    let s1 = list_internal_snapshots(c, "disk1").await.expect("list");
    assert_eq!((s0.len(), s0[0].tag.as_str()), (1, tag));
    assert!(s0[0].vm_state_size > 0, "memory state on the vmstate disk");
    assert_eq!((s1[0].tag.as_str(), s1[0].vm_state_size), (tag, 0));
    assert!(
        (now_sec() - s0[0].date_sec).abs() < 120,
        "date {}",
        s0[0].date_sec
    );
    assert!(
        c.query_jobs().await.expect("jobs").is_empty(),
        "snapshot job dismissed"
    );

    // Paused before the revert: QEMU leaves it stopped; resume=true continues it.
    hmp_io(c, "ide0", "write -P 0xa2 0 1M").await;
    hmp_io(c, "ide1", "write -P 0xb2 0 1M").await;
    c.execute("stop", Value::Null).await.expect("stop");
    let st = load_internal_snapshot(c, tag, &devices, "disk0", true, T)
        .await
        .expect("load");
    assert!(st.running, "{st:?}");
    hmp_io(c, "ide0", "read -P 0xa1 0 1M").await;
    hmp_io(c, "ide1", "read -P 0xb1 0 1M").await;
    // Running before the revert: QEMU restarts it by itself.
    hmp_io(c, "ide0", "write -P 0xa3 0 1M").await;
    let st = load_internal_snapshot(c, tag, &devices, "disk0", false, T)
        .await
        .expect("load");
    assert!(st.running, "{st:?}");
    hmp_io(c, "ide0", "read -P 0xa1 0 1M").await;
    // Paused and resume=false: stays stopped.
    c.execute("stop", Value::Null).await.expect("stop");
    let st = load_internal_snapshot(c, tag, &devices, "disk0", false, T)
        .await
        .expect("load");
    assert!(!st.running, "{st:?}");
    c.execute("cont", Value::Null).await.expect("cont");

    delete_internal_snapshot(c, tag, &devices, T)
        .await
        .expect("delete");
    assert!(list_internal_snapshots(c, "disk0")
        .await
        .expect("list")
        .is_empty());
    assert!(list_internal_snapshots(c, "disk1")
        .await
        .expect("list")
        .is_empty());
    delete_internal_snapshot(c, tag, &devices, T)
        .await
        .expect("deleting again is fine");
}

/// Disk-only on a running VM: taken atomically, but a live revert is refused untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_only_snapshot_on_a_running_vm_is_not_reverted_live() {
    let q = vm(2, 16, false).await;
    let c = &q.client;
    let devices = vec![q.node(0), q.node(1)];
    save_internal_snapshot(c, "holdfast-d1", &devices, None, T)
        .await
        .expect("disk-only");
    let s0 = list_internal_snapshots(c, "disk0").await.expect("list");
    assert_eq!(
        (s0[0].tag.as_str(), s0[0].vm_state_size),
        ("holdfast-d1", 0)
    );
    let e = load_internal_snapshot(c, "holdfast-d1", &devices, "disk0", true, T)
        .await
        .unwrap_err();
    assert!(
        matches!(e, QmpError::Invalid(ref m) if m.contains("disk-only") && m.contains("qemu-img snapshot -a")),
        "{e}"
    );
    assert!(
        run_state(c).await.expect("status").running,
        "the VM was not touched"
    );
    let e = save_internal_snapshot(c, "holdfast-d1", &devices, Some("disk0"), T)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("holdfast-d1"),
        "duplicate tag refused: {e}"
    );
    delete_internal_snapshot(c, "holdfast-d1", &devices, T)
        .await
        .expect("delete");
    assert!(list_internal_snapshots(c, "disk0")
        .await
        .expect("list")
        .is_empty());
    assert!(save_internal_snapshot(c, "my snap", &devices, None, T)
        .await
        .is_err());
}

/// qemu-storage-daemon has no snapshot jobs: group disk-only snapshot by transaction, delete by
/// `blockdev-snapshot-delete-internal-sync`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_only_group_snapshot_on_storage_daemon() {
    let q = qsd(2, 16).await;
    let c = &q.client;
    let devices = vec![q.node(0), q.node(1)];
    save_internal_snapshot(c, "holdfast-g1", &devices, None, T)
        .await
        .expect("save");
    for d in &devices {
        let s = list_internal_snapshots(c, d).await.expect("list");
        assert_eq!(
            s.iter().map(|s| s.tag.as_str()).collect::<Vec<_>>(),
            vec!["holdfast-g1"]
        );
    }
    let e = save_internal_snapshot(c, "holdfast-g1", &devices, Some("disk0"), T)
        .await
        .unwrap_err();
    assert_eq!(e.class(), Some("CommandNotFound"), "{e}");
    delete_internal_snapshot(c, "holdfast-g1", &devices, T)
        .await
        .expect("delete");
    for d in &devices {
        assert!(list_internal_snapshots(c, d)
            .await
            .expect("list")
            .is_empty());
    }
}

/// (f) An external overlay on a running VM and its removal by active commit keep every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_overlay_then_commit_keeps_the_data() {
    let q = vm(1, 16, false).await;
    let c = &q.client;
    hmp_io(c, "ide0", "write -P 0xc1 0 1M").await;
    let file = q.path("overlay.qcow2");
    let ovs = create_overlays(
        c,
        &[OverlayRequest {
            node: q.node(0),
            file: file.clone(),
        }],
    )
    .await
    .expect("overlay");
    let top = find_disk(c, "ide0").await.expect("disk");
    assert_eq!(
        top.node_name, ovs[0].overlay_node,
        "the device now writes to the overlay"
    );
    assert!(
        top.backing_file
            .as_deref()
            .is_some_and(|b| b.ends_with("disk0.qcow2")),
        "{top:?}"
    );
    hmp_io(c, "ide0", "write -P 0xc2 512k 1M").await;

    commit_overlay(c, &ovs[0], T).await.expect("commit");
    assert_eq!(find_disk(c, "ide0").await.expect("disk").node_name, "disk0");
    assert!(!file.exists(), "overlay file removed");
    assert!(c.query_jobs().await.expect("jobs").is_empty());
    hmp_io(c, "ide0", "read -P 0xc1 0 512k").await;
    hmp_io(c, "ide0", "read -P 0xc2 512k 1M").await;
    commit_overlay(c, &ovs[0], T).await.expect("idempotent");
    // The base file itself holds the overlay's writes once QEMU is gone.
    let img = q.disks[0].1.to_str().expect("utf-8").to_string();
    let _ = c.execute("quit", Value::Null).await;
    let deadline = Instant::now() + T;
    loop {
        let out = tokio::process::Command::new("qemu-img")
            .args(["info", "-U", &img])
            .output()
            .await;
        let locked = tokio::process::Command::new("qemu-io")
            .args(["-r", "-c", "read -P 0xc2 512k 1M", &img])
            .output()
            .await
            .map(|o| !o.status.success())
            .unwrap_or(true);
        if !locked || Instant::now() > deadline {
            assert!(out.is_ok());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = run("qemu-io", &["-r", "-c", "read -P 0xc2 512k 1M", &img]).await;
    assert!(!out.contains("fail"), "{out}");
}

/// (g) No agent in the guest: ping fails with a clear error within the bound; the VM runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_without_agent_times_out_cleanly() {
    let q = vm(1, 16, true).await;
    let path = q.agent.clone().expect("agent socket");
    let agent = Agent::new(&path, Duration::from_secs(2));
    for _ in 0..2 {
        let t0 = Instant::now();
        let e = agent.ping().await.unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(e, QmpError::AgentTimeout { .. }), "{e}");
        assert!(e.to_string().contains("qemu-guest-agent"), "{e}");
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
    assert!(matches!(
        agent.fsfreeze_status().await.unwrap_err(),
        QmpError::AgentTimeout { .. }
    ));
    let st = run_state(&q.client).await.expect("status");
    assert!(st.running, "{st:?}");
    hmp_io(&q.client, "ide0", "write -P 0x01 0 64k").await;
    assert!(
        q.log().is_empty() || !q.log().contains("error"),
        "{}",
        q.log()
    );
}

/// Discovery and the bitmap operations on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_discovery_and_bitmap_operations() {
    use crate::qmp::ops::{
        add_bitmap, disable_bitmap, enable_bitmap, merge_bitmaps, remove_bitmap, rotate_checkpoint,
    };
    let q = qsd(1, 16).await;
    let c = &q.client;
    let d = find_disk(c, "disk0").await.expect("disk0");
    assert_eq!((d.driver.as_str(), d.virtual_size), ("qcow2", 16 << 20));
    assert!(
        d.file.ends_with("disk0.qcow2") && d.bitmaps.is_empty(),
        "{d:?}"
    );
    let e = find_disk(c, "nope").await.unwrap_err();
    assert!(
        matches!(e, QmpError::NotFound(ref m) if m.contains("disk0")),
        "{e}"
    );

    add_bitmap(c, "disk0", "holdfast-b1", true, Some(128 << 10))
        .await
        .expect("add");
    rotate_checkpoint(c, "disk0", Some("holdfast-b1"), "holdfast-b2")
        .await
        .expect("rotate");
    let d = find_disk(c, "disk0").await.expect("disk0");
    let (b1, b2) = (
        d.bitmap("holdfast-b1").expect("b1"),
        d.bitmap("holdfast-b2").expect("b2"),
    );
    assert!(!b1.recording && b1.persistent && b1.granularity == 128 << 10 && !b1.busy);
    assert!(b2.recording && b2.persistent && !b2.inconsistent);
    disable_bitmap(c, "disk0", "holdfast-b2")
        .await
        .expect("disable");
    enable_bitmap(c, "disk0", "holdfast-b1")
        .await
        .expect("enable");
    merge_bitmaps(c, "disk0", "holdfast-b1", &["holdfast-b2"])
        .await
        .expect("merge");
    let d = find_disk(c, "disk0").await.expect("disk0");
    assert!(d.bitmap("holdfast-b1").expect("b1").recording);
    assert!(!d.bitmap("holdfast-b2").expect("b2").recording);
    let e = rotate_checkpoint(c, "disk0", Some("holdfast-b1"), "holdfast-b2")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("transaction"),
        "an existing name fails the whole transaction: {e}"
    );
    assert!(
        find_disk(c, "disk0")
            .await
            .expect("disk0")
            .bitmap("holdfast-b1")
            .expect("b1")
            .recording
    );
    remove_bitmap(c, "disk0", "holdfast-b1")
        .await
        .expect("remove");
    remove_bitmap(c, "disk0", "holdfast-b2")
        .await
        .expect("remove");
    assert!(find_disk(c, "disk0")
        .await
        .expect("disk0")
        .bitmaps
        .is_empty());
}
