//! Teardown of a read point, and leftovers of a killed holdfast.
//!
//! Objects go in dependency order, each only if it still exists:
//! 1. exports: `block-export-del {id, mode: hard}` (drops connected clients), then wait until
//!    `query-block-exports` no longer lists them;
//! 2. jobs: `job-cancel` (unless concluded), wait for `concluded`, `job-dismiss`;
//! 3. nodes: `blockdev-del` (fleecing nodes and temporary protocol nodes);
//! 4. fleecing files in the work directory: unlink;
//! 5. bitmaps — committed: `block-dirty-bitmap-remove <previous>`, the new one stays the
//!    checkpoint. Failed: one `transaction` of `block-dirty-bitmap-merge {target: <previous>,
//!    bitmaps: [<new>]}`, `block-dirty-bitmap-enable <previous>`,
//!    `block-dirty-bitmap-remove <new>`: the previous checkpoint gets back the writes it missed
//!    while frozen, so the next incremental against it stays correct;
//! 6. holdfast's own NBD server: `nbd-server-stop` once `query-block-exports` is empty.
//!
//! Invariants: every step runs even when an earlier one failed; the failures are returned
//! together as `QmpError::Teardown`. Running teardown twice is harmless.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::bitmaps::{action, transaction};
use super::model::{listening, Outcome, ReadPoint, NBD_SOCKET, RP_PREFIX};
use super::nodes::{bad, list_nodes};
use super::PREFIX;
use crate::qmp::{Client, QmpError, Result};

/// What holdfast left in QEMU and in its work directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub exports: Vec<String>,
    pub jobs: Vec<String>,
    pub nodes: Vec<String>,
    pub files: Vec<PathBuf>,
    /// (node, bitmap): holdfast bitmaps other than the committed checkpoint.
    pub stray_bitmaps: Vec<(String, String)>,
    /// Nodes whose committed checkpoint is frozen (disabled) by an unfinished read point.
    pub frozen_checkpoints: Vec<String>,
    /// (node, bitmap): holdfast bitmaps QEMU marks inconsistent (it did not save them cleanly,
    /// e.g. after a crash): they cannot be trusted, merged or enabled, only removed.
    pub broken_bitmaps: Vec<(String, String)>,
    /// holdfast's NBD server socket, when a server listens on it.
    pub nbd_server: Option<PathBuf>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        *self == Leftovers::default()
    }
}

