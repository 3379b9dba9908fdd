//! Restores into NBD targets (qemu-nbd serving raw and qcow2 images filled with old data):
//! the result equals the backed-up disk byte for byte (holes read as zeros), and a target
//! that is read-only or smaller than the disk is refused before a byte is written.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
#[path = "nbd_common/mod.rs"]
mod nbd_common;

use common::Repo;
use nbd_common::{make_sparse_image, spawn_qemu_nbd, IMG_SIZE};
use std::path::Path;

fn qemu_img(args: &[&str]) -> String {
    common::qemu::run("qemu-img", args)
}

/// A target image of `format` and `size` bytes, every byte 0xee (old data a restore must
/// overwrite, holes included).
fn old_image(path: &Path, format: &str, size: u64) {
    let raw = path.with_extension("fill");
    std::fs::write(&raw, vec![0xeeu8; size as usize]).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        format,
        raw.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    std::fs::remove_file(raw).unwrap();
}

#[test]
fn restores_into_nbd_targets_of_any_format_and_refuses_small_or_read_only_ones() {
    let repo = Repo::new();
    let img = repo.tmp("disk.img");
    make_sparse_image(&img);
    repo.backup("web", &[("root", &img)]);
    for format in ["raw", "qcow2"] {
        let target = repo.tmp(&format!("target.{format}"));
        old_image(&target, format, IMG_SIZE);
        let sock = repo.tmp(&format!("{format}.sock"));
        let server = spawn_qemu_nbd(&sock, &["-f", format, "-t", target.to_str().unwrap()]);
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let r = repo
            .run(&["--json", "restore", "web", "--to", &uri])
            .ok()
            .json();
        assert_eq!(r["size"], IMG_SIZE, "{r}");
        // Old data everywhere: holes are zeroed (fast where the server can), data written.
        let n = &r["nbd"];
        assert_eq!(n["target_read_zeros"], false, "{r}");
        assert!(n["writes"].as_u64().unwrap() > 0, "{r}");
        assert!(
            n["zeroes"].as_u64().unwrap() + n["fast_zeroes"].as_u64().unwrap() > 0,
            "{r}"
        );
        assert_eq!(n["holes_skipped"], 0, "{r}");
        drop(server);
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            format,
            img.to_str().unwrap(),
            target.to_str().unwrap(),
        ]);
        assert!(cmp.contains("identical"), "{format}: {cmp}");
        // The task names the target; no output file is recorded for a URI.
        let t = repo.run(&["--json", "tasks", "--vm", "web"]).ok().json();
        let last = t.as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["kind"], "restore");
        assert!(
            last["target"].as_str().unwrap().contains("nbd+unix"),
            "{last}"
        );
        assert!(last.get("output").is_none(), "{last}");
    }
    // A target that reads zeros throughout (a new sparse file): holes cost no request.
    let fresh = repo.tmp("fresh.raw");
    std::fs::File::create(&fresh)
        .unwrap()
        .set_len(IMG_SIZE)
        .unwrap();
    let sock = repo.tmp("fresh.sock");
    let server = spawn_qemu_nbd(&sock, &["-f", "raw", "-t", fresh.to_str().unwrap()]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let r = repo
        .run(&["--json", "restore", "web", "--to", &uri])
        .ok()
        .json();
    drop(server);
    let n = &r["nbd"];
    assert_eq!(n["target_read_zeros"], true, "{r}");
    assert_eq!(n["zeroes"], 0, "{r}");
    assert_eq!(n["fast_zeroes"], 0, "{r}");
    assert!(n["holes_skipped"].as_u64().unwrap() > 0, "{r}");
    common::assert_same(&fresh, &img);

    // A new qcow2 image ("a new VM from this backup"): the same bytes, holes unallocated.
    let new = repo.tmp("new.qcow2");
    let r = repo
        .run(&[
            "--json",
            "restore",
            "web",
            "--to",
            new.to_str().unwrap(),
            "--format",
            "qcow2",
        ])
        .ok()
        .json();
    assert_eq!(r["nbd"]["target_read_zeros"], true, "{r}");
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", new.to_str().unwrap()])).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], IMG_SIZE);
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        img.to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
    let map: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", new.to_str().unwrap()])).unwrap();
    let allocated: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    let data: u64 = nbd_common::DATA.iter().map(|(_, l)| l).sum();
    assert!(
        allocated <= data + (1 << 20),
        "holes stay unallocated: {allocated} of {data}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(repo.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("holdfast-partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for (args, says) in [
        (vec!["--format", "vmdk"], "raw or qcow2"),
        (vec!["--format", "qcow2", "--force"], "is a qcow2 image"),
    ] {
        let mut a = vec!["--json", "restore", "web", "--to", new.to_str().unwrap()];
        a.extend(args);
        let r = repo.run(&a);
        assert_ne!(r.code, 0);
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(says),
            "{}",
            r.stdout
        );
    }
    // Smaller than the disk: refused, and the target keeps every old byte.
    let small = repo.tmp("small.raw");
    old_image(&small, "raw", IMG_SIZE / 2);
    let sock = repo.tmp("small.sock");
    let server = spawn_qemu_nbd(&sock, &["-f", "raw", "-t", small.to_str().unwrap()]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let r = repo.run(&["--json", "restore", "web", "--to", &uri]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("a smaller target is refused"));
    drop(server);
    assert!(
        std::fs::read(&small).unwrap().iter().all(|b| *b == 0xee),
        "nothing written"
    );
    // Read-only: refused.
    let ro = repo.tmp("ro.raw");
    old_image(&ro, "raw", IMG_SIZE);
    let sock = repo.tmp("ro.sock");
    let _server = spawn_qemu_nbd(&sock, &["-r", "-f", "raw", "-t", ro.to_str().unwrap()]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let r = repo.run(&["--json", "restore", "web", "--to", &uri]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("read-only export"));
    // No server at all: a clear error naming the URI.
    let gone = format!("nbd+unix:///?socket={}", repo.tmp("gone.sock").display());
    let r = repo.run(&["--json", "restore", "web", "--to", &gone]);
    assert_ne!(r.code, 0);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{}",
        r.stdout
    );
}
