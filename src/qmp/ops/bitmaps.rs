//! Dirty bitmaps: the changed-block tracking behind incrementals.
//!
//! A checkpoint bitmap is persistent (saved in the qcow2 file on close) and records every write
//! since the read point that created it. Rotation freezes the previous one and starts the next
//! in one `transaction`, so no write falls between them.

use serde_json::{json, Value};

use crate::qmp::{Client, Result};

/// `block-dirty-bitmap-add {node, name, persistent, granularity?}`.
pub async fn add_bitmap(
    client: &Client,
    node: &str,
    name: &str,
    persistent: bool,
    granularity: Option<u32>,
) -> Result<()> {
    let mut args = json!({ "node": node, "name": name, "persistent": persistent });
    if let Some(g) = granularity {
        args["granularity"] = json!(g);
    }
    client
        .execute("block-dirty-bitmap-add", args)
        .await
        .map(drop)
}

/// `block-dirty-bitmap-remove {node, name}` (also deletes a persistent bitmap from the image).
pub async fn remove_bitmap(client: &Client, node: &str, name: &str) -> Result<()> {
    let args = json!({ "node": node, "name": name });
    client
        .execute("block-dirty-bitmap-remove", args)
        .await
        .map(drop)
}

/// `block-dirty-bitmap-disable {node, name}`: stop recording (needed before a read-only export).
pub async fn disable_bitmap(client: &Client, node: &str, name: &str) -> Result<()> {
    let args = json!({ "node": node, "name": name });
    client
        .execute("block-dirty-bitmap-disable", args)
        .await
        .map(drop)
}

/// `block-dirty-bitmap-enable {node, name}`.
pub async fn enable_bitmap(client: &Client, node: &str, name: &str) -> Result<()> {
    let args = json!({ "node": node, "name": name });
    client
        .execute("block-dirty-bitmap-enable", args)
        .await
        .map(drop)
}

/// `block-dirty-bitmap-merge {node, target, bitmaps}`: target |= each source.
pub async fn merge_bitmaps(
    client: &Client,
    node: &str,
    target: &str,
    sources: &[&str],
) -> Result<()> {
    let args = json!({ "node": node, "target": target, "bitmaps": sources });
    client
        .execute("block-dirty-bitmap-merge", args)
        .await
        .map(drop)
}

/// Checkpoint rotation as one `transaction`: `block-dirty-bitmap-disable` the previous
/// checkpoint (if any) and `block-dirty-bitmap-add` the new one, persistent.
pub async fn rotate_checkpoint(
    client: &Client,
    node: &str,
    previous: Option<&str>,
    new: &str,
) -> Result<()> {
    let mut actions = Vec::new();
    if let Some(old) = previous {
        actions.push(action(
            "block-dirty-bitmap-disable",
            json!({ "node": node, "name": old }),
        ));
    }
    actions.push(action(
        "block-dirty-bitmap-add",
        json!({ "node": node, "name": new, "persistent": true }),
    ));
    transaction(client, actions).await
}

/// One `transaction` action.
pub(super) fn action(kind: &str, data: Value) -> Value {
    json!({ "type": kind, "data": data })
}

/// `transaction {actions}`: all or nothing.
pub(super) async fn transaction(client: &Client, actions: Vec<Value>) -> Result<()> {
    if actions.is_empty() {
        return Ok(());
    }
    client
        .execute("transaction", json!({ "actions": actions }))
        .await
        .map(drop)
}
