//! Encrypted stores end to end through the CLI: nothing in the store (local, or a real S3
//! server on loopback) shows the data, the VM's name or even zstd's magic, while an
//! unencrypted store shows all three; tampering (a flipped byte in a chunk, an entry table or
//! a manifest; two blobs of equal size swapped) is damage, never data; wrong, missing and
//! foreign keys are one-line errors that write nothing; passphrases change without rewriting
//! data; a catalog rebuilt from an encrypted bucket alone restores byte-identical.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;

use common::s3::{self, S3Server};
use common::*;
use holdfast::crypto::Keys;
use holdfast::store::pack::{self, PackEntry};
use holdfast::store::LocalStore;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const VM: &str = "secret-vm-name";

/// A disk of text-like (compressible) data with a 4 KiB random marker in it; the marker.
fn disk_with_marker(path: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while data.len() < 3 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(
            format!("line {} of the guest's log: all is well\n", x % 1000).as_bytes(),
        );
    }
    // Random bytes (a region zstd leaves as it is), the marker 4 KiB in their middle.
    let mut noise = vec![0u8; 256 << 10];
    getrandom::fill(&mut noise).unwrap();
    data[1 << 20..(1 << 20) + noise.len()].copy_from_slice(&noise);
    let marker = noise[128 << 10..(128 << 10) + 4096].to_vec();
    std::fs::write(path, &data).unwrap();
    marker
}

/// Files under `root` (the store's objects), skipping what stays on the appliance.
fn store_files(root: &Path) -> Vec<PathBuf> {
    walk(root)
        .into_iter()
        .filter(|p| {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            ![
                "catalog",
                "tasks",
                "locks",
                "cache",
                "vms.toml",
                "keyfile",
                "requests.json",
                "store.json",
            ]
            .iter()
            .any(|skip| rel.starts_with(skip))
        })
        .collect()
}

/// What of (marker, VM name, zstd magic) the files show, in names or bytes.
fn leaks(files: &[PathBuf], marker: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for f in files {
        let b = std::fs::read(f).unwrap();
        let has = |n: &[u8]| b.windows(n.len()).any(|w| w == n);
        if f.to_string_lossy().contains(VM) || has(VM.as_bytes()) {
            out.push(format!("name in {}", f.display()));
        }
        if has(&marker[..64]) {
            out.push(format!("marker in {}", f.display()));
        }
        if has(&[0x28, 0xb5, 0x2f, 0xfd]) {
            out.push(format!("zstd in {}", f.display()));
        }
    }
    out
}

