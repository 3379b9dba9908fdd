//! VM snapshots on real QEMU 10 (qemu-system-x86_64, TCG, no guest OS): memory snapshots that
//! revert a running VM, disk-only snapshots reverted offline, group snapshots, lifespans and
//! limits, and external overlays for raw disks.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::qemu::Vm;
use common::*;
use serde_json::json;
use std::time::Duration;

fn declare(repo: &Repo, vm: &Vm, name: &str, extra: &[&str]) {
    let mut args = vec![
        "vm",
        "add",
        name,
        "--qmp",
        vm.qmp.to_str().unwrap(),
        "--disk",
    ];
    let disk = format!("root={}", vm.disks[0].node);
    args.push(&disk);
    args.extend_from_slice(extra);
    repo.run(&args).ok();
}

fn list(repo: &Repo, vm: &str) -> Vec<serde_json::Value> {
    repo.run(&["--json", "snapshot", "list", vm])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .clone()
}

/// `args` fail with the one-line error `want` and, through --json, the stable `code`.
fn err(repo: &Repo, args: &[&str], code: &str, want: &str) {
    let r = repo.run(args);
    assert_ne!(r.code, 0, "{args:?} must fail");
    assert!(r.err().contains(want), "{args:?}: {}", r.stderr);
    let json: Vec<&str> = std::iter::once("--json")
        .chain(args.iter().copied())
        .collect();
    let j = repo.run(&json);
    assert_eq!(j.json()["error"]["code"], code, "{args:?}: {}", j.stdout);
}

