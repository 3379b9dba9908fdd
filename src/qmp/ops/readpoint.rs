//! Read points: a frozen-in-time, read-only NBD export of every disk of one VM while the VM
//! keeps running (image fleecing), plus the checkpoint bitmap rotation, in one `transaction`.
//!
//! Per disk `i` of read point `holdfast-rpTOKEN` (TOKEN: 6 hex digits):
//! 1. the fleecing image `WORK/holdfast-rpTOKEN-fI.qcow2`, made by QEMU itself:
//!    `blockdev-create {driver: file, size: 0}` (job `…-cI`), `blockdev-add` it as a temporary
//!    protocol node `…-tI`, `blockdev-create {driver: qcow2, file: …-tI, size: <disk size>}`,
//!    `blockdev-del …-tI`;
//! 2. `blockdev-add {driver: qcow2, node-name: …-fI, file: {driver: file, filename},
//!    backing: <live node>}`: reads of blocks not yet copied fall through to the live disk;
//! 3. one `transaction` for all disks: `blockdev-backup {job-id: …-bI, device: <live>,
//!    target: …-fI, sync: none, auto-dismiss: false}` (copy-before-write: the old contents of
//!    every block the guest overwrites are first copied into the fleecing image),
//!    `block-dirty-bitmap-disable <previous>` (when usable) and
//!    `block-dirty-bitmap-add <new> persistent`;
//! 4. `nbd-server-start {addr: {type: unix, data: {path: WORK/nbd.sock}}}` unless running;
//! 5. `block-export-add {type: nbd, id/name: …-eI, node-name: …-fI, writable: false,
//!    bitmaps: [<previous>]}` (the bitmap is found on the live node through the backing chain).
//!
//! Invariants: nothing is created before every disk, bitmap and name was checked; a failure
//! at any step tears down what was made (`teardown(Failed)`), so the previous checkpoint stays
//! valid; the returned [`ReadPoint`] serialises, so teardown can run from another process.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::bitmaps::{action, transaction};
use super::cleanup;
use super::model::{
    listening, path_str, NbdServer, Outcome, ReadPoint, ReadPointDisk, ReadPointRequest,
    NBD_SOCKET, RP_PREFIX,
};
use super::nodes::{list_nodes, BlockNode};
use super::{check_name, token};
use crate::qmp::{Agent, Client, Frozen, QmpError, Result};

/// Create a read point for `req.disks` (see the module docs for the exact commands). With
/// `quiesce`, the guest's filesystems are frozen through its agent just around the transaction
/// (`guest-ping`, `guest-fsfreeze-freeze`, transaction, `guest-fsfreeze-thaw`; thaw is sent
/// whenever freeze was); an agent that does not answer fails the read point, which the caller
/// may retry without quiescing (crash-consistent).
pub async fn create_read_point(
    client: &Client,
    req: &ReadPointRequest,
    quiesce: Option<&Agent>,
) -> Result<ReadPoint> {
    let mut rp = plan(client, req).await?;
    match build(client, req, &mut rp, quiesce).await {
        Ok(()) => Ok(rp),
        Err(e) => {
            tracing::warn!(error = %e, id = %rp.id, "read point failed; tearing down");
            if let Err(t) = cleanup::teardown(client, &rp, Outcome::Failed, req.timeout).await {
                tracing::warn!(error = %t, "teardown after a failed read point");
            }
            Err(e)
        }
    }
}