#[test]
fn an_encrypted_store_shows_no_data_no_names_and_no_zstd_and_a_clear_one_does() {
    for mode in ["repokey", "keyfile"] {
        let repo = Repo::new_encrypted(mode);
        let img = repo.tmp("root.img");
        let marker = disk_with_marker(&img);
        let id = repo.backup(VM, &[("root", &img)])["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!id.is_empty());
        let files = store_files(&repo.path());
        assert!(files.len() >= 3, "{files:?}");
        assert_eq!(leaks(&files, &marker), Vec::<String>::new(), "{mode}");
        let out = repo.tmp("out.img");
        repo.run(&["restore", VM, "--to", out.to_str().unwrap()])
            .ok();
        assert_same(&out, &img);
        let stats = repo.run(&["--json", "stats"]).ok().json();
        assert_eq!(stats["format_version"], 2);
        assert!(
            stats["encryption"].as_str().unwrap().starts_with(mode),
            "{stats}"
        );
    }
    // The same on a clear store: the test can fail.
    let clear = Repo::new();
    let img = clear.tmp("root.img");
    let marker = disk_with_marker(&img);
    clear.backup(VM, &[("root", &img)]);
    let found = leaks(&store_files(&clear.path()), &marker);
    for what in ["name", "marker", "zstd"] {
        assert!(
            found.iter().any(|l| l.starts_with(what)),
            "{what}: {found:?}"
        );
    }
    assert_eq!(
        clear.run(&["--json", "stats"]).ok().json()["format_version"],
        1
    );
}

#[test]
fn an_encrypted_bucket_shows_nothing_and_rebuilds_from_the_bucket_alone() {
    let srv = S3Server::start();
    let env = || {
        let mut e = s3::env();
        e.push(("HOLDFAST_PASSPHRASE", PASSPHRASE.to_string()));
        e
    };
    let url = format!("s3://{}/enc", s3::BUCKET);
    let init = |r: &Repo, extra: &[&str]| {
        let mut a = vec!["init", "--s3", &url, "--endpoint", "", "--path-style"];
        let ep = srv.endpoint();
        a[4] = &ep;
        a.extend_from_slice(extra);
        r.run(&a).ok();
    };
    let repo = Repo {
        dir: tempfile::tempdir().unwrap(),
        env: env(),
    };
    init(&repo, &["--encryption", "repokey"]);
    let img = repo.tmp("root.img");
    let marker = disk_with_marker(&img);
    repo.backup(VM, &[("root", &img)]);
    let files = store_files(&srv.data());
    assert!(files.len() >= 4, "{files:?}");
    assert_eq!(leaks(&files, &marker), Vec::<String>::new());
    // A new machine: the bucket and the passphrase, nothing else.
    let other = Repo {
        dir: tempfile::tempdir().unwrap(),
        env: env(),
    };
    init(&other, &["--existing"]);
    let out = other.tmp("out.img");
    other
        .run(&["restore", VM, "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &img);
    // The restore filled the new machine's read cache: with ciphertext only.
    let cached = walk(&other.path().join("cache"));
    let bytes: u64 = cached
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(
        bytes > 64 << 10,
        "the cache holds {bytes} bytes: {cached:?}"
    );
    assert_eq!(
        leaks(&cached, &marker),
        Vec::<String>::new(),
        "the read cache"
    );
    // Wrong passphrase on the new machine: one line, exit 1, nothing written.
    let bad = other.run_env(
        &[
            "restore",
            VM,
            "--to",
            other.tmp("bad.img").to_str().unwrap(),
        ],
        &[("HOLDFAST_PASSPHRASE", "not the passphrase")],
    );
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(bad.err().contains("wrong passphrase"), "{}", bad.stderr);
    assert!(!other.tmp("bad.img").exists());
}

#[test]
fn a_new_appliance_attaches_to_a_key_file_bucket_only_with_its_key() {
    let srv = S3Server::start();
    let url = format!("s3://{}/kf", s3::BUCKET);
    let ep = srv.endpoint();
    let base = ["init", "--s3", &url, "--endpoint", &ep, "--path-style"];
    let repo = Repo {
        dir: tempfile::tempdir().unwrap(),
        env: s3::env(),
    };
    let mut a = base.to_vec();
    a.extend(["--encryption", "keyfile"]);
    repo.run(&a).ok();
    let img = repo.tmp("root.img");
    disk_with_marker(&img);
    repo.backup(VM, &[("root", &img)]);
    let paper = repo.tmp("paper.key");
    std::fs::write(&paper, repo.run(&["key", "export"]).ok().stdout).unwrap();
    let foreign = Repo::new_encrypted("keyfile");
    let foreign_key = repo.tmp("foreign.key");
    std::fs::write(&foreign_key, foreign.run(&["key", "export"]).ok().stdout).unwrap();
    for f in [&paper, &foreign_key] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let attach = |other: &Repo, key: Option<&Path>| {
        let mut a = base.to_vec();
        a.push("--existing");
        if let Some(k) = key {
            a.extend(["--key-file", k.to_str().unwrap()]);
        }
        other.run(&a)
    };
    let other = Repo {
        dir: tempfile::tempdir().unwrap(),
        env: s3::env(),
    };
    // No key, another store's key, a key file others can read: one line, exit 1, nothing here.
    let r = attach(&other, None);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.err().contains("--key-file"), "{}", r.stderr);
    let r = attach(&other, Some(&foreign_key));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    std::fs::set_permissions(&paper, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = attach(&other, Some(&paper));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!other.path().exists(), "a refused attach writes nothing");
    // The right key: the catalog is rebuilt from the bucket and the backup restores.
    std::fs::set_permissions(&paper, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = attach(&other, Some(&paper));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mode = std::fs::metadata(other.path().join("keyfile"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = other.tmp("out.img");
    other
        .run(&["restore", VM, "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &img);
}

/// The master key of an encrypted repository (from `key export`).
fn keys_of(repo: &Repo) -> Keys {
    let text = repo.run(&["key", "export"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut m = [0u8; 32];
    hex::decode_to_slice(v["master"].as_str().unwrap(), &mut m).unwrap();
    Keys::from_master(m)
}

/// The packs of a local repository with their (opened) entry tables.
fn packs(repo: &Repo, keys: &Keys) -> Vec<(PathBuf, String, Vec<PackEntry>)> {
    let s = LocalStore::new(repo.path());
    use holdfast::store::ObjectStore;
    s.list("packs/")
        .unwrap()
        .into_iter()
        .map(|k| {
            let e = pack::read_footer(&s, &k, Some(keys)).unwrap();
            (repo.path().join(&k), k, e)
        })
        .collect()
}

fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

/// verify says damaged (exit 3); a restore exits 3 and leaves no file.
fn damaged(repo: &Repo, what: &str) {
    let v = repo.run(&["--json", "verify"]);
    assert_eq!(v.code, 3, "{what}: verify: {} {}", v.stdout, v.stderr);
    let out = repo.tmp("after.img");
    let r = repo.run(&["restore", VM, "--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{what}: restore: {}", r.stderr);
    assert!(
        r.err().contains("does not authenticate") || r.err().contains("damaged"),
        "{}",
        r.stderr
    );
    assert!(!out.exists(), "{what}: a refused restore writes nothing");
}

#[test]
fn tampering_is_damage_never_data() {
    // A flipped byte in a chunk's ciphertext.
    let repo = Repo::new_encrypted("keyfile");
    let img = repo.tmp("root.img");
    disk_with_marker(&img);
    repo.backup(VM, &[("root", &img)]);
    let keys = keys_of(&repo);
    let (file, _, entries) = packs(&repo, &keys).remove(0);
    let chunk = entries.iter().find(|e| e.kind == 0).unwrap();
    flip(&file, chunk.offset + 30);
    damaged(&repo, "a chunk");

    // A flipped byte in a manifest.
    let repo = Repo::new_encrypted("keyfile");
    repo.backup(VM, &[("root", &img)]);
    let manifest = walk(&repo.path().join("backups")).remove(0);
    let len = std::fs::metadata(&manifest).unwrap().len();
    flip(&manifest, len / 2);
    damaged(&repo, "a manifest");
    let r = repo.run(&["--json", "verify"]);
    let bad = r.json()["damaged_manifests"].clone();
    assert_eq!(
        bad[0]["backup"].as_str().unwrap().split('@').next(),
        Some(VM),
        "{bad}"
    );
    assert_eq!(bad[0]["repairable"], true, "{bad}");
    // The catalog's good copy goes back; the backup restores again.
    repo.run(&["verify", "--repair"]).ok();
    let out = repo.tmp("repaired.img");
    repo.run(&["restore", VM, "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &img);

    // Two blobs of equal size swapped in their pack: each opens only as itself.
    let repo = Repo::new_encrypted("keyfile");
    let same = repo.tmp("same.img");
    let mut data = vec![0x11u8; 4 << 20];
    data.extend(vec![0x22u8; 4 << 20]);
    std::fs::write(&same, &data).unwrap();
    repo.backup(VM, &[("root", &same)]);
    let keys = keys_of(&repo);
    let (file, _, entries) = packs(&repo, &keys).remove(0);
    let chunks: Vec<&PackEntry> = entries.iter().filter(|e| e.kind == 0).collect();
    let (a, b) = chunks
        .iter()
        .enumerate()
        .find_map(|(i, a)| {
            chunks[i + 1..]
                .iter()
                .find(|b| b.stored_len == a.stored_len)
                .map(|b| (*a, *b))
        })
        .expect("two chunks of equal size");
    let mut bytes = std::fs::read(&file).unwrap();
    let (ao, bo, n) = (a.offset as usize, b.offset as usize, a.stored_len as usize);
    let blob_a = bytes[ao..ao + n].to_vec();
    let blob_b = bytes[bo..bo + n].to_vec();
    bytes[ao..ao + n].copy_from_slice(&blob_b);
    bytes[bo..bo + n].copy_from_slice(&blob_a);
    std::fs::write(&file, bytes).unwrap();
    damaged(&repo, "swapped blobs");

    // A flipped byte in a pack's entry table: the catalog rebuild finds the pack damaged.
    let repo = Repo::new_encrypted("keyfile");
    repo.backup(VM, &[("root", &img)]);
    let keys = keys_of(&repo);
    let (file, key, _) = packs(&repo, &keys).remove(0);
    let len = std::fs::metadata(&file).unwrap().len();
    flip(&file, len - pack::TRAILER_LEN as u64 - 10);
    let s = LocalStore::new(repo.path());
    assert!(pack::read_footer(&s, &key, Some(&keys)).is_err());
    damaged(&repo, "an entry table");
    let v = repo.run(&["--json", "verify"]);
    let report = v.json();
    let bad = report["damaged_packs"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{}", v.stdout);
    assert_eq!(
        pack::pack_key(bad[0]["pack"].as_str().unwrap()),
        key,
        "verify names the pack"
    );
    assert_eq!(bad[0]["affects"][0]["vm"], VM, "{}", v.stdout);
    let r = repo.run(&["--json", "catalog", "rebuild"]);
    assert_eq!(r.code, 3, "an entry table: {} {}", r.stdout, r.stderr);
}

#[test]
fn wrong_missing_and_foreign_keys_are_one_line_errors_that_write_nothing() {
    let repo = Repo::new_encrypted("repokey");
    let img = repo.tmp("root.img");
    disk_with_marker(&img);
    repo.backup(VM, &[("root", &img)]);
    let out = repo.tmp("out.img");
    let to = out.to_str().unwrap();
    let check = |r: Run, want: &str| {
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
        assert!(r.err().contains(want), "{want}: {}", r.stderr);
        assert!(!out.exists());
    };
    check(
        repo.run_env(
            &["restore", VM, "--to", to],
            &[("HOLDFAST_PASSPHRASE", "wrong one!")],
        ),
        "wrong passphrase",
    );
    let mut none = repo.cmd(&["restore", VM, "--to", to]);
    none.env_remove("HOLDFAST_PASSPHRASE");
    check(Run::from(none.output().unwrap()), "HOLDFAST_PASSPHRASE");
    // A passphrase file others can read is refused.
    let pw = repo.tmp("pw");
    std::fs::write(&pw, PASSPHRASE).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = repo.cmd(&[
        "restore",
        VM,
        "--to",
        to,
        "--passphrase-file",
        pw.to_str().unwrap(),
    ]);
    c.env_remove("HOLDFAST_PASSPHRASE");
    check(Run::from(c.output().unwrap()), "readable by others");

    // keyfile: a missing key file, and the key file of another store.
    let kf = Repo::new_encrypted("keyfile");
    kf.backup(VM, &[("root", &img)]);
    let other = Repo::new_encrypted("keyfile");
    let key = kf.path().join("keyfile");
    let saved = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    let r = kf.run(&["restore", VM, "--to", to]);
    check(r, "key import");
    std::fs::copy(other.path().join("keyfile"), &key).unwrap();
    check(
        kf.run(&["restore", VM, "--to", to]),
        "the key of another store",
    );
    // `key import` refuses the foreign key and takes the right one back.
    let foreign = kf.tmp("foreign.key");
    std::fs::copy(other.path().join("keyfile"), &foreign).unwrap();
    assert_eq!(
        kf.run(&["key", "import", foreign.to_str().unwrap()]).code,
        1
    );
    let mine = kf.tmp("mine.key");
    std::fs::write(&mine, &saved).unwrap();
    kf.run(&["key", "import", mine.to_str().unwrap()]).ok();
    kf.run(&["restore", VM, "--to", to]).ok();
    assert_same(&out, &img);
}

#[test]
fn passphrases_change_add_and_remove_without_rewriting_data() {
    let repo = Repo::new_encrypted("repokey");
    let img = repo.tmp("root.img");
    disk_with_marker(&img);
    repo.backup(VM, &[("root", &img)]);
    let before: Vec<(PathBuf, Vec<u8>)> = walk(&repo.path().join("packs"))
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    let restore = |pass: &str, name: &str| {
        let out = repo.tmp(name);
        let r = repo.run_env(
            &["restore", VM, "--to", out.to_str().unwrap()],
            &[("HOLDFAST_PASSPHRASE", pass)],
        );
        (r, out)
    };
    // passwd: the new one opens, the old one no longer does.
    repo.run_env(
        &["key", "passwd"],
        &[("HOLDFAST_NEW_PASSPHRASE", "the second passphrase")],
    )
    .ok();
    let (r, out) = restore("the second passphrase", "a.img");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_same(&out, &img);
    let (r, _) = restore(PASSPHRASE, "b.img");
    assert!(r.err().contains("wrong passphrase"), "{}", r.stderr);
    // add: two passphrases work.
    repo.run_env(
        &["key", "add"],
        &[
            ("HOLDFAST_PASSPHRASE", "the second passphrase"),
            ("HOLDFAST_NEW_PASSPHRASE", "a third passphrase"),
        ],
    )
    .ok();
    for (i, p) in ["the second passphrase", "a third passphrase"]
        .iter()
        .enumerate()
    {
        let (r, out) = restore(p, &format!("c{i}.img"));
        assert_eq!(r.code, 0, "{p}: {}", r.stderr);
        assert_same(&out, &img);
    }
    let env = [("HOLDFAST_PASSPHRASE", "a third passphrase")];
    let list = repo.run_env(&["--json", "key", "list"], &env).ok().json();
    let ids: Vec<String> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    // remove: one of two, yes; the last one, never.
    repo.run_env(&["key", "remove", &ids[0]], &env).ok();
    let last = repo.run_env(&["key", "remove", &ids[1]], &env);
    assert_eq!(last.code, 1, "{}", last.stderr);
    assert!(last.err().contains("last key"), "{}", last.stderr);
    // No pack was rewritten by any of it.
    for (p, b) in before {
        assert_eq!(std::fs::read(&p).unwrap(), b, "{}", p.display());
    }
}

#[test]
fn the_service_refuses_to_start_with_a_secret_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let repo = Repo::new_encrypted("keyfile");
    let key = repo.path().join("keyfile");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = repo.run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.err().contains("readable by others"), "{}", r.stderr);
    assert!(!repo.path().join("holdfast.sock").exists());
}
