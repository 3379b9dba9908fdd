//! User snapshots: internal (qcow2) snapshots and external overlays.
//!
//! Internal, with memory: `snapshot-save {job-id, tag, vmstate, devices}` (the VM is paused
//! while its RAM is written, then resumes as it was), `snapshot-load` (the VM is stopped, disks
//! and RAM are restored, and QEMU resumes it only if it was running *before the load*),
//! `snapshot-delete {job-id, tag, devices}`. Internal, disk-only: one `transaction` of
//! `blockdev-snapshot-internal-sync {device, name}` per disk (crash-consistent across disks);
//! QEMU cannot revert a disk-only snapshot of a running VM (it says "Revert to it offline using
//! qemu-img"), so `load_internal_snapshot` refuses it before touching the VM.
//!
//! External overlay (raw disks, or when internal snapshots are unwanted): one `transaction` of
//! `blockdev-snapshot-sync {node-name, snapshot-file, snapshot-node-name, format: qcow2,
//! mode: absolute-paths}`; QEMU creates the overlay file (backing file recorded in its header)
//! and the guest writes go to it. Removing the snapshot keeps the data: `block-commit
//! {device: overlay, base-node: base}` → `ready` → `job-complete` (pivot back to the base),
//! then the overlay file is deleted.
//!
//! QEMU has no snapshot rename: a tag is fixed at creation. holdfast names tags
//! `holdfast-<id>` and keeps the user's name → tag mapping in its catalog (see `docs/qemu.md`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::bitmaps::{action, transaction};
use super::model::path_str;
use super::nodes::{bad, find_disk, list_nodes, InternalSnapshot};
use super::{check_name, token, PREFIX};
use crate::qmp::{Client, QmpError, Result};

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    pub running: bool,
    /// running, paused, prelaunch, restore-vm, …
    pub status: String,
}

/// `query-status`.
pub async fn run_state(client: &Client) -> Result<RunState> {
    let v = client.execute("query-status", Value::Null).await?;
    Ok(RunState {
        running: v
            .get("running")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("query-status", "no running"))?,
        status: v
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    })
}

/// Internal snapshots of a disk (`query-named-block-nodes` → `image.snapshots`).
pub async fn list_internal_snapshots(client: &Client, disk: &str) -> Result<Vec<InternalSnapshot>> {
    Ok(find_disk(client, disk).await?.snapshots)
}

/// Take internal snapshot `tag` of `devices` (node names of qcow2 disks). With `vmstate`
/// (a qcow2 node, added to `devices` if missing) the VM's RAM and device state are saved too
/// (`snapshot-save` job, qemu-system only); without, a disk-only group snapshot in one
/// `transaction` of `blockdev-snapshot-internal-sync`.
pub async fn save_internal_snapshot(
    client: &Client,
    tag: &str,
    devices: &[String],
    vmstate: Option<&str>,
    limit: Duration,
) -> Result<()> {
    check_name("snapshot tag", tag)?;
    if devices.is_empty() {
        return Err(QmpError::Invalid(
            "a snapshot needs at least one disk".into(),
        ));
    }
    let Some(vmstate) = vmstate else {
        let actions = devices
            .iter()
            .map(|d| {
                action(
                    "blockdev-snapshot-internal-sync",
                    json!({ "device": d, "name": tag }),
                )
            })
            .collect();
        return transaction(client, actions).await;
    };
    let mut all = devices.to_vec();
    if !all.iter().any(|d| d == vmstate) {
        all.push(vmstate.to_string());
    }
    let job = format!("{PREFIX}sj{}", token());
    let args = json!({ "job-id": job, "tag": tag, "vmstate": vmstate, "devices": all });
    client.execute("snapshot-save", args).await?;
    client.wait_job(&job, limit).await.map(drop)
}

/// Revert to internal snapshot `tag` with memory state (`snapshot-load` job). QEMU stops the
/// VM, restores disks and RAM, and restarts it only if it was running before; with `resume`
/// holdfast sends `cont` when it is not running afterwards. A disk-only snapshot is refused
/// before the VM is touched. Returns the run state after the revert.
pub async fn load_internal_snapshot(
    client: &Client,
    tag: &str,
    devices: &[String],
    vmstate: &str,
    resume: bool,
    limit: Duration,
) -> Result<RunState> {
    let nodes = list_nodes(client).await?;
    let mut all = devices.to_vec();
    if !all.iter().any(|d| d == vmstate) {
        all.push(vmstate.to_string());
    }
    for d in &all {
        let node = nodes
            .iter()
            .find(|n| &n.node_name == d)
            .ok_or_else(|| QmpError::NotFound(format!("node {d}")))?;
        let snap = node
            .snapshots
            .iter()
            .find(|s| s.tag == tag)
            .ok_or_else(|| QmpError::NotFound(format!("snapshot {tag} on node {d}")))?;
        if d == vmstate && snap.vm_state_size == 0 {
            return Err(QmpError::Invalid(format!(
                "snapshot {tag} on {d} is disk-only (no memory state): QEMU cannot revert it while \
                 the VM runs; shut the VM down and run `qemu-img snapshot -a {tag} {}`",
                node.file
            )));
        }
    }
    let job = format!("{PREFIX}sj{}", token());
    let args = json!({ "job-id": job, "tag": tag, "vmstate": vmstate, "devices": all });
    client.execute("snapshot-load", args).await?;
    client.wait_job(&job, limit).await?;
    let state = run_state(client).await?;
    if resume && !state.running {
        client.execute("cont", Value::Null).await?;
        return run_state(client).await;
    }
    Ok(state)
}

