//! Node discovery: `query-named-block-nodes` (flat) for every named node with its image,
//! bitmaps and internal snapshots; `query-block` to map a device (BlockBackend name or qdev id)
//! to the node attached to it.
//!
//! Parsing is tolerant of fields QEMU omits (e.g. `dirty-bitmaps` when a node has none) and
//! strict about the ones holdfast needs (`node-name`, `drv`, `image.virtual-size`).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::qmp::{Client, QmpError, Result};

/// A dirty bitmap on a node (`query-named-block-nodes` → `dirty-bitmaps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    pub name: String,
    pub persistent: bool,
    /// Recording writes (enabled).
    pub recording: bool,
    /// Held by an operation (e.g. an NBD export); cannot be changed or removed meanwhile.
    pub busy: bool,
    /// Not saved cleanly (QEMU crashed): must not be trusted for an incremental.
    pub inconsistent: bool,
    pub granularity: u64,
    /// Dirty bytes.
    pub count: u64,
}

/// An internal snapshot (`image.snapshots`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalSnapshot {
    pub id: String,
    pub tag: String,
    /// Bytes of saved VM state; 0 for a disk-only snapshot.
    pub vm_state_size: u64,
    pub date_sec: i64,
    pub date_nsec: u32,
    /// Guest clock at the snapshot, nanoseconds.
    pub vm_clock_ns: u64,
}

/// One named block node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockNode {
    pub node_name: String,
    /// Driver: qcow2, raw, file, copy-before-write, …
    pub driver: String,
    /// The node's file name (for a format node, its image file).
    pub file: String,
    pub virtual_size: u64,
    pub read_only: bool,
    pub backing_file: Option<String>,
    pub bitmaps: Vec<Bitmap>,
    pub snapshots: Vec<InternalSnapshot>,
    /// Attached to a device or backend: (BlockBackend name, qdev path), from `query-block`.
    pub device: Option<(String, String)>,
}

