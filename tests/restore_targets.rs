//! A restore never destroys what it must not: the image of a running VM (qemu-system holds
//! its lock), a qcow2 container, a character device, a FIFO, a symlink (dangling or not); a
//! block device is written in place only when it is large enough. `--force` overrides only
//! "the file exists".
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::qemu::Vm;
use common::Repo;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;

fn hash(p: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).unwrap())
}

/// `restore web --to TARGET --force` fails with `code`, saying `says`.
fn refused(repo: &Repo, to: &Path, code: &str, says: &str) {
    let r = repo.run(&[
        "--json",
        "restore",
        "web",
        "--to",
        to.to_str().unwrap(),
        "--force",
    ]);
    assert_ne!(r.code, 0, "restore to {} must be refused", to.display());
    let e = r.json();
    assert_eq!(e["error"]["code"], code, "{e}");
    let m = e["error"]["message"].as_str().unwrap();
    assert!(m.contains(says), "{m}");
}

fn losetup(file: &Path) -> String {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(file)
        .output()
        .expect("losetup (util-linux) is missing: apt-get install util-linux");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn restores_refuse_what_they_would_destroy() {
    let repo = Repo::new();
    let img = repo.tmp("root.img");
    common::service::image(&img, 8, 21);
    repo.backup("web", &[("root", &img)]);

    // The disks of a running VM: qcow2 and raw, both locked by QEMU.
    let vm = Vm::start(&[("qcow2", 16), ("raw", 16)], false);
    for d in &vm.disks {
        let before = hash(&d.file);
        refused(&repo, &d.file, "conflict", "is in use");
        assert_eq!(hash(&d.file), before, "{} untouched", d.file.display());
    }
    let info = common::qemu::run(
        "qemu-img",
        &[
            "info",
            "-U",
            "--output=json",
            vm.disks[0].file.to_str().unwrap(),
        ],
    );
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");

    // A qcow2 nobody uses: still refused, --force or not (a raw image would replace it).
    let free = repo.tmp("free.qcow2");
    common::qemu::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", free.to_str().unwrap(), "16M"],
    );
    let before = hash(&free);
    refused(&repo, &free, "conflict", "is a qcow2 image");
    assert_eq!(hash(&free), before);

    // A character device (made here, not /dev/null), a FIFO, symlinks.
    let chr = repo.tmp("null-like");
    assert!(Command::new("mknod")
        .arg(&chr)
        .args(["c", "1", "3"])
        .status()
        .unwrap()
        .success());
    refused(&repo, &chr, "usage", "is a character device");
    assert!(std::fs::symlink_metadata(&chr)
        .unwrap()
        .file_type()
        .is_char_device());
    let fifo = repo.tmp("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    refused(&repo, &fifo, "usage", "is a FIFO");
    let dangling = repo.tmp("dangling.img");
    std::os::unix::fs::symlink(repo.tmp("nowhere.img"), &dangling).unwrap();
    refused(&repo, &dangling, "usage", "which does not exist");
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!repo.tmp("nowhere.img").exists());
    let real = repo.tmp("real.img");
    std::fs::write(&real, b"keep").unwrap();
    let link = repo.tmp("link.img");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    refused(&repo, &link, "usage", "is a symlink to");
    assert_eq!(std::fs::read(&real).unwrap(), b"keep");

    // A plain file: `exists` without --force, overwritten with it.
    let r = repo.run(&["--json", "restore", "web", "--to", real.to_str().unwrap()]);
    assert_eq!(r.json()["error"]["code"], "exists");
    repo.run(&["restore", "web", "--to", real.to_str().unwrap(), "--force"])
        .ok();
    common::assert_same(&img, &real);

    // Block devices: a smaller one is refused before a byte is written; a larger one is
    // written in place.
    let small = repo.tmp("small.bin");
    std::fs::write(&small, vec![0u8; 4 << 20]).unwrap();
    let small_dev = Loop(losetup(&small));
    refused(
        &repo,
        Path::new(&small_dev.0),
        "usage",
        "a smaller target is refused",
    );
    assert!(
        std::fs::read(&small).unwrap().iter().all(|b| *b == 0),
        "nothing written"
    );
    let big = repo.tmp("big.bin");
    std::fs::write(&big, vec![0xeeu8; 16 << 20]).unwrap();
    let big_dev = Loop(losetup(&big));
    repo.run(&["restore", "web", "--to", &big_dev.0]).ok();
    drop(big_dev);
    let got = std::fs::read(&big).unwrap();
    assert_eq!(
        &got[..8 << 20],
        &std::fs::read(&img).unwrap()[..],
        "the disk, in place"
    );
    assert!(
        got[8 << 20..].iter().all(|b| *b == 0xee),
        "nothing past the disk"
    );
}

#[test]
fn a_restore_in_place_waits_for_the_vm_to_be_down_and_then_writes_its_own_disks() {
    let repo = Repo::new();
    let mut vm = Vm::start(&[("qcow2", 16), ("raw", 16)], false);
    let mut args = vec!["vm".to_string(), "add".into(), "web".into(), "--qmp".into()];
    args.push(vm.qmp.to_str().unwrap().into());
    for (i, d) in vm.disks.iter().enumerate() {
        args.push("--disk".into());
        args.push(format!("d{i}={}", d.node));
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    repo.run(&a).ok();
    vm.write(0, 0x41, 0, 1 << 20);
    vm.write(1, 0x42, 1 << 20, 1 << 20);
    let m = repo.backup_args(&["web"]);
    let id = m["id"].as_str().unwrap().to_string();
    vm.write(0, 0x99, 0, 1 << 20);
    vm.write(1, 0x98, 1 << 20, 1 << 20);
    // Running: refused, nothing touched.
    let r = repo.run(&["--json", "restore", &format!("web@{id}"), "--in-place"]);
    assert_ne!(r.code, 0);
    let e = r.json();
    assert_eq!(e["error"]["code"], "conflict", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is running"),
        "{e}"
    );
    vm.io(0, "read -P 0x99 0 1M");
    // Down: both disks, each in its own format, back to the backup.
    vm.shutdown();
    let r = repo
        .run(&["--json", "restore", &format!("web@{id}"), "--in-place"])
        .ok()
        .json();
    assert_eq!(r["disk"], "d0, d1", "{r}");
    let t = repo.run(&["--json", "tasks", "--vm", "web"]).ok().json();
    let last = t.as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["kind"].as_str(), last["state"].as_str()),
        (Some("restore"), Some("ok"))
    );
    assert!(
        last["target"].as_str().unwrap().ends_with("in place"),
        "{last}"
    );
    let info = common::qemu::run(
        "qemu-img",
        &["info", "--output=json", vm.disks[0].file.to_str().unwrap()],
    );
    assert!(
        info.contains("\"format\": \"qcow2\""),
        "still qcow2: {info}"
    );
    vm.boot();
    vm.io(0, "read -P 0x41 0 1M");
    vm.io(1, "read -P 0x42 1M 1M");
    // --in-place with --to, or with --disk: usage errors.
    let r = repo.run(&["restore", "web", "--in-place", "--to", "/tmp/x.img"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = repo.run(&["--json", "restore", "web", "--in-place", "--disk", "d0"]);
    assert_eq!(r.code, 2, "{}", r.stdout);
}