/// Delete internal snapshot `tag` from every node of `devices` that has it: the
/// `snapshot-delete` job, or (qemu-storage-daemon has no snapshot jobs) a
/// `blockdev-snapshot-delete-internal-sync` per node. Deleting what is gone is not an error.
pub async fn delete_internal_snapshot(
    client: &Client,
    tag: &str,
    devices: &[String],
    limit: Duration,
) -> Result<()> {
    let nodes = list_nodes(client).await?;
    let having: Vec<&String> = devices
        .iter()
        .filter(|d| {
            nodes
                .iter()
                .any(|n| &n.node_name == *d && n.snapshots.iter().any(|s| s.tag == tag))
        })
        .collect();
    if having.is_empty() {
        return Ok(());
    }
    let job = format!("{PREFIX}sj{}", token());
    let args = json!({ "job-id": job, "tag": tag, "devices": having });
    match client.execute("snapshot-delete", args).await {
        Ok(_) => client.wait_job(&job, limit).await.map(drop),
        Err(e) if e.class() == Some("CommandNotFound") => {
            for d in having {
                let args = json!({ "device": d, "name": tag });
                client
                    .execute("blockdev-snapshot-delete-internal-sync", args)
                    .await?;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// One disk of an external snapshot.
#[derive(Debug, Clone)]
pub struct OverlayRequest {
    /// Node name of the disk's active (top) node.
    pub node: String,
    /// Absolute path of the overlay file to create; must not exist.
    pub file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// The node that was active before (the overlay's backing).
    pub base: String,
    pub overlay_node: String,
    pub file: PathBuf,
}

/// External snapshot of several disks in one `transaction` of `blockdev-snapshot-sync`.
pub async fn create_overlays(client: &Client, reqs: &[OverlayRequest]) -> Result<Vec<Overlay>> {
    let tok = token();
    let mut out = Vec::new();
    let mut actions = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        if !r.file.is_absolute() || r.file.exists() {
            return Err(QmpError::Invalid(format!(
                "overlay file {} must be an absolute path that does not exist yet",
                r.file.display()
            )));
        }
        let ov = Overlay {
            base: r.node.clone(),
            overlay_node: format!("{PREFIX}ov{tok}-{i}"),
            file: r.file.clone(),
        };
        actions.push(action(
            "blockdev-snapshot-sync",
            json!({ "node-name": ov.base, "snapshot-file": path_str(&ov.file)?,
                    "snapshot-node-name": ov.overlay_node, "format": "qcow2",
                    "mode": "absolute-paths" }),
        ));
        out.push(ov);
    }
    transaction(client, actions).await?;
    Ok(out)
}

/// Remove an external snapshot keeping the data: commit the overlay into its base (an active
/// commit: wait for `ready`, then `job-complete` pivots the disk back to the base), then delete
/// the overlay file. Done already (overlay node gone) is fine.
pub async fn commit_overlay(client: &Client, ov: &Overlay, limit: Duration) -> Result<()> {
    check_name("overlay node", &ov.overlay_node)?;
    let nodes = list_nodes(client).await?;
    let exists = nodes.iter().any(|n| n.node_name == ov.overlay_node);
    if !exists {
        // Never unlink a file holdfast did not just commit: the VM may have been restarted on
        // the overlay under another node name, or on the base with the overlay's data unmerged.
        let file = path_str(&ov.file)?;
        if let Some(n) = nodes
            .iter()
            .find(|n| n.file == file || n.backing_file.as_deref() == Some(file))
        {
            return Err(QmpError::Invalid(format!(
                "overlay {file} is in use by node {} (the VM was restarted on it?); holdfast does not know how to merge it back here: shut the VM down and run `qemu-img commit {file}`",
                n.node_name
            )));
        }
        if ov.file.exists() {
            return Err(QmpError::Invalid(format!(
                "overlay node {} is gone from QEMU but {file} still exists: its data may not be in the base; shut the VM down and run `qemu-img commit {file}` (or delete it if it is not needed)",
                ov.overlay_node
            )));
        }
        return Ok(());
    }
    {
        let job = format!("{PREFIX}cj{}", token());
        let args = json!({ "job-id": job, "device": ov.overlay_node, "base-node": ov.base,
                           "auto-dismiss": false });
        client.execute("block-commit", args).await?;
        match client.wait_job_status(&job, &["ready"], limit).await? {
            Some(j) if j.status == "ready" => {
                client.complete_job(&job, limit).await?;
            }
            _ => {
                client.wait_job(&job, limit).await?;
            }
        }
    }
    match std::fs::remove_file(&ov.file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(QmpError::io(
            format!("removing overlay {}", ov.file.display()),
            e,
        )),
    }
}
