//! Snapshots of a VM that is shut down: `qemu-img` on its image files.

use crate::qmp::ops;
use crate::{Error, Result};
use std::path::Path;

pub(super) fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::usage(format!("{} is not UTF-8", p.display())))
}

fn run(args: &[&str]) -> Result<std::process::Output> {
    std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| Error::io("run qemu-img (apt-get install qemu-utils)", e))
}

fn failed(args: &[&str], stderr: &[u8]) -> Error {
    Error::Tool {
        tool: "qemu-img",
        message: format!(
            "qemu-img {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(stderr).trim().replace('\n', " ")
        ),
    }
}

/// Run `qemu-img ARGS`; with `missing_ok`, "not found" (a snapshot already gone) is success.
pub(super) fn qemu_img(args: &[&str], missing_ok: bool) -> Result<()> {
    let out = run(args)?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || (missing_ok && err.contains("not found")) {
        return Ok(());
    }
    Err(failed(args, &out.stderr))
}

/// True when the qcow2 `file` holds the internal snapshot `tag`.
pub(super) fn holds_tag(file: &str, tag: &str) -> Result<bool> {
    let args = ["snapshot", "-l", "-U", file];
    let out = run(&args)?;
    if !out.status.success() {
        return Err(failed(&args, &out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w == tag))
}

/// Remove holdfast's checkpoint bitmaps from a qcow2 file of a VM that is shut down (after a
/// revert the next backup then reads every allocated extent).
pub(super) fn drop_checkpoints(file: &str) -> Result<()> {
    let args = ["info", "--output=json", "-U", file];
    let out = run(&args)?;
    if !out.status.success() {
        return Err(failed(&args, &out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| Error::Tool {
        tool: "qemu-img",
        message: format!("qemu-img info {file}: {e}"),
    })?;
    let names: Vec<String> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str())
        .filter(|n| n.starts_with(ops::PREFIX))
        .map(String::from)
        .collect();
    for n in names {
        qemu_img(&["bitmap", "--remove", file, &n], false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failing_qemu_img_is_a_tool_error_naming_the_command() {
        let e = super::qemu_img(&["info", "/nonexistent/holdfast.qcow2"], false).unwrap_err();
        assert_eq!(e.code(), "tool");
        let msg = e.to_string();
        assert!(
            msg.starts_with("qemu-img info /nonexistent/holdfast.qcow2 failed:"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert!(super::qemu_img(&["snapshot", "-d", "t", "/nonexistent/x"], true).is_err());
    }
}