impl BlockNode {
    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// All named nodes (`query-named-block-nodes {flat: true}`), with their attachment from
/// `query-block`. Auto-named nodes (`#block…`) are left out.
pub async fn list_nodes(client: &Client) -> Result<Vec<BlockNode>> {
    let v = client
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await?;
    let arr = v
        .as_array()
        .ok_or_else(|| bad("query-named-block-nodes", "not an array"))?;
    let mut nodes = Vec::with_capacity(arr.len());
    for n in arr {
        let node = parse_node(n).ok_or_else(|| {
            bad(
                "query-named-block-nodes",
                "node without node-name/drv/image",
            )
        })?;
        if !node.node_name.starts_with('#') {
            nodes.push(node);
        }
    }
    for (backend, qdev, node) in query_block(client).await? {
        if let Some(n) = nodes.iter_mut().find(|n| n.node_name == node) {
            n.device = Some((backend, qdev));
        }
    }
    Ok(nodes)
}

/// Find a disk by node name, BlockBackend name (`-drive id=`) or qdev id (`-device …,id=`).
/// The node found is the one attached to the device; it must be the format node for bitmaps
/// and snapshots to work, so configure disks by node name where filters sit on top.
pub async fn find_disk(client: &Client, name: &str) -> Result<BlockNode> {
    let nodes = list_nodes(client).await?;
    resolve(&nodes, name).cloned()
}

/// [`find_disk`] over an already listed set of nodes.
pub(super) fn resolve<'a>(nodes: &'a [BlockNode], name: &str) -> Result<&'a BlockNode> {
    if let Some(n) = nodes.iter().find(|n| n.node_name == name) {
        return Ok(n);
    }
    let attached = nodes.iter().find(|n| {
        n.device.as_ref().is_some_and(|(backend, qdev)| {
            (!backend.is_empty() && backend == name) || qdev == name || qdev_id(qdev) == Some(name)
        })
    });
    attached.ok_or_else(|| {
        QmpError::NotFound(format!(
            "disk {name:?} (no node, drive or device of that name; named nodes: {})",
            nodes
                .iter()
                .map(|n| n.node_name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// `/machine/peripheral/ID/virtio-backend` → `ID`.
fn qdev_id(qdev: &str) -> Option<&str> {
    qdev.strip_prefix("/machine/peripheral/")?.split('/').next()
}

/// (BlockBackend name, qdev, attached node name) from `query-block`.
async fn query_block(client: &Client) -> Result<Vec<(String, String, String)>> {
    let v = client.execute("query-block", Value::Null).await?;
    let arr = v
        .as_array()
        .ok_or_else(|| bad("query-block", "not an array"))?;
    Ok(arr
        .iter()
        .filter_map(|b| {
            let node = b.get("inserted")?.get("node-name")?.as_str()?;
            let s = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            Some((s("device"), s("qdev"), node.to_string()))
        })
        .collect())
}

fn parse_node(n: &Value) -> Option<BlockNode> {
    let image = n.get("image")?;
    let bitmaps = n
        .get("dirty-bitmaps")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(parse_bitmap).collect())
        .unwrap_or_default();
    let snapshots = image
        .get("snapshots")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(parse_snapshot).collect())
        .unwrap_or_default();
    Some(BlockNode {
        node_name: n.get("node-name")?.as_str()?.to_string(),
        driver: n.get("drv")?.as_str()?.to_string(),
        file: n
            .get("file")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        virtual_size: image.get("virtual-size")?.as_u64()?,
        read_only: n.get("ro").and_then(Value::as_bool).unwrap_or(false),
        backing_file: n
            .get("backing_file")
            .and_then(Value::as_str)
            .map(String::from),
        bitmaps,
        snapshots,
        device: None,
    })
}

fn parse_bitmap(b: &Value) -> Option<Bitmap> {
    let flag = |k: &str| b.get(k).and_then(Value::as_bool).unwrap_or(false);
    Some(Bitmap {
        name: b.get("name")?.as_str()?.to_string(),
        persistent: flag("persistent"),
        recording: flag("recording"),
        busy: flag("busy"),
        inconsistent: flag("inconsistent"),
        granularity: b.get("granularity").and_then(Value::as_u64).unwrap_or(0),
        count: b.get("count").and_then(Value::as_u64).unwrap_or(0),
    })
}

pub(super) fn parse_snapshot(s: &Value) -> Option<InternalSnapshot> {
    let num = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
    let clock = num("vm-clock-sec")
        .saturating_mul(1_000_000_000)
        .saturating_add(num("vm-clock-nsec"));
    Some(InternalSnapshot {
        id: s.get("id")?.as_str()?.to_string(),
        tag: s.get("name")?.as_str()?.to_string(),
        vm_state_size: num("vm-state-size"),
        date_sec: s.get("date-sec").and_then(Value::as_i64).unwrap_or(0),
        date_nsec: u32::try_from(num("date-nsec")).unwrap_or(0),
        vm_clock_ns: clock,
    })
}

pub(super) fn bad(command: &str, detail: &str) -> QmpError {
    QmpError::BadReply {
        command: command.to_string(),
        detail: detail.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_with_bitmaps_and_snapshots() {
        let n = json!({"node-name": "d0", "drv": "qcow2", "file": "/x.qcow2", "ro": false,
            "image": {"virtual-size": 16777216, "snapshots": [{"id": "1", "name": "holdfast-s",
                "vm-state-size": 5, "date-sec": 7, "date-nsec": 8, "vm-clock-sec": 1, "vm-clock-nsec": 2}]},
            "dirty-bitmaps": [{"name": "b", "recording": true, "persistent": true, "busy": false,
                "granularity": 65536, "count": 0}, {"recording": true}]});
        let node = parse_node(&n).unwrap();
        assert_eq!(node.virtual_size, 16 << 20);
        assert_eq!(node.bitmaps.len(), 1, "unnamed bitmaps are skipped");
        assert!(node.bitmap("b").unwrap().recording);
        assert_eq!(node.snapshots[0].vm_clock_ns, 1_000_000_002);
        assert!(parse_node(&json!({"node-name": "x"})).is_none());
        assert_eq!(
            qdev_id("/machine/peripheral/vdb/virtio-backend"),
            Some("vdb")
        );
        assert_eq!(qdev_id("sda"), None);
    }
}