#[test]
fn memory_snapshots_revert_a_running_vm_and_live_through_rename_delete_and_expiry() {
    let repo = Repo::new();
    let vm = Vm::start(&[("qcow2", 16)], false);
    declare(&repo, &vm, "web", &[]);
    vm.write(0, 0x31, 0, 1 << 20);
    // Backed up before: the disk carries holdfast's checkpoint bitmap.
    repo.backup_args(&["web"]);

    err(
        &repo,
        &["snapshot", "create", "web", "Pre Update"],
        "invalid-name",
        "use letters, digits, '-' and '_' only (e.g. PreUpdate, not \"Pre Update\")",
    );
    let made = repo
        .run(&[
            "--json",
            "snapshot",
            "create",
            "web",
            "PreUpdate",
            "--memory",
            "--description",
            "before the upgrade",
        ])
        .ok()
        .json();
    let tag = made[0]["tag"].as_str().unwrap().to_string();
    assert!(tag.starts_with("holdfast-snap-"));
    assert_eq!(vm.snapshot_tags("disk0"), vec![tag.clone()]);
    err(
        &repo,
        &["snapshot", "create", "web", "Second"],
        "limit-reached",
        "VM web already has 1 snapshot(s): PreUpdate (taken ",
    );
    err(
        &repo,
        &["snapshot", "create", "web", "Second"],
        "limit-reached",
        "its limit is 1: delete one first (`holdfast snapshot delete web PreUpdate`)",
    );

    let l = list(&repo, "web");
    assert_eq!(l.len(), 1);
    let s = &l[0];
    assert_eq!(
        (
            s["name"].as_str(),
            s["memory"].as_bool(),
            s["state"].as_str()
        ),
        (Some("PreUpdate"), Some(true), Some("ok"))
    );
    assert_eq!(s["description"], "before the upgrade");
    assert!(u(s, "/size") > 0, "memory state has a size: {s}");
    let life = u(s, "/expires_ms") - u(s, "/created_ms");
    assert_eq!(life, 10 * 86400 * 1000, "the default lifespan is 10 days");
    let text = repo.run(&["snapshot", "list"]).ok().stdout;
    assert!(
        text.contains("PreUpdate") && text.contains("yes") && text.contains("before the upgrade"),
        "{text}"
    );

    // Change the disk, then revert: the VM runs on, with the disk as it was.
    vm.write(0, 0x99, 0, 1 << 20);
    let r = repo
        .run(&["--json", "snapshot", "revert", "web", "PreUpdate"])
        .ok()
        .json();
    assert_eq!(
        (r["online"].as_bool(), r["running_after"].as_bool()),
        (Some(true), Some(true))
    );
    assert!(vm.running());
    vm.io(0, "read -P 0x31 0 1M");
    // The reverted disk differs from the last backup where no bitmap looked: the next backup
    // reads everything, and restores the reverted disk.
    let after = repo.backup_args(&["web"]);
    assert!(after["disks"][0]["bitmap"].is_null(), "{after}");
    let (raw, out) = (repo.tmp("now.raw"), repo.tmp("restored.raw"));
    vm.snapshot_raw(0, &raw);
    repo.run(&["restore", "web", "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &raw);

    // Rename touches only holdfast's record: QEMU's tag stays.
    repo.run(&["snapshot", "rename", "web", "PreUpdate", "BeforeUpgrade"])
        .ok();
    assert_eq!(list(&repo, "web")[0]["name"], "BeforeUpgrade");
    assert_eq!(vm.snapshot_tags("disk0"), vec![tag.clone()]);
    err(
        &repo,
        &["snapshot", "delete", "web", "PreUpdate"],
        "not-found",
        "VM web has no snapshot \"PreUpdate\" (its snapshots: BeforeUpgrade)",
    );
    repo.run(&["snapshot", "delete", "web", "BeforeUpgrade"])
        .ok();
    assert!(vm.snapshot_tags("disk0").is_empty());
    assert!(list(&repo, "web").is_empty());

    // A lifespan: expire removes what is past it, and only that.
    repo.run(&["snapshot", "create", "web", "Short", "--ttl", "2s"])
        .ok();
    let none = repo.run(&["snapshot", "expire"]).ok().stdout;
    assert!(none.contains("no snapshot is past its lifespan"), "{none}");
    std::thread::sleep(Duration::from_millis(2100));
    let e = repo.run(&["snapshot", "expire"]).ok().stdout;
    assert!(e.contains("expired snapshot Short of VM web"), "{e}");
    assert!(vm.snapshot_tags("disk0").is_empty());
    // Backups keep working beside snapshots.
    repo.backup_args(&["web"]);
    err(
        &repo,
        &["snapshot", "create", "web", "X", "--ttl", "soon"],
        "usage",
        "is not a duration",
    );
}

#[test]
fn disk_only_snapshots_revert_offline_and_group_snapshots_are_all_or_nothing() {
    let repo = Repo::new();
    let mut a = Vm::start(&[("qcow2", 16)], false);
    let mut b = Vm::start(&[("qcow2", 16)], false);
    declare(&repo, &a, "a", &["--snapshot-limit", "2"]);
    declare(&repo, &b, "b", &["--snapshot-limit", "1"]);
    a.write(0, 0x21, 0, 64 << 10);
    repo.backup_args(&["a"]);

    let made = repo
        .run(&[
            "--json", "snapshot", "create", "--vm", "a", "--vm", "b", "G",
        ])
        .ok()
        .json();
    assert_eq!(made.as_array().unwrap().len(), 2);
    assert_eq!(made[0]["group"], json!(["a", "b"]));
    assert_eq!(a.snapshot_tags("disk0").len(), 1);
    assert_eq!(b.snapshot_tags("disk0").len(), 1);
    // b is at its limit: the group is refused before anything is taken.
    err(
        &repo,
        &["snapshot", "create", "--vm", "a", "--vm", "b", "H"],
        "limit-reached",
        "VM b already has 1 snapshot(s): G",
    );
    assert_eq!(list(&repo, "a").len(), 1);
    // b cannot be reached: a's half of the group is undone.
    repo.run(&["snapshot", "delete", "b", "G"]).ok();
    b.shutdown();
    err(
        &repo,
        &["snapshot", "create", "--vm", "a", "--vm", "b", "H"],
        "qemu",
        "cannot connect to QMP socket",
    );
    assert_eq!(list(&repo, "a").len(), 1, "no H left on a");
    assert_eq!(a.snapshot_tags("disk0").len(), 1);
    b.boot();

    // A disk-only snapshot cannot be reverted while the VM runs; shut down, it can.
    a.write(0, 0x77, 0, 64 << 10);
    err(
        &repo,
        &["snapshot", "revert", "a", "G"],
        "conflict",
        "is disk-only: QEMU cannot revert it while the VM runs; shut the VM down",
    );
    a.shutdown();
    let r = repo
        .run(&["--json", "snapshot", "revert", "a", "G"])
        .ok()
        .json();
    assert_eq!(r["online"], false);
    let l = list(&repo, "a");
    assert_eq!(l[0]["state"], "vm not running");
    a.boot();
    a.io(0, "read -P 0x21 0 64k");
    let after = repo.backup_args(&["a"]);
    assert!(
        after["disks"][0]["bitmap"].is_null(),
        "a full read after an offline revert: {after}"
    );
    repo.run(&["snapshot", "delete", "a", "G"]).ok();
    assert!(a.snapshot_tags("disk0").is_empty());
}

#[test]
fn raw_disks_get_external_overlays() {
    let repo = Repo::new();
    let mut vm = Vm::start(&[("raw", 16)], false);
    declare(&repo, &vm, "legacy", &[]);
    err(
        &repo,
        &["snapshot", "create", "legacy", "M", "--memory"],
        "unsupported",
        "--memory needs qcow2 disks",
    );
    let made = repo
        .run(&["--json", "snapshot", "create", "legacy", "X"])
        .ok()
        .json();
    assert_eq!(made[0]["kind"], "External");
    let ov = made[0]["disks"][0]["overlay"].clone();
    let file = std::path::PathBuf::from(ov["file"].as_str().unwrap());
    assert!(file.exists(), "overlay {}", file.display());

    // Writes go to the overlay; a backup reads the disk as the guest sees it.
    vm.write(0, 0x42, 0, 64 << 10);
    repo.backup_args(&["legacy"]);
    let out = repo.tmp("r.raw");
    repo.run(&["restore", "legacy", "--to", out.to_str().unwrap()])
        .ok();
    assert!(std::fs::read(&out).unwrap()[..64 << 10]
        .iter()
        .all(|&b| b == 0x42));
    let l = list(&repo, "legacy");
    assert_eq!(l[0]["state"], "ok");

    // Delete keeps the data: the overlay is committed into the raw disk.
    repo.run(&["snapshot", "delete", "legacy", "X"]).ok();
    assert!(!file.exists());
    vm.io(0, "read -P 0x42 0 64k");
    let raw = std::fs::read(&vm.disks[0].file).unwrap();
    assert!(
        raw[..64 << 10].iter().all(|&b| b == 0x42),
        "committed into the base image"
    );

    // Revert (offline): the overlay is emptied again.
    let made = repo
        .run(&["--json", "snapshot", "create", "legacy", "Y"])
        .ok()
        .json();
    let file = std::path::PathBuf::from(made[0]["disks"][0]["overlay"]["file"].as_str().unwrap());
    vm.write(0, 0x43, 0, 64 << 10);
    vm.shutdown();
    repo.run(&["snapshot", "revert", "legacy", "Y"]).ok();
    common::qemu::run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x42 0 64k",
            file.to_str().unwrap(),
        ],
    );
}

