//! (a)–(d): read points against real QEMU — frozen in time, bitmap deltas, teardown in both
//! outcomes, rollback of a failed creation, leftovers of a killed holdfast.

use std::path::Path;

use serde_json::json;

use super::harness::{dirty_ranges, hmp_io, qsd, read_export, run, state, vm, Qemu, State, T};
use crate::qmp::ops::{
    add_bitmap, clean_leftovers, create_read_point, find_leftovers, teardown, DiskRequest,
    NbdServer, Outcome, ReadPoint, ReadPointRequest,
};
use crate::qmp::{Agent, Client, QmpError};

const K64: u64 = 64 << 10;
const M: u64 = 1 << 20;

fn request(
    work: &Path,
    disks: &[(&str, Option<&str>)],
    new: &str,
    nbd: NbdServer,
) -> ReadPointRequest {
    ReadPointRequest {
        work_dir: work.to_path_buf(),
        disks: disks
            .iter()
            .map(|(d, prev)| DiskRequest {
                disk: d.to_string(),
                previous_bitmap: prev.map(String::from),
            })
            .collect(),
        new_bitmap: Some(new.to_string()),
        nbd,
        timeout: T,
    }
}

/// Files holdfast made in its work directory.
fn holdfast_files(work: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(work)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn with_bitmaps(
    mut base: super::harness::State,
    bitmaps: &[(&str, &str, bool)],
) -> super::harness::State {
    base.bitmaps = bitmaps
        .iter()
        .map(|(n, b, r)| (n.to_string(), b.to_string(), *r))
        .collect();
    base.bitmaps.sort();
    base
}

/// A first (full) read point on a VM with disks filled 0x11 / 0x22: frozen in time, then
/// committed, leaving only the new checkpoint.
async fn first_read_point_is_frozen(q: &Qemu, work: &Path, base: &State) {
    let c = &q.client;
    let req = request(
        work,
        &[("ide0", None), ("disk1", None)],
        "holdfast-cp1",
        NbdServer::Own,
    );
    let rp1 = create_read_point(c, &req, None)
        .await
        .expect("read point 1");
    assert_eq!(
        (rp1.disks[0].node.as_str(), rp1.disks[0].size),
        ("disk0", 16 * M)
    );
    assert!(rp1.owns_nbd_server && rp1.disks[0].exported_bitmap.is_none());
    assert!(rp1.disks[0].bitmap_note.is_some());
    // Written after the read point: live has them, the export does not.
    hmp_io(c, "ide0", "write -P 0x33 1M 64k").await;
    hmp_io(c, "ide1", "write -P 0x44 3M 128k").await;
    let img0 = read_export(&rp1.disks[0].uri, q.dir.path()).await;
    let img1 = read_export(&rp1.disks[1].uri, q.dir.path()).await;
    assert_eq!(img0.len() as u64, 16 * M);
    assert!(
        img0.iter().all(|&b| b == 0x11),
        "disk0 export changed after the read point"
    );
    assert!(
        img1.iter().all(|&b| b == 0x22),
        "disk1 export changed after the read point"
    );
    hmp_io(c, "ide0", "read -P 0x33 1M 64k").await;
    hmp_io(c, "ide1", "read -P 0x44 3M 128k").await;

    teardown(c, &rp1, Outcome::Committed, T)
        .await
        .expect("teardown 1");
    let after1 = with_bitmaps(
        base.clone(),
        &[
            ("disk0", "holdfast-cp1", true),
            ("disk1", "holdfast-cp1", true),
        ],
    );
    assert_eq!(state(c).await, after1);
    assert_eq!(
        holdfast_files(work),
        Vec::<String>::new(),
        "fleecing files and nbd.sock removed"
    );
}

/// (a) frozen in time, (b) exact bitmap delta, (c) teardown on success, on a qemu-system VM
/// whose disks sit on guest devices (found by qdev id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_point_is_frozen_and_its_bitmap_marks_the_writes_between() {
    let q = vm(2, 16, false).await;
    let c = &q.client;
    hmp_io(c, "ide0", "write -P 0x11 0 16M").await;
    hmp_io(c, "ide1", "write -P 0x22 0 16M").await;
    let work = q.path("work");
    let base = state(c).await;
    first_read_point_is_frozen(&q, &work, &base).await;

    // Between the read points.
    hmp_io(c, "ide0", "write -P 0x55 5M 64k").await;
    let req = request(
        &work,
        &[
            ("disk0", Some("holdfast-cp1")),
            ("disk1", Some("holdfast-cp1")),
        ],
        "holdfast-cp2",
        NbdServer::Own,
    );
    let rp2 = create_read_point(c, &req, None)
        .await
        .expect("read point 2");
    assert_eq!(
        rp2.disks[0].exported_bitmap.as_deref(),
        Some("holdfast-cp1")
    );
    hmp_io(c, "ide0", "write -P 0x66 8M 64k").await; // after rp2: not in cp1's delta
    assert_eq!(
        dirty_ranges(&rp2.disks[0].uri, "holdfast-cp1").await,
        vec![(M, K64), (5 * M, K64)]
    );
    assert_eq!(
        dirty_ranges(&rp2.disks[1].uri, "holdfast-cp1").await,
        vec![(3 * M, 2 * K64)]
    );
    let img0 = read_export(&rp2.disks[0].uri, q.dir.path()).await;
    assert!(img0[(8 * M) as usize..(8 * M + K64) as usize]
        .iter()
        .all(|&b| b == 0x11));
    assert!(img0[(5 * M) as usize..(5 * M + K64) as usize]
        .iter()
        .all(|&b| b == 0x55));

    teardown(c, &rp2, Outcome::Committed, T)
        .await
        .expect("teardown 2");
    let after2 = with_bitmaps(
        base.clone(),
        &[
            ("disk0", "holdfast-cp2", true),
            ("disk1", "holdfast-cp2", true),
        ],
    );
    assert_eq!(state(c).await, after2);
    teardown(c, &rp2, Outcome::Committed, T)
        .await
        .expect("teardown is idempotent");
    assert_eq!(state(c).await, after2);
}

