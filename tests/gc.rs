//! forget + gc free space; gc beside a running backup never deletes what it is about to
//! reference (DESIGN §5 invariant 2); mostly-dead packs are rewritten.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use std::fs;
use std::path::Path;

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    let mut v = vec![0u8; len];
    h.finalize_xof().fill(&mut v);
    v
}

fn stored(repo: &Repo) -> u64 {
    u(&repo.run(&["--json", "stats"]).ok().json(), "/stored_bytes")
}

fn restore_equals(repo: &Repo, spec: &str, original: &Path) {
    let out = repo.tmp("check.img");
    let _ = fs::remove_file(&out);
    repo.run(&["restore", spec, "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, original);
}

#[test]
fn forget_and_gc_free_what_nothing_references() {
    let d = disks();
    let repo = Repo::new();
    repo.backup("vm1", &[("root", &d.join("base.img"))]);
    let img = repo.tmp("junk.img");
    fs::write(&img, random_bytes(1, 40 << 20)).unwrap();
    let junk = repo.backup("vm2", &[("root", &img)]);
    let before = stored(&repo);
    let r = repo.run(&["forget", "vm2"]);
    assert!(r.err().contains("give VM@ID"), "{}", r.stderr);
    repo.run(&["forget", &format!("vm2@{}", junk["id"].as_str().unwrap())])
        .ok();
    let g = repo.run(&["--json", "gc"]).ok().json();
    assert!(u(&g, "/bytes_freed") >= 39 << 20, "{g}");
    assert!(stored(&repo) + (39 << 20) <= before);
    assert_eq!(
        repo.run(&["--json", "verify"]).ok().json()["damaged"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    restore_equals(&repo, "vm1", &d.join("base.img"));
    // A second gc finds nothing more.
    let g = repo.run(&["--json", "gc"]).ok().json();
    assert_eq!(u(&g, "/packs_deleted"), 0);
}

#[test]
fn gc_beside_a_backup_never_deletes_what_the_backup_reuses() {
    let d = disks();
    let repo = Repo::new();
    let base = d.join("base.img");
    let first = repo.backup("vm1", &[("root", &base)]);
    // Now nothing references base.img's chunks, but the catalog still lists them...
    repo.run(&["forget", &format!("vm1@{}", first["id"].as_str().unwrap())])
        .ok();
    // ...so a new backup of the same disk reuses every one of them, and pauses before commit.
    let flag = repo.tmp("release");
    let backup = repo
        .cmd(&[
            "--json",
            "backup",
            "vm1",
            "--disk",
            &format!("root={}", base.display()),
        ])
        .env("HOLDFAST_TEST_PAUSE_BEFORE_COMMIT", &flag)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let waiting = flag.with_extension("waiting");
    for _ in 0..600 {
        if waiting.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(waiting.exists(), "the backup never reached its pause point");
    // gc runs now, between the backup's dedup lookups and its commit.
    let g = repo.run(&["--json", "gc"]).ok().json();
    assert_eq!(
        u(&g, "/packs_deleted"),
        0,
        "gc deleted packs a running backup reuses: {g}"
    );
    assert!(u(&g, "/packs_deferred") > 0, "{g}");
    fs::write(&flag, b"go").unwrap();
    let out = backup.wait_with_output().unwrap();
    assert!(out.status.success());
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        u(&m, "/stats/new_chunks"),
        0,
        "the backup reused every chunk"
    );
    // The committed backup is whole, and stays whole through the gc that follows.
    restore_equals(&repo, "vm1", &base);
    let g = repo.run(&["--json", "gc"]).ok().json();
    assert_eq!(u(&g, "/packs_deleted"), 0, "{g}");
    assert!(u(&g, "/blobs_restored") > 0, "{g}");
    assert_eq!(
        repo.run(&["--json", "verify"]).ok().json()["damaged"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    restore_equals(&repo, "vm1", &base);
}

#[test]
fn mostly_dead_packs_are_rewritten() {
    let repo = Repo::new();
    let a = random_bytes(7, 24 << 20);
    let mut b = a[..(4 << 20)].to_vec();
    b.extend(random_bytes(8, 8 << 20));
    let (ia, ib) = (repo.tmp("a.img"), repo.tmp("b.img"));
    fs::write(&ia, &a).unwrap();
    fs::write(&ib, &b).unwrap();
    let ma = repo.backup("vm-a", &[("root", &ia)]);
    repo.backup("vm-b", &[("root", &ib)]);
    repo.run(&["forget", &format!("vm-a@{}", ma["id"].as_str().unwrap())])
        .ok();
    let g = repo.run(&["--json", "gc"]).ok().json();
    assert!(u(&g, "/packs_rewritten") >= 1, "{g}");
    assert!(u(&g, "/bytes_freed") >= 16 << 20, "{g}");
    assert_eq!(
        repo.run(&["--json", "verify"]).ok().json()["damaged"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    restore_equals(&repo, "vm-b", &ib);
}

/// The segment memo: a second full read of unchanged bytes takes every data segment's list
/// from the memo; once gc has deleted those lists, the memo is ignored and the backup cuts and
/// stores the data again, and both restore byte-identical.
#[test]
fn segment_memo_skips_known_segments_and_is_ignored_after_gc() {
    let repo = Repo::new();
    let img = repo.tmp("memo.img");
    let mut data = random_bytes(7, 24 << 20);
    data[8 << 20..12 << 20].fill(0); // one all-zero segment: no memo, no list
    fs::write(&img, &data).unwrap();
    let first = repo.backup("vm1", &[("root", &img)]);
    assert_eq!(u(&first, "/stats/memo_segments"), 0);
    let second = repo.backup("vm1", &[("root", &img)]);
    assert_eq!(u(&second, "/stats/memo_segments"), 5, "{second}");
    assert_eq!(u(&second, "/stats/new_chunks"), 0);
    assert_eq!(
        u(&second, "/stats/data_bytes"),
        u(&first, "/stats/data_bytes")
    );
    restore_equals(
        &repo,
        &format!("vm1@{}", second["id"].as_str().unwrap()),
        &img,
    );

    for b in [&first, &second] {
        repo.run(&["forget", &format!("vm1@{}", b["id"].as_str().unwrap())])
            .ok();
    }
    repo.run(&["gc"]).ok();
    let third = repo.backup("vm1", &[("root", &img)]);
    assert_eq!(
        u(&third, "/stats/memo_segments"),
        0,
        "a memo entry outlived its segment list: {third}"
    );
    assert!(u(&third, "/stats/new_raw_bytes") >= 20 << 20, "{third}");
    assert_eq!(
        repo.run(&["--json", "verify"]).ok().json()["damaged"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    restore_equals(&repo, "vm1", &img);
}