#[test]
fn group_snapshots_are_reverted_and_deleted_as_a_group_and_orphans_can_be_forgotten() {
    let repo = Repo::new();
    let mut a = Vm::start(&[("qcow2", 16)], false);
    let mut b = Vm::start(&[("qcow2", 16)], false);
    declare(&repo, &a, "a", &[]);
    declare(&repo, &b, "b", &[]);
    a.write(0, 0x21, 0, 64 << 10);
    b.write(0, 0x31, 0, 64 << 10);
    repo.run(&["snapshot", "create", "--vm", "a", "--vm", "b", "G"])
        .ok();
    a.write(0, 0x77, 0, 64 << 10);
    b.write(0, 0x78, 0, 64 << 10);
    // A member that does not exist: refused before anything is reverted.
    err(
        &repo,
        &["snapshot", "revert", "--vm", "a", "--vm", "c", "G"],
        "not-found",
        "VM \"c\" is not declared",
    );
    a.io(0, "read -P 0x77 0 64k");
    // Both shut down: both disks go back to G, in one task.
    a.shutdown();
    b.shutdown();
    let r = repo
        .run(&[
            "--json", "snapshot", "revert", "--vm", "a", "--vm", "b", "G",
        ])
        .ok()
        .json();
    assert_eq!(r.as_array().unwrap().len(), 2, "{r}");
    assert!(r.as_array().unwrap().iter().all(|x| x["online"] == false));
    let tasks = repo.run(&["--json", "tasks"]).ok().json();
    let revert = tasks
        .as_array()
        .unwrap()
        .iter()
        .rfind(|t| t["kind"] == "snapshot-revert")
        .unwrap();
    assert_eq!(revert["vms"], json!(["a", "b"]));
    assert_eq!(revert["state"], "ok");
    a.boot();
    b.boot();
    a.io(0, "read -P 0x21 0 64k");
    b.io(0, "read -P 0x31 0 64k");
    // `snapshot list` says how long each took to take.
    let l = list(&repo, "a");
    assert!(l[0]["took_ms"].as_u64().is_some(), "{l:?}");
    let text = repo.run(&["snapshot", "list"]).ok().stdout;
    assert!(text.contains("TOOK"), "{text}");
    // Deleted from every member.
    repo.run(&["snapshot", "delete", "--vm", "a", "--vm", "b", "G"])
        .ok();
    assert!(a.snapshot_tags("disk0").is_empty());
    assert!(b.snapshot_tags("disk0").is_empty());
    assert!(list(&repo, "b").is_empty());
    // A record whose VM is no longer declared: only --forget removes it.
    repo.run(&["snapshot", "create", "b", "Orphan"]).ok();
    repo.run(&["vm", "remove", "b"]).ok();
    err(
        &repo,
        &["snapshot", "delete", "b", "Orphan"],
        "not-found",
        "VM \"b\" is not declared",
    );
    repo.run(&["snapshot", "delete", "b", "Orphan", "--forget"])
        .ok();
    let all = repo.run(&["--json", "snapshot", "list"]).ok().json();
    assert!(all.as_array().unwrap().is_empty(), "{all}");
}