async fn bitmap_count(c: &Client, node: &str, name: &str) -> u64 {
    let n = crate::qmp::ops::find_disk(c, node).await.expect("node");
    n.bitmap(name)
        .unwrap_or_else(|| panic!("bitmap {name} missing"))
        .count
}

/// qemu-storage-daemon whose disk0 has checkpoint `holdfast-cp1` with one 64 KiB write, and
/// the test's own NBD server with a writable export of the live disk: (daemon, socket, URI).
async fn qsd_with_live_export() -> (Qemu, std::path::PathBuf, String) {
    let q = qsd(1, 16).await;
    let c = &q.client;
    let sock = q.path("test-nbd.sock");
    let sock_s = sock.to_str().expect("utf-8").to_string();
    c.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock_s}}}),
    )
    .await
    .expect("nbd");
    let live_args = json!({"type": "nbd", "id": "live", "node-name": "disk0", "name": "live", "writable": true});
    c.execute("block-export-add", live_args)
        .await
        .expect("live export");
    let live = format!("nbd+unix:///live?socket={sock_s}");
    add_bitmap(c, "disk0", "holdfast-cp1", true, None)
        .await
        .expect("cp1");
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 2M 64k", &live],
    )
    .await;
    (q, sock, live)
}

/// (c) teardown on failure restores the previous checkpoint with the writes it missed; a
/// creation that fails half-way rolls back. qemu-storage-daemon with the test's own NBD server
/// (`NbdServer::Existing`) and a writable export of the live disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_read_point_keeps_the_previous_checkpoint_correct() {
    let (q, sock, live) = qsd_with_live_export().await;
    let c = &q.client;
    let sock_s = sock.to_str().expect("utf-8").to_string();
    let work = q.path("work");
    let base = state(c).await;

    // Fails after the transaction (our own server cannot start: another one runs): rolled back.
    let bad = request(
        &work,
        &[("disk0", Some("holdfast-cp1"))],
        "holdfast-cp2",
        NbdServer::Own,
    );
    let e = create_read_point(c, &bad, None).await.unwrap_err();
    assert!(e.to_string().contains("nbd_socket"), "{e}");
    assert_eq!(state(c).await, base, "failed creation left something");
    assert_eq!(holdfast_files(&work), Vec::<String>::new());

    let req = request(
        &work,
        &[("disk0", Some("holdfast-cp1"))],
        "holdfast-cp2",
        NbdServer::Existing(sock.clone()),
    );
    let rp = create_read_point(c, &req, None).await.expect("read point");
    assert!(!rp.owns_nbd_server && rp.disks[0].uri.contains(&sock_s));
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x78 4M 64k", &live],
    )
    .await;
    let img = read_export(&rp.disks[0].uri, q.dir.path()).await;
    assert!(img[(4 * M) as usize..(4 * M + K64) as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(img[(2 * M) as usize..(2 * M + K64) as usize]
        .iter()
        .all(|&b| b == 0x77));
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x78 4M 64k", &live],
    )
    .await;
    assert_eq!(
        dirty_ranges(&rp.disks[0].uri, "holdfast-cp1").await,
        vec![(2 * M, K64)]
    );

    teardown(c, &rp, Outcome::Failed, T)
        .await
        .expect("teardown");
    assert_eq!(
        state(c).await,
        base,
        "cp1 recording again, cp2 gone, nothing else left"
    );
    assert_eq!(
        bitmap_count(c, "disk0", "holdfast-cp1").await,
        2 * K64,
        "cp1 took back the write it missed"
    );
    teardown(c, &rp, Outcome::Failed, T)
        .await
        .expect("idempotent");
    assert_eq!(state(c).await, base);
    // The test's server and export were left alone.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x78 4M 64k", &live],
    )
    .await;
}

