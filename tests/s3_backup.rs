//! Backups in an S3 bucket end to end, with the holdfast binary against a real S3 server
//! (s3s-fs on loopback): backup, restore, verify, stats, the read cache, multipart uploads,
//! rebuilding the catalog from the bucket alone, and the server failing under a backup.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::s3::{self, S3Server};
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `len` bytes of seeded noise (incompressible, no duplicate chunks).
fn noise(path: &Path, len: u64, seed: u64) -> PathBuf {
    let mut x = blake3::Hasher::new();
    x.update(&seed.to_le_bytes());
    let mut r = x.finalize_xof();
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        r.fill(&mut buf[..n]);
        std::io::Write::write_all(&mut f, &buf[..n]).unwrap();
        left -= n as u64;
    }
    path.to_path_buf()
}

fn restore_same(repo: &Repo, spec: &str, disk: &str, original: &Path) {
    let out = repo.tmp("restored.img");
    let _ = std::fs::remove_file(&out);
    repo.run(&[
        "restore",
        spec,
        "--disk",
        disk,
        "--to",
        out.to_str().unwrap(),
    ])
    .ok();
    assert_same(&out, original);
}

fn requests(repo: &Repo) -> serde_json::Value {
    repo.run(&["--json", "stats"]).ok().json()["s3_requests"].clone()
}

#[test]
fn backup_restore_verify_and_stats_in_a_bucket() {
    let d = disks();
    let srv = S3Server::start();
    let repo = Repo::new_s3(&srv.endpoint(), "fleet", &["--cache-size", "1G"]);
    assert!(
        repo.path().join("store.json").exists() && !repo.path().join("packs").exists(),
        "the store lives in the bucket"
    );
    let (base, second, nextday) = (
        d.join("base.img"),
        d.join("second.img"),
        d.join("nextday.img"),
    );

    let b1 = repo.backup("vm-a", &[("root", &base)]);
    let b2 = repo.backup("vm-b", &[("root", &second)]);
    let b3 = repo.backup("vm-a", &[("root", &nextday)]);
    assert!(
        u(&b3, "/stats/new_raw_bytes") * 5 < u(&b3, "/stats/data_bytes"),
        "dedup works the same in a bucket: {b3}"
    );
    for b in [&b1, &b2, &b3] {
        let r = &b["stats"]["store_requests"];
        assert!(
            u(r, "/put") >= 1 && u(r, "/bytes_up") >= u(b, "/stats/new_stored_bytes"),
            "{b}"
        );
    }
    // The bucket holds the same layout as a local store.
    let packs = srv.objects("fleet/packs/");
    assert!(!packs.is_empty());
    assert_eq!(srv.objects("fleet/backups/").len(), 3);
    assert_eq!(srv.objects("fleet/config"), vec!["fleet/config"]);

    // Restores are byte-identical; a second restore comes from the read cache.
    restore_same(
        &repo,
        &format!("vm-a@{}", b1["id"].as_str().unwrap()),
        "root",
        &base,
    );
    restore_same(&repo, "vm-b", "root", &second);
    let before = requests(&repo);
    restore_same(&repo, "vm-a", "root", &nextday);
    let mid = requests(&repo);
    restore_same(&repo, "vm-a", "root", &nextday);
    let after = requests(&repo);
    let first_gets = u(&mid, "/get") - u(&before, "/get");
    let again_gets = u(&after, "/get") - u(&mid, "/get");
    assert!(
        first_gets > 5,
        "the first restore fetches from the bucket: {first_gets}"
    );
    // One GET is the store's copy of the manifest, checked before every restore.
    assert!(
        again_gets <= 3,
        "the second restore must come from the cache, made {again_gets} GETs"
    );
    let cached: u64 = walk(&repo.path().join("cache"))
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();
    assert!(
        cached > 1 << 20 && cached <= 1 << 30,
        "cache holds {cached} bytes within its 1 GiB budget"
    );

    // Verify reads the bucket itself (not the cache) and is clean.
    let v = repo.run(&["--json", "verify"]).ok().json();
    assert_eq!(v["damaged"].as_array().unwrap().len(), 0, "{v}");
    assert!(u(&v, "/chunks_checked") > 100);

    // Large new data: packs go up in few PUTs (target: at most 100 per GB), as multipart
    // uploads when the threshold says so.
    let big = noise(&repo.tmp("noise.img"), 160 << 20, 1);
    let b = repo.backup("vm-c", &[("data", &big)]);
    let puts = u(&b, "/stats/store_requests/put") as f64;
    let per_gb = puts / (u(&b, "/stats/new_raw_bytes") as f64 / 1e9);
    assert!(per_gb <= 100.0, "{per_gb:.1} PUTs per GB of new data: {b}");
    let big2 = noise(&repo.tmp("noise2.img"), 40 << 20, 2);
    let m = repo
        .run_env(
            &[
                "--json",
                "backup",
                "vm-d",
                "--disk",
                &format!("data={}", big2.display()),
            ],
            &[
                ("HOLDFAST_S3_MULTIPART_THRESHOLD", "5242880"),
                ("HOLDFAST_S3_PART_SIZE", "5242880"),
            ],
        )
        .ok()
        .json();
    let (put, packs) = (
        u(&m, "/stats/store_requests/put"),
        u(&m, "/stats/packs_written"),
    );
    assert!(
        put >= packs * 4,
        "16 MiB packs in 5 MiB parts: {put} PUT-type requests for {packs} packs"
    );
    restore_same(&repo, "vm-d", "data", &big2);
    restore_same(&repo, "vm-c", "data", &big);

    let st = repo.run(&["stats"]).ok().stdout;
    assert!(
        st.contains("store            s3://bkt/fleet")
            && st.contains("S3 requests")
            && st.contains("PUT ·")
            && st.contains("backup PUTs"),
        "{st}"
    );
    let j = repo.run(&["--json", "stats"]).ok().json();
    // The figure over all backups (vm-d's forced 5 MiB parts included) is what the manifests say.
    let all = repo.run(&["--json", "backups"]).ok().json();
    let (puts, new): (u64, u64) = all.as_array().unwrap().iter().fold((0, 0), |(p, n), b| {
        (
            p + u(b, "/stats/store_requests/put"),
            n + u(b, "/stats/new_raw_bytes"),
        )
    });
    let want = puts as f64 / (new as f64 / 1e9);
    assert!(
        (j["backup_puts_per_gb"].as_f64().unwrap() - want).abs() < 1e-6,
        "{j} vs {want}"
    );
    assert!(u(&j, "/s3_requests/bytes_down") > 100 << 20, "{j}");
}

