//! The store conformance suite on the S3 backend: against a real S3 server (s3s-fs on
//! loopback), and through a proxy that injects errors, hangs and truncated bodies.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

mod common;
use common::s3::{self, FaultProxy, S3Server};
use holdfast::store::s3::{S3Location, S3Options, S3Store};
use holdfast::store::testing as conformance;
use holdfast::store::{ObjectStore, StoreError};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn store(endpoint: &str, prefix: &str, opts: S3Options) -> S3Store {
    s3::set_env();
    let mut loc = S3Location::parse(&format!("s3://{}/{prefix}", s3::BUCKET)).unwrap();
    loc.endpoint = Some(endpoint.to_string());
    loc.path_style = true;
    let s = S3Store::open(&loc, opts).unwrap();
    s.check().unwrap();
    s
}

/// Small parts, so the suite's 12 MiB object goes up as a multipart upload of 3 parts.
fn small_parts() -> S3Options {
    S3Options {
        multipart_threshold: 5 << 20,
        part_size: 5 << 20,
        ..S3Options::default()
    }
}

#[test]
fn conformance_on_a_real_s3_server() {
    let srv = S3Server::start();
    let s = store(&srv.endpoint(), "conf", small_parts());
    conformance::run(&s);
    let n = s.stats.snapshot();
    // The 12 MiB object: create + 3 parts + complete.
    assert!(n.put >= 5 + 4, "multipart upload expected: {n:?}");
    assert!(n.bytes_up >= 12 << 20 && n.bytes_down >= 12 << 20, "{n:?}");
    // Objects live under the prefix, with the same keys as the local store.
    assert_eq!(
        srv.objects("conf/"),
        vec!["conf/backups/vm1/b1", "conf/packs/ab/two"]
    );
    // Default options (one PUT per object) pass too.
    conformance::run(&store(
        &srv.endpoint(),
        "conf-default",
        S3Options::default(),
    ));
}

#[test]
fn conformance_through_errors_hangs_and_truncated_bodies() {
    let srv = S3Server::start();
    let proxy = FaultProxy::start(srv.port, Duration::from_secs(3));
    let opts = S3Options {
        attempt_timeout: Duration::from_secs(1),
        ..small_parts()
    };
    let s = store(&proxy.endpoint(), "faulty", opts);
    conformance::run(&s);
    let injected = proxy.faults.load(Ordering::Relaxed);
    assert!(
        injected >= 10,
        "the proxy must have spoiled requests: {injected}"
    );
    // Reads still see exactly what was written.
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    for i in 0..6 {
        let key = format!("packs/cc/obj{i}");
        s.put(&key, &data).unwrap();
        assert!(s.get(&key).unwrap() == data);
        assert!(s.get_range(&key, 1 << 20, 4096).unwrap() == data[1 << 20..(1 << 20) + 4096]);
    }
}

#[test]
fn written_objects_are_never_overwritten() {
    let srv = S3Server::start();
    let s = store(&srv.endpoint(), "once", S3Options::default());
    s.put("backups/vm/b1", b"first").unwrap();
    s.put("backups/vm/b1", b"first").unwrap(); // the same bytes: a retried write, fine
    let e = s.put("backups/vm/b1", b"other").unwrap_err();
    assert!(matches!(e, StoreError::Exists(_)), "{e}");
    assert!(
        e.to_string()
            .contains("exists already in the store and is never overwritten"),
        "{e}"
    );
    assert_eq!(s.get("backups/vm/b1").unwrap(), b"first");
    // Multipart uploads are conditional too.
    let s = store(&srv.endpoint(), "once", small_parts());
    let big = vec![1u8; 11 << 20];
    s.put("packs/aa/big", &big).unwrap();
    let e = s.put("packs/aa/big", &vec![2u8; 11 << 20]).unwrap_err();
    assert!(matches!(e, StoreError::Exists(_)), "{e}");
    assert!(s.get("packs/aa/big").unwrap() == big);
}

#[test]
fn wrong_credentials_missing_bucket_and_no_server_are_told_apart() {
    let srv = S3Server::start();
    s3::set_env();
    let open = |endpoint: String, bucket: &str| {
        let mut loc = S3Location::parse(&format!("s3://{bucket}/x")).unwrap();
        loc.endpoint = Some(endpoint);
        loc.path_style = true;
        S3Store::open(
            &loc,
            S3Options {
                attempts: 2,
                ..S3Options::default()
            },
        )
        .unwrap()
    };
    let e = open(srv.endpoint(), "no-such-bucket")
        .check()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bucket no-such-bucket does not exist at http://127.0.0.1:"),
        "{e}"
    );
    let dead = format!("http://127.0.0.1:{}", s3::free_port());
    let e = open(dead.clone(), s3::BUCKET)
        .check()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("cannot reach the S3 endpoint {dead}")),
        "{e}"
    );
}