/// A holdfast on `qmp` that made a whole read point and half of a second one, then died.
async fn killed_holdfast(qmp: &Path, work: &Path) -> ReadPoint {
    let killed = Client::connect(qmp, T).await.expect("holdfast connects");
    let req = request(
        work,
        &[
            ("disk0", Some("holdfast-cp0")),
            ("disk1", Some("holdfast-cp0")),
        ],
        "holdfast-cp1",
        NbdServer::Own,
    );
    let rp = create_read_point(&killed, &req, None)
        .await
        .expect("read point");
    // A second read point killed while creating its fleecing image.
    let half = work.join("holdfast-rp000000-f0.qcow2");
    let half_s = half.to_str().expect("utf-8");
    let job = "holdfast-rp000000-c0";
    let opts = json!({"job-id": job, "options": {"driver": "file", "filename": half_s, "size": 0}});
    killed
        .execute("blockdev-create", opts)
        .await
        .expect("create");
    killed
        .wait_job_status(job, &[], T)
        .await
        .expect("concluded");
    let add = json!({"driver": "file", "filename": half_s, "node-name": "holdfast-rp000000-t0"});
    killed
        .execute("blockdev-add", add)
        .await
        .expect("temp node");
    killed.close().await;

    rp
}

/// (d) A killed holdfast: a whole read point and a half-made one are found and cleaned by a
/// new connection; the committed checkpoint is kept and re-enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_killed_holdfast_are_found_and_cleaned() {
    let q = qsd(2, 16).await;
    let work = q.path("work");
    for d in ["disk0", "disk1"] {
        add_bitmap(&q.client, d, "holdfast-cp0", true, None)
            .await
            .expect("cp0");
    }
    let base = state(&q.client).await;
    let qmp2 = q.path("qmp2.sock");
    let rp = killed_holdfast(&qmp2, &work).await;
    let c = Client::connect(&qmp2, T)
        .await
        .expect("a new holdfast connects");
    let found = find_leftovers(&c, &work, Some("holdfast-cp0"), None)
        .await
        .expect("find");
    let mut exports = rp
        .disks
        .iter()
        .map(|d| d.export.clone())
        .collect::<Vec<_>>();
    exports.sort();
    let mut got_exports = found.exports.clone();
    got_exports.sort();
    assert_eq!(got_exports, exports);
    assert_eq!(found.jobs.len(), 3, "{:?}", found.jobs);
    assert_eq!(found.nodes.len(), 3, "{:?}", found.nodes);
    assert_eq!(found.files.len(), 3, "{:?}", found.files);
    assert_eq!(found.stray_bitmaps.len(), 2, "{:?}", found.stray_bitmaps);
    assert_eq!(
        found.frozen_checkpoints,
        vec!["disk0".to_string(), "disk1".to_string()]
    );
    assert_eq!(found.nbd_server.as_deref(), Some(rp.nbd_socket.as_path()));

    let cleaned = clean_leftovers(&c, &work, Some("holdfast-cp0"), None, T)
        .await
        .expect("clean");
    assert_eq!(cleaned, found);
    assert_eq!(
        state(&c).await,
        base,
        "checkpoint kept and recording, all else gone"
    );
    assert!(find_leftovers(&c, &work, Some("holdfast-cp0"), None)
        .await
        .expect("find")
        .is_empty());
    assert_eq!(holdfast_files(&work), Vec::<String>::new());
    // Without a committed checkpoint, holdfast bitmaps are strays too.
    let found = find_leftovers(&c, &work, None, None).await.expect("find");
    assert_eq!(found.stray_bitmaps.len(), 2);
    let e = create_read_point(
        &c,
        &request(&work, &[("disk0", None)], "holdfast-cp0", NbdServer::Own),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, QmpError::Invalid(ref m) if m.contains("clean_leftovers")),
        "{e}"
    );
}

/// Quiesce: ping, freeze, the transaction, thaw — through the guest agent (a fake one here,
/// as the test VMs have no OS); with no agent in the guest the read point fails cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_point_quiesces_the_guest_through_its_agent() {
    let q = qsd(1, 16).await;
    let c = &q.client;
    let work = q.path("work");
    let base = state(c).await;
    let (_d, agent_path, log) = super::peer::fake_agent().await;
    let agent = Agent::new(&agent_path, T);
    let req = request(&work, &[("disk0", None)], "holdfast-cq", NbdServer::Own);
    let rp = create_read_point(c, &req, Some(&agent))
        .await
        .expect("quiesced read point");
    assert!(rp.quiesced);
    let seen = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(
        seen,
        vec!["guest-ping", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    );
    teardown(c, &rp, Outcome::Failed, T)
        .await
        .expect("teardown");
    assert_eq!(state(c).await, base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_point_with_a_silent_agent_fails_and_leaves_nothing() {
    let q = vm(1, 16, true).await;
    let c = &q.client;
    let work = q.path("work");
    let base = state(c).await;
    let agent = Agent::new(
        q.agent.as_ref().expect("agent"),
        std::time::Duration::from_secs(2),
    );
    let req = request(&work, &[("ide0", None)], "holdfast-cq", NbdServer::Own);
    let e = create_read_point(c, &req, Some(&agent)).await.unwrap_err();
    assert!(matches!(e, QmpError::AgentTimeout { .. }), "{e}");
    assert_eq!(state(c).await, base);
    assert_eq!(holdfast_files(&work), Vec::<String>::new());
    assert!(crate::qmp::ops::run_state(c).await.expect("status").running);
}
