//! End to end on real GPT disk images: back up, change, back up again, restore byte-identical,
//! and dedup that stores only a small fraction of later backups.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;

#[test]
fn backup_restore_dedup_on_real_disks() {
    let d = disks();
    let repo = Repo::new();
    let (base, second, nextday) = (
        d.join("base.img"),
        d.join("second.img"),
        d.join("nextday.img"),
    );

    let b1 = repo.backup("vm-a", &[("root", &base)]);
    let size = u(&b1, "/stats/logical_bytes");
    assert_eq!(size, 256 << 20);
    let first_stored = u(&b1, "/stats/new_stored_bytes");
    assert!(
        first_stored > 1 << 20 && first_stored < u(&b1, "/stats/data_bytes"),
        "compression must help on real files: {b1}"
    );

    // A second VM sharing much of the first: only a small fraction is new.
    let b2 = repo.backup("vm-b", &[("root", &second)]);
    let new2 = u(&b2, "/stats/new_raw_bytes");
    assert!(
        new2 * 3 < u(&b2, "/stats/data_bytes"),
        "second VM should mostly dedupe: {b2}"
    );

    // The next day: scattered changes store a small fraction.
    let b3 = repo.backup("vm-a", &[("root", &nextday)]);
    let new3 = u(&b3, "/stats/new_raw_bytes");
    assert!(
        new3 * 5 < u(&b3, "/stats/data_bytes"),
        "next-day backup should store little: {b3}"
    );
    assert!(u(&b3, "/stats/reused_chunks") > 0);

    // Every backup restores byte-identical, from a sparse file.
    for (spec, original) in [
        (format!("vm-a@{}", b1["id"].as_str().unwrap()), &base),
        ("vm-b".to_string(), &second),
        ("vm-a@latest".to_string(), &nextday),
    ] {
        let out = repo.tmp("restored.img");
        let _ = std::fs::remove_file(&out);
        repo.run(&[
            "restore",
            &spec,
            "--disk",
            "root",
            "--to",
            out.to_str().unwrap(),
        ])
        .ok();
        assert_same(&out, original);
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&out).unwrap();
        assert!(
            m.blocks() * 512 < m.len() / 2,
            "restore must be sparse ({} of {} bytes allocated)",
            m.blocks() * 512,
            m.len()
        );
    }

    // Listing and showing.
    let list = repo.run(&["--json", "backups"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 3);
    let text = repo.run(&["backups", "vm-a"]).ok().stdout;
    assert!(
        text.contains(b1["id"].as_str().unwrap()) && text.contains(b3["id"].as_str().unwrap()),
        "{text}"
    );
    let shown = repo
        .run(&[
            "--json",
            "show",
            &format!("vm-a@{}", &b3["id"].as_str().unwrap()[..18]),
        ])
        .ok()
        .json();
    assert_eq!(shown["id"], b3["id"]);

    // Stats add up and verify is clean.
    let st = repo.run(&["--json", "stats"]).ok().json();
    assert_eq!(u(&st, "/backups"), 3);
    assert!(st["dedup_ratio"].as_f64().unwrap() > 1.5, "{st}");
    assert!(st["cost_per_month"].as_f64().unwrap() > 0.0);
    let v = repo.run(&["--json", "verify"]).ok().json();
    assert_eq!(v["damaged"].as_array().unwrap().len(), 0);
    assert!(u(&v, "/chunks_checked") > 100);
}

#[test]
fn several_disks_in_one_backup_and_restore_to_an_existing_file() {
    let d = disks();
    let repo = Repo::new();
    let m = repo.backup(
        "db-1",
        &[("os", &d.join("base.img")), ("data", &d.join("second.img"))],
    );
    assert_eq!(m["disks"].as_array().unwrap().len(), 2);
    let out = repo.tmp("data.img");
    std::fs::write(&out, b"old").unwrap();
    let r = repo.run(&[
        "restore",
        "db-1",
        "--disk",
        "data",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(r.err().contains("exists; pass --force"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"old",
        "a refused restore leaves the file alone"
    );
    repo.run(&[
        "restore",
        "db-1",
        "--disk",
        "data",
        "--to",
        out.to_str().unwrap(),
        "--force",
    ])
    .ok();
    assert_same(&out, &d.join("second.img"));
    let r = repo.run(&["restore", "db-1", "--to", out.to_str().unwrap(), "--force"]);
    assert!(
        r.err()
            .contains("several disks (os, data); choose one with --disk"),
        "{}",
        r.stderr
    );
}

#[test]
fn catalog_rebuild_from_the_store_alone_and_sampled_verify() {
    let d = disks();
    let repo = Repo::new();
    repo.backup("vm-a", &[("root", &d.join("base.img"))]);
    repo.backup("vm-a", &[("root", &d.join("nextday.img"))]);
    repo.backup("vm-b", &[("root", &d.join("second.img"))]);
    let before = repo.run(&["--json", "backups"]).ok().json();
    let stats_before = repo.run(&["--json", "stats"]).ok().json();
    std::fs::remove_dir_all(repo.path().join("catalog")).unwrap();
    let r = repo.run(&["--json", "catalog", "rebuild"]).ok().json();
    assert_eq!(u(&r, "/backups_added"), 3);
    assert_eq!(repo.run(&["--json", "backups"]).ok().json(), before);
    let stats_after = repo.run(&["--json", "stats"]).ok().json();
    for k in ["/chunks", "/packs", "/stored_bytes", "/unique_bytes"] {
        assert_eq!(u(&stats_after, k), u(&stats_before, k), "{k}");
    }
    let v = repo
        .run(&["--json", "verify", "vm-a", "--sample", "10"])
        .ok()
        .json();
    assert!(u(&v, "/chunks_checked") < u(&v, "/chunks_total") / 4, "{v}");
    assert_eq!(u(&v, "/backups"), 2);
    let out = repo.tmp("b.img");
    repo.run(&["restore", "vm-b", "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &d.join("second.img"));
}
