//! Damage is named, never turned into loss (issue 15, items 1–3): a damaged manifest, a
//! manifest gone from the store, a catalog whose CURRENT file is gone.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};

/// `mib` MiB of incompressible bytes from `seed`.
fn image(path: &Path, mib: usize, seed: u8) {
    let mut data = vec![0u8; mib << 20];
    let mut h = blake3::Hasher::new();
    h.update(&[seed]);
    h.finalize_xof().fill(&mut data);
    fs::write(path, data).unwrap();
}

/// Two VMs with nothing in common: (repo, vm1's image, vm1's backup id).
fn two_vms() -> (Repo, PathBuf, String) {
    let repo = Repo::new();
    let (a, b) = (repo.tmp("a.img"), repo.tmp("b.img"));
    image(&a, 24, 1);
    image(&b, 8, 2);
    let m = repo.backup("vm1", &[("root", &a)]);
    repo.backup("vm2", &[("root", &b)]);
    (repo, a, m["id"].as_str().unwrap().to_string())
}

fn stored(repo: &Repo) -> u64 {
    u(&repo.run(&["--json", "stats"]).ok().json(), "/stored_bytes")
}

fn manifest(repo: &Repo, id: &str) -> PathBuf {
    repo.path().join("backups/vm1").join(id)
}

fn restores_identically(repo: &Repo, spec: &str, expected: &Path) {
    let out = repo.tmp("restored.img");
    let _ = fs::remove_file(&out);
    repo.run(&["restore", spec, "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, expected);
}

#[test]
fn a_damaged_manifest_is_named_repaired_or_removed_on_purpose_never_lost_to_gc() {
    let (repo, a, id) = two_vms();
    let spec = format!("vm1@{id}");
    let good = fs::read(manifest(&repo, &id)).unwrap();
    fs::write(manifest(&repo, &id), &good[..300]).unwrap();

    // verify reads every manifest in the store and names the damaged one (exit 3).
    let r = repo.run(&["--json", "verify"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let d = &r.json()["damaged_manifests"][0];
    assert_eq!(d["backup"], spec.as_str());
    assert_eq!(d["repairable"], true, "the catalog holds a good copy");
    let text = repo.run(&["verify"]);
    assert_eq!(text.code, 3);
    assert!(
        text.stderr.contains(&format!("DAMAGED manifest of {spec}"))
            && text.stderr.contains("verify --repair"),
        "{}",
        text.stderr
    );
    assert!(
        text.stdout.contains("1 damaged manifest(s)"),
        "{}",
        text.stdout
    );
    // gc deletes nothing while the store holds a manifest it cannot read.
    let before = stored(&repo);
    repo.run(&["forget", &format!("vm2@{}", first_id(&repo, "vm2"))])
        .ok();
    let r = repo.run(&["--json", "gc"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.json()["error"]["code"], "damaged");
    assert!(r.err().contains(&spec), "{}", r.stderr);
    assert_eq!(stored(&repo), before, "gc deleted nothing");
    // --repair writes the catalog's copy back.
    let r = repo.run(&["--json", "verify", "--repair"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["damaged_manifests"][0]["repaired"], true);
    assert_eq!(fs::read(manifest(&repo, &id)).unwrap(), good);
    repo.run(&["verify"]).ok();

    // Damaged again, and the catalog rebuilt from the store alone: rebuild says what it
    // skipped and exits 3; the backup is not silently gone: verify names it, gc refuses.
    fs::write(manifest(&repo, &id), &good[..300]).unwrap();
    let r = repo.run(&["catalog", "rebuild"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("manifest backups/vm1/{id} is damaged")),
        "{}",
        r.stderr
    );
    let r = repo.run(&["--json", "verify"]);
    assert_eq!(r.code, 3);
    assert_eq!(r.json()["damaged_manifests"][0]["repairable"], false);
    let r = repo.run(&["gc"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(stored(&repo), before, "still nothing deleted");
    // Every command says so; a plain forget points at --damaged, which says what is lost.
    let r = repo.run(&["backups"]);
    assert!(
        r.stderr.contains("its manifest in the store is damaged"),
        "{}",
        r.stderr
    );
    let r = repo.run(&["forget", &spec]);
    assert!(r.err().contains("--damaged"), "{}", r.stderr);
    let r = repo.run(&["forget", &spec, "--damaged"]).ok();
    assert!(r.stdout.contains("that backup is lost"), "{}", r.stdout);
    assert!(!manifest(&repo, &id).exists());
    // Now gc runs, and frees what only the lost backup (and the forgotten vm2) used.
    repo.run(&["gc"]).ok();
    assert!(stored(&repo) < before / 2, "{} of {before}", stored(&repo));
    let _ = a;
}

fn first_id(repo: &Repo, vm: &str) -> String {
    let l = repo.run(&["--json", "backups", vm]).ok().json();
    l[0]["id"].as_str().unwrap().to_string()
}

#[test]
fn a_manifest_gone_from_the_store_is_reported_and_its_backup_kept() {
    let (repo, a, id) = two_vms();
    let spec = format!("vm1@{id}");
    let good = fs::read(manifest(&repo, &id)).unwrap();
    fs::remove_file(manifest(&repo, &id)).unwrap();
    // The next command says so, and the backup is still there.
    let r = repo.run(&["--json", "backups"]).ok();
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    assert!(
        r.stderr
            .contains(&format!("backup {spec}: its manifest is gone")),
        "{}",
        r.stderr
    );
    // verify names it (exit 3); gc keeps it, and its data.
    let r = repo.run(&["--json", "verify"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.json()["missing_manifests"][0], spec.as_str());
    let g = repo.run(&["--json", "gc"]).ok().json();
    assert_eq!(g["missing_kept"][0], spec.as_str());
    assert_eq!(g["bytes_freed"], 0);
    restores_identically(&repo, &spec, &a);
    // --repair writes the catalog's copy back.
    let r = repo.run(&["--json", "verify", "--repair"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(fs::read(manifest(&repo, &id)).unwrap(), good);
    // Gone again: only gc --accept-missing lets it go.
    fs::remove_file(manifest(&repo, &id)).unwrap();
    let before = stored(&repo);
    let g = repo.run(&["--json", "gc", "--accept-missing"]).ok().json();
    assert_eq!(g["missing_dropped"][0], spec.as_str());
    assert!(u(&g, "/bytes_freed") > 0, "{g}");
    assert!(stored(&repo) < before);
    let r = repo.run(&["--json", "backups", "vm1"]);
    assert_eq!(r.json()["error"]["code"], "not-found");
    repo.run(&["verify"]).ok();
}

#[test]
fn a_lost_catalog_is_an_error_pointing_at_rebuild_never_an_empty_catalog() {
    let (repo, a, id) = two_vms();
    fs::remove_file(repo.path().join("catalog/CURRENT")).unwrap();
    for _ in 0..2 {
        let r = repo.run(&["--json", "backups"]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert_eq!(r.json()["error"]["code"], "catalog");
        assert!(r.err().contains("holdfast catalog rebuild"), "{}", r.stderr);
    }
    let r = repo.run(&["gc"]);
    assert!(r.err().contains("catalog"), "{}", r.stderr);
    repo.run(&["catalog", "rebuild"]).ok();
    assert_eq!(
        repo.run(&["--json", "backups"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    restores_identically(&repo, &format!("vm1@{id}"), &a);
}