/// Tear down a read point (see the module docs). Idempotent; tolerates parts already gone.
pub async fn teardown(
    client: &Client,
    rp: &ReadPoint,
    outcome: Outcome,
    limit: Duration,
) -> Result<()> {
    let mut errors = Vec::new();
    let found = find_objects(client, &rp.object_prefix(), &rp.work_dir).await?;
    remove_objects(client, &found, limit, &mut errors).await;
    if let Err(e) = settle_bitmaps(client, rp, outcome).await {
        errors.push(format!("bitmaps: {e}"));
    }
    if rp.owns_nbd_server {
        if let Err(e) = stop_nbd_server_if_idle(client, &rp.nbd_socket).await {
            errors.push(format!("NBD server: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(QmpError::Teardown(errors))
    }
}

async fn settle_bitmaps(client: &Client, rp: &ReadPoint, outcome: Outcome) -> Result<()> {
    let nodes = list_nodes(client).await?;
    let mut actions = Vec::new();
    for d in &rp.disks {
        let Some(node) = nodes.iter().find(|n| n.node_name == d.node) else {
            continue;
        };
        let new = rp
            .new_bitmap
            .as_deref()
            .filter(|b| d.new_bitmap_added && node.bitmap(b).is_some());
        let old = d
            .previous_bitmap
            .as_deref()
            .filter(|b| node.bitmap(b).is_some() && Some(*b) != new);
        let arg = |name: &str| json!({ "node": d.node, "name": name });
        match (outcome, new, old) {
            (Outcome::Committed, _, Some(old)) if d.new_bitmap_added => {
                actions.push(action("block-dirty-bitmap-remove", arg(old)));
            }
            (Outcome::Failed, Some(new), Some(old)) if d.previous_disabled => {
                let merge = json!({ "node": d.node, "target": old, "bitmaps": [new] });
                actions.push(action("block-dirty-bitmap-merge", merge));
                actions.push(action("block-dirty-bitmap-enable", arg(old)));
                actions.push(action("block-dirty-bitmap-remove", arg(new)));
            }
            (Outcome::Failed, Some(new), _) => {
                actions.push(action("block-dirty-bitmap-remove", arg(new)));
            }
            // Frozen with nothing recording after it: the writes since are in no bitmap.
            (_, None, Some(old))
                if d.previous_disabled
                    && !d.new_bitmap_added
                    && node.bitmap(old).is_some_and(|b| !b.recording) =>
            {
                actions.push(action("block-dirty-bitmap-remove", arg(old)));
            }
            _ => {}
        }
    }
    transaction(client, actions).await
}

/// List what holdfast left: exports and jobs named `holdfast-…`, read-point nodes
/// (`holdfast-rp…`) and fleecing files in `work_dir`, holdfast bitmaps other than
/// `keep_bitmap` (on `nodes`, or on every node), and holdfast's NBD server.
pub async fn find_leftovers(
    client: &Client,
    work_dir: &Path,
    keep_bitmap: Option<&str>,
    nodes: Option<&[String]>,
) -> Result<Leftovers> {
    let mut found = find_objects(client, PREFIX, work_dir).await?;
    found.nodes.retain(|n| n.starts_with(RP_PREFIX));
    found.files.retain(|f| file_name_starts(f, RP_PREFIX));
    for node in list_nodes(client).await? {
        if nodes.is_some_and(|scope| !scope.contains(&node.node_name)) {
            continue;
        }
        for b in &node.bitmaps {
            if b.inconsistent && b.name.starts_with(PREFIX) {
                found
                    .broken_bitmaps
                    .push((node.node_name.clone(), b.name.clone()));
            } else if Some(b.name.as_str()) == keep_bitmap {
                if !b.recording {
                    found.frozen_checkpoints.push(node.node_name.clone());
                }
            } else if b.name.starts_with(PREFIX) {
                found
                    .stray_bitmaps
                    .push((node.node_name.clone(), b.name.clone()));
            }
        }
    }
    let socket = work_dir.join(NBD_SOCKET);
    if listening(&socket).await {
        found.nbd_server = Some(socket);
    }
    found.exports.sort();
    found.jobs.sort();
    found.nodes.sort();
    found.stray_bitmaps.sort();
    found.frozen_checkpoints.sort();
    found.broken_bitmaps.sort();
    Ok(found)
}

/// Remove what [`find_leftovers`] finds. A frozen committed checkpoint gets every stray
/// holdfast bitmap of its node merged in and is re-enabled (a superset of the writes it missed
/// is safe; a subset is not); with no stray to merge, the writes it missed are in no bitmap,
/// so it is removed (the next backup reads everything). Inconsistent holdfast bitmaps are
/// removed. Returns what was found.
pub async fn clean_leftovers(
    client: &Client,
    work_dir: &Path,
    keep_bitmap: Option<&str>,
    nodes: Option<&[String]>,
    limit: Duration,
) -> Result<Leftovers> {
    let found = find_leftovers(client, work_dir, keep_bitmap, nodes).await?;
    let mut errors = Vec::new();
    remove_objects(client, &found, limit, &mut errors).await;
    let mut actions = Vec::new();
    let mut touched: Vec<&str> = found
        .stray_bitmaps
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    touched.extend(found.frozen_checkpoints.iter().map(String::as_str));
    for (node, b) in &found.broken_bitmaps {
        actions.push(action(
            "block-dirty-bitmap-remove",
            json!({ "node": node, "name": b }),
        ));
    }
    touched.sort_unstable();
    touched.dedup();
    for node in touched {
        let strays: Vec<&str> = found
            .stray_bitmaps
            .iter()
            .filter(|(n, _)| n == node)
            .map(|(_, b)| b.as_str())
            .collect();
        if let (Some(keep), true) = (
            keep_bitmap,
            found.frozen_checkpoints.iter().any(|n| n == node),
        ) {
            if strays.is_empty() {
                actions.push(action(
                    "block-dirty-bitmap-remove",
                    json!({ "node": node, "name": keep }),
                ));
            } else {
                let merge = json!({ "node": node, "target": keep, "bitmaps": strays });
                actions.push(action("block-dirty-bitmap-merge", merge));
                actions.push(action(
                    "block-dirty-bitmap-enable",
                    json!({ "node": node, "name": keep }),
                ));
            }
        }
        for b in strays {
            actions.push(action(
                "block-dirty-bitmap-remove",
                json!({ "node": node, "name": b }),
            ));
        }
    }
    if let Err(e) = transaction(client, actions).await {
        errors.push(format!("bitmaps: {e}"));
    }
    let socket = work_dir.join(NBD_SOCKET);
    if let Err(e) = stop_nbd_server_if_idle(client, &socket).await {
        errors.push(format!("NBD server: {e}"));
    }
    if errors.is_empty() {
        Ok(found)
    } else {
        Err(QmpError::Teardown(errors))
    }
}

/// Exports and jobs whose id, and nodes whose name, start with `prefix`; files in `dir` whose
/// name does.
async fn find_objects(client: &Client, prefix: &str, dir: &Path) -> Result<Leftovers> {
    let mut found = Leftovers {
        exports: exports(client)
            .await?
            .into_iter()
            .filter(|e| e.starts_with(prefix))
            .collect(),
        ..Leftovers::default()
    };
    for j in client.query_jobs().await? {
        if j.id.starts_with(prefix) {
            found.jobs.push(j.id);
        }
    }
    for n in list_nodes(client).await? {
        if n.node_name.starts_with(prefix) {
            found.nodes.push(n.node_name);
        }
    }
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let p = e.path();
                if file_name_starts(&p, prefix) && p.extension().is_some_and(|x| x == "qcow2") {
                    found.files.push(p);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(QmpError::io(format!("listing {}", dir.display()), e)),
    }
    found.files.sort();
    Ok(found)
}

fn file_name_starts(p: &Path, prefix: &str) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

/// Steps 1–4 of the module docs for `found`; failures go to `errors`.
async fn remove_objects(
    client: &Client,
    found: &Leftovers,
    limit: Duration,
    errors: &mut Vec<String>,
) {
    for id in &found.exports {
        let args = json!({ "id": id, "mode": "hard" });
        if let Err(e) = client.execute("block-export-del", args).await {
            if !super::is_not_found(&e) {
                errors.push(format!("export {id}: {e}"));
            }
        }
    }
    if let Err(e) = wait_exports_gone(client, &found.exports, limit).await {
        errors.push(e.to_string());
    }
    for id in &found.jobs {
        if let Err(e) = client.cancel_job(id, limit).await {
            errors.push(format!("job {id}: {e}"));
        }
    }
    for node in &found.nodes {
        if let Err(e) = client
            .execute("blockdev-del", json!({ "node-name": node }))
            .await
        {
            if !super::is_not_found(&e) {
                errors.push(format!("node {node}: {e}"));
            }
        }
    }
    for f in &found.files {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("file {}: {e}", f.display())),
        }
    }
}

/// Ids from `query-block-exports`.
async fn exports(client: &Client) -> Result<Vec<String>> {
    let v = client.execute("query-block-exports", Value::Null).await?;
    let arr = v
        .as_array()
        .ok_or_else(|| bad("query-block-exports", "not an array"))?;
    Ok(arr
        .iter()
        .filter_map(|e| e.get("id").and_then(Value::as_str).map(String::from))
        .collect())
}

/// Export deletion finishes asynchronously (`BLOCK_EXPORT_DELETED`); wait for it.
async fn wait_exports_gone(client: &Client, ids: &[String], limit: Duration) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + limit;
    loop {
        let mark = client.event_mark();
        let left: Vec<String> = exports(client)
            .await?
            .into_iter()
            .filter(|e| ids.contains(e))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(QmpError::Timeout {
                what: format!("deletion of exports {}", left.join(", ")),
                timeout: limit,
            });
        }
        client
            .wait_any_event(mark, (deadline - now).min(Duration::from_millis(200)))
            .await;
    }
}

/// `nbd-server-stop` when holdfast's server listens on `socket` and no export is left.
async fn stop_nbd_server_if_idle(client: &Client, socket: &Path) -> Result<()> {
    if !listening(socket).await {
        return remove_stale(socket);
    }
    if !exports(client).await?.is_empty() {
        return Ok(()); // still serving someone: leave it
    }
    if let Err(e) = client.execute("nbd-server-stop", Value::Null).await {
        if !e.to_string().contains("not running") {
            return Err(e);
        }
    }
    remove_stale(socket)
}

fn remove_stale(socket: &Path) -> Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(QmpError::io(format!("removing {}", socket.display()), e)),
    }
}
