//! Crashes at any moment leave earlier backups intact and verify clean; a re-run completes and
//! reuses what was stored. A flipped byte is found by verify (backup, disk and offset) and makes
//! restore fail without writing wrong bytes.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::*;
use std::fs;
use std::path::Path;

/// A deterministic incompressible image of `mib` MiB with a hole in the middle.
fn random_image(path: &Path, mib: u64, seed: u64) {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    let mut xof = h.finalize_xof();
    let mut f = fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    use std::io::{Seek, SeekFrom, Write};
    for i in 0..mib {
        if i == mib / 2 {
            f.seek(SeekFrom::Current(1 << 20)).unwrap();
            continue;
        }
        xof.fill(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.set_len(mib << 20).unwrap();
}

fn backups(repo: &Repo) -> usize {
    repo.run(&["--json", "backups"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn crashes_leave_earlier_backups_intact_and_reruns_reuse_what_was_stored() {
    let d = disks();
    let repo = Repo::new();
    let b0 = repo.backup("vm1", &[("root", &d.join("base.img"))]);
    let img = repo.tmp("random.img");
    random_image(&img, 72, 1);
    let disk = format!("root={}", img.display());
    for n in ["1", "3"] {
        let r = repo.run_env(
            &["backup", "vm1", "--disk", &disk],
            &[("HOLDFAST_TEST_CRASH_AFTER_PACKS", n)],
        );
        assert!(r.code != 0, "the backup must have been aborted");
        assert_eq!(backups(&repo), 1, "an aborted backup is not visible");
        repo.run(&["verify"]).ok();
    }
    // Real kill -9 at several moments.
    for (i, ms) in [150u64, 600, 1500].iter().enumerate() {
        let img2 = repo.tmp(&format!("kill{i}.img"));
        random_image(&img2, 40, 10 + i as u64);
        let mut child = repo
            .cmd(&[
                "backup",
                "vm2",
                "--disk",
                &format!("root={}", img2.display()),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(*ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let v = repo.run(&["--json", "verify"]).ok().json();
        assert_eq!(
            v["damaged"].as_array().unwrap().len(),
            0,
            "after kill at {ms} ms ({status:?})"
        );
    }
    let b1 = repo.backup("vm1", &[("root", &img)]);
    let data = u(&b1, "/stats/data_bytes");
    let new = u(&b1, "/stats/new_raw_bytes");
    assert!(
        new + (40 << 20) < data,
        "the re-run must reuse the >= 3 packs the crashed runs stored: new {new} of {data}"
    );
    let out = repo.tmp("out.img");
    repo.run(&["restore", "vm1", "--to", out.to_str().unwrap()])
        .ok();
    assert_same(&out, &img);
    let out0 = repo.tmp("out0.img");
    repo.run(&[
        "restore",
        &format!("vm1@{}", b0["id"].as_str().unwrap()),
        "--to",
        out0.to_str().unwrap(),
    ])
    .ok();
    assert_same(&out0, &d.join("base.img"));
}

/// (offset, stored_len) of the first chunk blob in a pack, from its footer.
fn first_chunk_in_pack(pack: &[u8]) -> (usize, usize) {
    let n = pack.len();
    let entries_len = u32::from_le_bytes(pack[n - 44..n - 40].try_into().unwrap()) as usize;
    let table = &pack[n - 44 - entries_len..n - 44];
    for e in table.chunks_exact(50) {
        if e[32] == 0 {
            let off = u64::from_le_bytes(e[34..42].try_into().unwrap()) as usize;
            let len = u32::from_le_bytes(e[42..46].try_into().unwrap()) as usize;
            return (off, len);
        }
    }
    panic!("no chunk in pack");
}

#[test]
fn a_flipped_byte_is_found_and_never_restored() {
    let d = disks();
    let repo = Repo::new();
    let base = d.join("base.img");
    let m = repo.backup("vm1", &[("root", &base)]);
    let id = m["id"].as_str().unwrap();
    let packs: Vec<_> = walk(&repo.path().join("packs"));
    let pack = packs
        .iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(pack).unwrap();
    let (off, len) = first_chunk_in_pack(&bytes);
    bytes[off + len / 2] ^= 0x01;
    fs::write(pack, &bytes).unwrap();

    let r = repo.run(&["--json", "verify"]);
    assert_eq!(r.code, 3, "verify exits 3 on damage: {}", r.stderr);
    let v = r.json();
    let dmg = &v["damaged"][0];
    assert_eq!(dmg["kind"], "chunk");
    let a = &dmg["affects"][0];
    assert_eq!(
        (a["vm"].as_str(), a["backup"].as_str(), a["disk"].as_str()),
        (Some("vm1"), Some(id), Some("root"))
    );
    // The reported range really is where that chunk sits on the disk: its keyed hash matches.
    let cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(repo.path().join("config")).unwrap()).unwrap();
    let key: [u8; 32] = hex_to_key(cfg["id_key"].as_str().unwrap());
    let img = fs::read(&base).unwrap();
    let (o, l) = (u(a, "/offset") as usize, u(a, "/len") as usize);
    assert_eq!(
        blake3::keyed_hash(&key, &img[o..o + l]).to_hex().as_str(),
        dmg["blob"].as_str().unwrap()
    );
    let text = repo.run(&["verify"]);
    assert!(
        text.stderr
            .contains(&format!("affects vm1@{id} disk root bytes {o}..{}", o + l)),
        "{}",
        text.stderr
    );

    let out = repo.tmp("restored.img");
    let r = repo.run(&["restore", "vm1", "--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 3);
    assert!(
        r.err().contains("damaged data") && r.err().contains(&format!("disk offset {o}")),
        "{}",
        r.stderr
    );
    assert!(!out.exists(), "a failed restore leaves no file");
    assert!(fs::read_dir(repo.dir.path())
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().contains("holdfast-partial")));
}

fn hex_to_key(h: &str) -> [u8; 32] {
    let mut k = [0u8; 32];
    for i in 0..32 {
        k[i] = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap();
    }
    k
}

/// A pack cut short (its footer lost): a rebuild salvages its intact blobs by their headers,
/// and verify then names only the blobs truly lost, the same ones it named before the rebuild.
#[test]
fn a_truncated_pack_keeps_its_intact_blobs_through_a_rebuild() {
    let repo = Repo::new();
    let img = repo.tmp("big.img");
    random_image(&img, 40, 7);
    repo.backup("vm1", &[("root", &img)]);
    let pack = walk(&repo.path().join("packs"))
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len * 6 / 10)
        .unwrap();
    let damaged = |v: &serde_json::Value| -> Vec<String> {
        let mut d: Vec<String> = v["damaged"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["blob"].as_str().unwrap().to_string())
            .collect();
        d.sort();
        d
    };
    let r = repo.run(&["--json", "verify"]);
    assert_eq!(r.code, 3);
    let lost = damaged(&r.json());
    assert!(!lost.is_empty(), "the cut loses the blobs past it");
    let r = repo.run(&["catalog", "rebuild"]);
    assert_eq!(
        r.code, 3,
        "a rebuild that salvaged a pack says so: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("salvaged") && r.stderr.contains("intact blob(s)"),
        "{}",
        r.stderr
    );
    let r = repo.run(&["--json", "verify"]);
    assert_eq!(r.code, 3);
    assert_eq!(damaged(&r.json()), lost, "only the blobs truly lost");
    // What is intact still restores where it is not cut: verify's ranges name the rest.
    assert!(r.json()["chunks_total"].as_u64().unwrap() > lost.len() as u64 * 2);
}