/// Check everything and name everything; creates nothing.
async fn plan(client: &Client, req: &ReadPointRequest) -> Result<ReadPoint> {
    if req.disks.is_empty() {
        return Err(QmpError::Invalid(
            "a read point needs at least one disk".into(),
        ));
    }
    if let Some(b) = &req.new_bitmap {
        check_name("bitmap", b)?;
    }
    if !req.work_dir.is_absolute() {
        return Err(QmpError::Invalid(format!(
            "work_dir {} must be absolute",
            req.work_dir.display()
        )));
    }
    std::fs::create_dir_all(&req.work_dir)
        .map_err(|e| QmpError::io(format!("creating {}", req.work_dir.display()), e))?;
    let nodes = list_nodes(client).await?;
    let id = format!("{RP_PREFIX}{}", token());
    let nbd_socket = match &req.nbd {
        NbdServer::Own => req.work_dir.join(NBD_SOCKET),
        NbdServer::Existing(p) => p.clone(),
    };
    let mut disks = Vec::new();
    for (i, d) in req.disks.iter().enumerate() {
        let node = super::nodes::resolve(&nodes, &d.disk)?;
        if disks
            .iter()
            .any(|x: &ReadPointDisk| x.node == node.node_name)
        {
            return Err(QmpError::Invalid(format!(
                "disk {} is listed twice",
                d.disk
            )));
        }
        if let Some(b) = req
            .new_bitmap
            .as_deref()
            .filter(|b| node.bitmap(b).is_some())
        {
            return Err(QmpError::Invalid(format!(
                "bitmap {b} already exists on node {}; a read point did not finish: run clean_leftovers",
                node.node_name
            )));
        }
        let (exported_bitmap, bitmap_note) =
            usable_previous(node, d.previous_bitmap.as_deref(), req);
        let export = format!("{id}-e{i}");
        disks.push(ReadPointDisk {
            disk: d.disk.clone(),
            node: node.node_name.clone(),
            size: node.virtual_size,
            fleece_node: format!("{id}-f{i}"),
            fleece_file: req.work_dir.join(format!("{id}-f{i}.qcow2")),
            job_id: format!("{id}-b{i}"),
            uri: format!("nbd+unix:///{export}?socket={}", nbd_socket.display()),
            export,
            previous_bitmap: d.previous_bitmap.clone(),
            exported_bitmap,
            bitmap_note,
            new_bitmap_added: false,
            previous_disabled: false,
        });
    }
    Ok(ReadPoint {
        id,
        work_dir: req.work_dir.clone(),
        nbd_socket,
        owns_nbd_server: false,
        new_bitmap: req.new_bitmap.clone(),
        quiesced: false,
        disks,
    })
}

/// Whether the previous checkpoint can serve as the delta of this backup.
fn usable_previous(
    node: &BlockNode,
    prev: Option<&str>,
    req: &ReadPointRequest,
) -> (Option<String>, Option<String>) {
    let Some(prev) = prev else {
        return (
            None,
            Some("no previous checkpoint: read all allocated extents".into()),
        );
    };
    let why = match node.bitmap(prev) {
        None => "does not exist on the node",
        Some(b) if b.inconsistent => "is inconsistent (QEMU did not save it cleanly)",
        Some(b) if !b.recording => "is not recording (frozen by an unfinished read point?)",
        Some(b) if b.busy => "is in use by another operation",
        Some(b) if !b.persistent => "is not persistent",
        Some(_) if req.new_bitmap.as_deref() == Some(prev) => "has the same name as the new bitmap",
        Some(_) => return (Some(prev.to_string()), None),
    };
    (
        None,
        Some(format!(
            "previous bitmap {prev} {why}: read all allocated extents"
        )),
    )
}