/// `qemu-img info` of an image, as JSON.
fn info(image: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&common::qemu::run(
        "qemu-img",
        &["info", "-U", "--output=json", image.to_str().unwrap()],
    ))
    .unwrap()
}

#[test]
fn snapshots_clone_to_new_independent_images_beside_the_running_vm() {
    let repo = Repo::new();
    // Internal (qcow2) snapshot of a running VM; the guest writes on after it.
    let vm = Vm::start(&[("qcow2", 16)], false);
    declare(&repo, &vm, "web", &[]);
    vm.write(0, 0x31, 0, 64 << 10);
    repo.run(&["snapshot", "create", "web", "Base"]).ok();
    let at_snapshot = repo.tmp("at-snapshot.raw");
    vm.snapshot_raw(0, &at_snapshot);
    vm.write(0, 0x32, 0, 64 << 10);
    vm.write(0, 0x33, 8 << 20, 64 << 10);

    let q = repo.tmp("web-02.qcow2");
    let r = repo
        .run(&[
            "--json",
            "snapshot",
            "clone",
            "web",
            "Base",
            "--to",
            q.to_str().unwrap(),
        ])
        .ok()
        .json();
    assert_eq!(r["format"], "qcow2", "a .qcow2 path gets qcow2: {r}");
    assert_eq!(r["size"], 16 << 20);
    let i = info(&q);
    assert_eq!(i["format"], "qcow2");
    assert!(i["backing-filename"].is_null(), "independent: {i}");
    let raw = repo.tmp("web-02.img");
    common::qemu::run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            q.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert_same(&raw, &at_snapshot);
    // Raw, explicitly: the same bytes, and holes stay holes.
    let raw2 = repo.tmp("web-03.img");
    repo.run(&[
        "snapshot",
        "clone",
        "web",
        "Base",
        "--to",
        raw2.to_str().unwrap(),
        "--format",
        "raw",
    ])
    .ok();
    assert_same(&raw2, &at_snapshot);
    let blocks = std::fs::metadata(&raw2).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(blocks.unwrap() < 16 << 20, "sparse");
    // The VM ran on and still holds the snapshot; the clone is a task like any other.
    assert!(vm.running());
    vm.io(0, "read -P 0x32 0 64k");
    assert_eq!(list(&repo, "web")[0]["state"], "ok");
    let tasks = repo.run(&["--json", "tasks"]).ok().json();
    let t = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "snapshot-clone")
        .cloned()
        .unwrap();
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(t["progress"]["percent"], 100.0, "{t}");

    // Targets: an existing file needs --force; a qcow2 or an image in use never.
    err(
        &repo,
        &[
            "snapshot",
            "clone",
            "web",
            "Base",
            "--to",
            raw2.to_str().unwrap(),
        ],
        "exists",
        "pass --force",
    );
    err(
        &repo,
        &[
            "snapshot",
            "clone",
            "web",
            "Base",
            "--to",
            q.to_str().unwrap(),
            "--force",
        ],
        "conflict",
        "is a qcow2 image",
    );
    let disk = vm.disks[0].file.to_str().unwrap().to_string();
    err(
        &repo,
        &[
            "snapshot", "clone", "web", "Base", "--to", &disk, "--force", "--format", "raw",
        ],
        "conflict",
        "is in use",
    );
    let none = repo.tmp("none.img");
    err(
        &repo,
        &[
            "snapshot",
            "clone",
            "web",
            "Nope",
            "--to",
            none.to_str().unwrap(),
        ],
        "not-found",
        "Nope",
    );
    assert!(!none.exists());
    let other = repo.tmp("x.vmdk");
    err(
        &repo,
        &[
            "snapshot",
            "clone",
            "web",
            "Base",
            "--to",
            other.to_str().unwrap(),
            "--format",
            "vmdk",
        ],
        "usage",
        "raw or qcow2",
    );
    assert!(!other.exists());

    // External (overlay) snapshot of a raw disk: the base under the overlay is the state.
    let legacy = Vm::start(&[("raw", 16)], false);
    declare(&repo, &legacy, "legacy", &[]);
    legacy.write(0, 0x51, 0, 64 << 10);
    let before = repo.tmp("legacy-before.raw");
    legacy.snapshot_raw(0, &before);
    repo.run(&["snapshot", "create", "legacy", "X"]).ok();
    legacy.write(0, 0x52, 0, 64 << 10);
    let out = repo.tmp("legacy-clone.img");
    let r = repo
        .run(&[
            "--json",
            "snapshot",
            "clone",
            "legacy",
            "X",
            "--to",
            out.to_str().unwrap(),
        ])
        .ok()
        .json();
    assert_eq!(r["format"], "raw");
    assert_same(&out, &before);
    legacy.io(0, "read -P 0x52 0 64k");
    // No partial file is left anywhere.
    let left: Vec<_> = std::fs::read_dir(repo.tmp(""))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