#[test]
fn the_catalog_rebuilds_from_the_bucket_alone() {
    let d = disks();
    let srv = S3Server::start();
    let repo = Repo::new_s3(&srv.endpoint(), "site1", &[]);
    let (base, second, nextday) = (
        d.join("base.img"),
        d.join("second.img"),
        d.join("nextday.img"),
    );
    repo.backup("vm-a", &[("root", &base), ("data", &second)]);
    repo.backup("vm-b", &[("root", &nextday)]);
    repo.backup("vm-a", &[("root", &nextday), ("data", &second)]);
    let list = |r: &Repo| r.run(&["--json", "backups"]).ok().json();
    let before = list(&repo);
    let check_all = |r: &Repo| {
        assert_eq!(list(r), before);
        let v = r.run(&["--json", "verify"]).ok().json();
        assert_eq!(v["damaged"].as_array().unwrap().len(), 0, "{v}");
        for b in before.as_array().unwrap() {
            let spec = format!(
                "{}@{}",
                b["vm"].as_str().unwrap(),
                b["id"].as_str().unwrap()
            );
            for disk in b["disks"].as_array().unwrap() {
                let name = disk["name"].as_str().unwrap();
                restore_same(r, &spec, name, Path::new(disk["source"].as_str().unwrap()));
            }
        }
    };

    // Throw the catalog (and the cache) away and rebuild it from the bucket.
    std::fs::remove_dir_all(repo.path().join("catalog")).unwrap();
    std::fs::remove_dir_all(repo.path().join("cache")).unwrap();
    let r = repo.run(&["--json", "catalog", "rebuild"]).ok().json();
    assert_eq!(u(&r, "/backups_added"), 3, "{r}");
    check_all(&repo);

    // A new appliance attaches to the same bucket: everything is there.
    let other = Repo {
        dir: tempfile::tempdir().unwrap(),
        env: s3::env(),
    };
    let url = format!("s3://{}/site1", s3::BUCKET);
    let e = other.run(&[
        "init",
        "--s3",
        &url,
        "--endpoint",
        &srv.endpoint(),
        "--path-style",
        "--encryption",
        "none",
    ]);
    assert!(e.err().contains("already holds a holdfast repository; attach to it with `holdfast init --s3 s3://bkt/site1 --existing`"), "{}", e.stderr);
    assert!(!other.path().exists(), "a refused init writes nothing");
    let ep = srv.endpoint();
    let mut attach = vec![
        "init",
        "--s3",
        &url,
        "--endpoint",
        &ep,
        "--path-style",
        "--existing",
    ];
    // An encrypted suite run: the new appliance brings the key file's paper copy.
    let key = repo.tmp("paper-key");
    if common::test_encryption() == "keyfile" {
        let e = other.run(&attach);
        assert_eq!(e.code, 1, "{}", e.stderr);
        assert!(e.err().contains("--key-file"), "{}", e.stderr);
        assert!(!other.path().exists(), "a refused attach writes nothing");
        let text = repo.run(&["key", "export"]).ok().stdout;
        std::fs::write(&key, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        attach.extend(["--key-file", key.to_str().unwrap()]);
    }
    other.run(&attach).ok();
    check_all(&other);
    // It can back up on top; the first appliance sees it after its next sync.
    other.backup("vm-b", &[("root", &base)]);
    assert_eq!(list(&repo).as_array().unwrap().len(), 4);
}

#[test]
fn a_server_that_stops_mid_backup_fails_it_cleanly_and_the_rerun_uploads_only_the_rest() {
    let mut srv = S3Server::start();
    let repo = Repo::new_s3(&srv.endpoint(), "flaky", &[]);
    let disk = noise(&repo.tmp("disk.img"), 256 << 20, 7);
    let mut child = repo
        .cmd(&[
            "--json",
            "backup",
            "vm",
            "--disk",
            &format!("root={}", disk.display()),
        ])
        .env("HOLDFAST_S3_ATTEMPTS", "3")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stop the server once the first packs have landed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while srv.objects("flaky/packs/").len() < 2 {
        assert!(Instant::now() < deadline, "no pack arrived within a minute");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before the server was stopped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    srv.stop();
    let stopped = Instant::now();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert!(
        err.contains(&format!("cannot reach the S3 endpoint {}", srv.endpoint())),
        "{err}"
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(60),
        "retries are bounded"
    );
    let landed = srv.objects("flaky/packs/").len();
    assert!(landed < 17, "the backup was cut short ({landed} packs)");

    srv.restart();
    assert!(
        srv.objects("flaky/backups/").is_empty(),
        "nothing committed"
    );
    assert_eq!(
        repo.run(&["--json", "backups"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let m = repo.backup("vm", &[("root", &disk)]);
    let new = u(&m, "/stats/new_raw_bytes");
    let data = u(&m, "/stats/data_bytes");
    assert!(
        new < data,
        "the rerun re-uploads only what is missing ({new} of {data})"
    );
    assert!(u(&m, "/stats/reused_chunks") > 0);
    // No chunk is stored twice: the bucket's chunk bytes equal the disk's.
    let st = repo.run(&["--json", "stats"]).ok().json();
    assert_eq!(u(&st, "/unique_bytes"), data, "{st}");
    assert!(u(&st, "/chunk_stored_bytes") < data + data / 50, "{st}");
    restore_same(&repo, "vm", "root", &disk);
}

#[test]
fn wrong_credentials_a_missing_bucket_or_no_server_fail_at_init_and_at_backup_start() {
    let srv = S3Server::start();
    let url = format!("s3://{}/p", s3::BUCKET);
    let try_init_code = |endpoint: &str, url: &str, env: &[(&str, &str)], code: i32| {
        let r = Repo {
            dir: tempfile::tempdir().unwrap(),
            env: s3::env(),
        };
        let out = r.run_env(
            &[
                "init",
                "--s3",
                url,
                "--endpoint",
                endpoint,
                "--path-style",
                "--encryption",
                "none",
            ],
            env,
        );
        let e = out.err().to_string();
        assert_eq!(out.code, code, "{e}");
        assert!(!r.path().exists(), "a failed init leaves nothing: {e}");
        e
    };
    let try_init =
        |endpoint: &str, url: &str, env: &[(&str, &str)]| try_init_code(endpoint, url, env, 1);
    let e = try_init(&srv.endpoint(), &url, &[("AWS_SECRET_ACCESS_KEY", "wrong")]);
    assert!(
        e.contains("access denied by http://127.0.0.1:") && e.contains("check the credentials"),
        "{e}"
    );
    let e = try_init(&srv.endpoint(), "s3://missing-bucket/p", &[]);
    assert!(
        e.contains("bucket missing-bucket does not exist at http://127.0.0.1:")
            && e.contains("create it first"),
        "{e}"
    );
    let dead = format!("http://127.0.0.1:{}", s3::free_port());
    let e = try_init(&dead, &url, &[("HOLDFAST_S3_ATTEMPTS", "2")]);
    assert!(
        e.contains(&format!("cannot reach the S3 endpoint {dead}")),
        "{e}"
    );
    let e = try_init_code(&srv.endpoint(), "s3://Bad_Bucket/p", &[], 2);
    assert!(e.contains("is not a valid bucket name"), "{e}");

    // At the start of a backup, before the disk is read: the error comes at once even for a
    // disk that would take long to read.
    let mut srv = srv;
    let repo = Repo::new_s3(&srv.endpoint(), "p", &[]);
    let disk = noise(&repo.tmp("disk.img"), 64 << 20, 3);
    let arg = format!("root={}", disk.display());
    let r = repo.run_env(
        &["backup", "vm", "--disk", &arg],
        &[("AWS_SECRET_ACCESS_KEY", "wrong")],
    );
    assert!(
        r.err().contains("access denied") && r.err().contains("check the credentials"),
        "{}",
        r.stderr
    );
    srv.stop();
    let t = Instant::now();
    let r = repo.run_env(
        &["backup", "vm", "--disk", &arg],
        &[("HOLDFAST_S3_ATTEMPTS", "2")],
    );
    assert!(
        r.err().contains("cannot reach the S3 endpoint"),
        "{}",
        r.stderr
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    srv.restart();
    assert_eq!(
        repo.run(&["--json", "backups"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        0,
        "nothing committed"
    );
    repo.backup("vm", &[("root", &disk)]);
}

/// No credentials anywhere: the error names what to set, and holdfast never asked the EC2
/// instance metadata service (a listener standing in for it sees no connection). A bucket
/// that is gone is named as a missing bucket, not as "not a holdfast repository".
#[test]
fn missing_credentials_and_buckets_are_named_and_imds_is_never_asked() {
    let srv = S3Server::start();
    let repo = Repo::new_s3(&srv.endpoint(), "creds", &[]);
    let imds = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    imds.set_nonblocking(true).unwrap();
    let imds_url = format!("http://{}", imds.local_addr().unwrap());
    let home = tempfile::tempdir().unwrap();
    let mut c = repo.cmd(&["--json", "backups"]);
    for (k, _) in s3::env() {
        c.env_remove(k);
    }
    c.env("HOME", home.path())
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds_url)
        .env("AWS_CONFIG_FILE", home.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.path().join("none"))
        .env("HOLDFAST_S3_ATTEMPTS", "1");
    let t = Instant::now();
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(
        imds.accept().is_err(),
        "holdfast connected to the instance metadata service"
    );
    // The bucket deleted: named as such.
    let gone = Repo::new_s3(&srv.endpoint(), "gone", &[]);
    std::fs::write(
        gone.path().join("store.json"),
        format!(
            r#"{{"s3":{{"bucket":"no-such-bucket","prefix":"gone","endpoint":"{}","path_style":true}},"cache_bytes":0}}"#,
            srv.endpoint()
        ),
    )
    .unwrap();
    let r = gone.run(&["backups"]);
    assert!(
        r.err().contains("bucket no-such-bucket does not exist"),
        "{}",
        r.stderr
    );
}