async fn build(
    client: &Client,
    req: &ReadPointRequest,
    rp: &mut ReadPoint,
    quiesce: Option<&Agent>,
) -> Result<()> {
    for (i, d) in rp.disks.iter().enumerate() {
        create_fleecing_image(client, &rp.id, i, d, req.timeout).await?;
    }
    let mut actions = Vec::new();
    for d in &rp.disks {
        actions.push(action(
            "blockdev-backup",
            json!({ "job-id": d.job_id, "device": d.node, "target": d.fleece_node,
                    "sync": "none", "auto-dismiss": false }),
        ));
        if let Some(prev) = &d.exported_bitmap {
            actions.push(action(
                "block-dirty-bitmap-disable",
                json!({ "node": d.node, "name": prev }),
            ));
        }
        if let Some(new) = &rp.new_bitmap {
            actions.push(action(
                "block-dirty-bitmap-add",
                json!({ "node": d.node, "name": new, "persistent": true }),
            ));
        }
    }
    if let Some(agent) = quiesce {
        match agent.frozen(transaction(client, actions)).await {
            Frozen::NoAgent(e) | Frozen::FreezeFailed { error: e, .. } => return Err(e),
            Frozen::Ran { result, thaw } => {
                result?;
                thaw?;
            }
        }
        rp.quiesced = true;
    } else {
        transaction(client, actions).await?;
    }
    for d in &mut rp.disks {
        d.new_bitmap_added = rp.new_bitmap.is_some();
        d.previous_disabled = d.exported_bitmap.is_some();
    }
    rp.owns_nbd_server = ensure_nbd_server(client, &req.nbd, &rp.nbd_socket).await?;
    for d in &rp.disks {
        let mut args = json!({ "type": "nbd", "id": d.export, "node-name": d.fleece_node,
                               "name": d.export, "writable": false });
        if let Some(b) = &d.exported_bitmap {
            args["bitmaps"] = json!([b]);
        }
        client.execute("block-export-add", args).await?;
    }
    Ok(())
}

/// The fleecing qcow2, created by QEMU (so it works whatever user QEMU runs as), opened with
/// the live node as its backing.
async fn create_fleecing_image(
    client: &Client,
    id: &str,
    i: usize,
    d: &ReadPointDisk,
    limit: Duration,
) -> Result<()> {
    let file = path_str(&d.fleece_file)?;
    let job = format!("{id}-c{i}");
    let temp = format!("{id}-t{i}");
    let create = |options: Value| json!({ "job-id": job, "options": options });
    client
        .execute(
            "blockdev-create",
            create(json!({ "driver": "file", "filename": file, "size": 0 })),
        )
        .await?;
    client.wait_job(&job, limit).await?;
    client
        .execute(
            "blockdev-add",
            json!({ "driver": "file", "filename": file, "node-name": temp }),
        )
        .await?;
    client
        .execute(
            "blockdev-create",
            create(json!({ "driver": "qcow2", "file": temp, "size": d.size })),
        )
        .await?;
    let made = client.wait_job(&job, limit).await;
    client
        .execute("blockdev-del", json!({ "node-name": temp }))
        .await?;
    made?;
    let args = json!({ "driver": "qcow2", "node-name": d.fleece_node,
                       "file": { "driver": "file", "filename": file }, "backing": d.node });
    client.execute("blockdev-add", args).await.map(drop)
}

/// Start QEMU's NBD server on `socket` for [`NbdServer::Own`]; returns whether holdfast owns it.
/// A server already running is reused only if it listens on our socket (a QEMU has one NBD
/// server, and our work directory belongs to this QEMU).
async fn ensure_nbd_server(client: &Client, nbd: &NbdServer, socket: &Path) -> Result<bool> {
    if let NbdServer::Existing(_) = nbd {
        return Ok(false);
    }
    let args = json!({ "addr": { "type": "unix", "data": { "path": path_str(socket)? } } });
    match client.execute("nbd-server-start", args).await {
        Ok(_) => Ok(true),
        Err(e) if e.to_string().contains("already running") => {
            if listening(socket).await {
                Ok(true)
            } else {
                Err(QmpError::Invalid(format!(
                    "QEMU already runs an NBD server that holdfast did not start (nothing listens on {}); \
                     give holdfast its unix socket (nbd_socket in the VM's config: `holdfast vm add --nbd-socket PATH`) \
                     or stop it with nbd-server-stop",
                    socket.display()
                )))
            }
        }
        Err(e) => Err(e),
    }
}
