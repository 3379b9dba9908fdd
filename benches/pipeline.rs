//! Criterion benchmarks: the chunk pipeline (cut + keyed hash + zstd) and the image reader.
//! End-to-end figures beside `zstd -1 -T0` come from `scripts/bench`.
#![allow(clippy::unwrap_used)] // benchmark setup: unwrap says where a step failed

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use holdfast::chunk::{self, BlobKind, ChunkerParams, Keyer};
use std::hint::black_box;

/// 16 MiB of mixed data: text-like runs (compressible) and random runs.
fn sample() -> Vec<u8> {
    let words: Vec<&[u8]> = [
        &b"disk "[..],
        b"backup ",
        b"segment ",
        b"chunk ",
        b"kernel ",
        b"the ",
        b"of ",
        b"0x1f2e ",
        b"\n",
    ]
    .to_vec();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = Vec::with_capacity(16 << 20);
    while v.len() < 16 << 20 {
        if next() % 2 == 0 {
            for _ in 0..20_000 {
                v.extend_from_slice(words[(next() % words.len() as u64) as usize]);
            }
        } else {
            for _ in 0..16_384 {
                v.extend_from_slice(&next().to_le_bytes());
            }
        }
    }
    v.truncate(16 << 20);
    v
}

fn pipeline(c: &mut Criterion) {
    let data = sample();
    let p = ChunkerParams::default();
    let k = Keyer::new([3; 32]);
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("cut", |b| {
        b.iter(|| {
            data.chunks(p.segment_size as usize)
                .map(|s| p.cut(s).len())
                .sum::<usize>()
        })
    });
    g.bench_function("hash", |b| {
        b.iter(|| black_box(k.id(BlobKind::Chunk, &data)))
    });
    for level in [1, 3] {
        g.bench_function(format!("cut+hash+zstd{level}"), |b| {
            b.iter(|| {
                let mut stored = 0;
                for s in data.chunks(p.segment_size as usize) {
                    for (o, l) in p.cut(s) {
                        black_box(k.id(BlobKind::Chunk, &s[o..o + l]));
                        stored += chunk::encode(&s[o..o + l], level).1.len();
                    }
                }
                stored
            })
        });
    }
    g.finish();
}

fn image_reader(c: &mut Criterion) {
    use holdfast::image::ImageReader;
    use holdfast::jobs::backup;
    use holdfast::repo::Repo;
    let d = tempfile::tempdir().unwrap();
    let repo = std::sync::Arc::new(
        Repo::init(&d.path().join("repo"), ChunkerParams::default(), 1).unwrap(),
    );
    let img = d.path().join("x.img");
    std::fs::write(&img, sample()).unwrap();
    let src = holdfast::source::FileSource::open(&img).unwrap();
    let m = backup::backup(
        &repo,
        "bench",
        vec![backup::DiskSpec {
            name: "d".into(),
            source: Box::new(src),
            since: None,
            checkpoint: None,
            origin: None,
        }],
        &holdfast::task::Ctx::quiet(),
    )
    .unwrap();
    let mut g = c.benchmark_group("image");
    g.throughput(Throughput::Bytes(16 << 20));
    g.sample_size(10);
    g.bench_function("sequential 1 MiB reads, cold cache", |b| {
        b.iter(|| {
            let r = ImageReader::open(repo.clone(), &m.disks[0], 64).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < r.size() {
                off += r.read_at(&mut buf, off).unwrap() as u64;
            }
        })
    });
    let r = ImageReader::open(repo.clone(), &m.disks[0], 1024).unwrap();
    let mut buf = vec![0u8; 4096];
    r.read_at(&mut buf, 0).unwrap();
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("4 KiB read, warm cache", |b| {
        b.iter(|| r.read_at(&mut buf, 8192).unwrap())
    });
    g.finish();
}

/// The AEADs the store could seal blobs with, on a chunk's worth of bytes (64 KiB): the
/// store's own blob sealing (ring's AES-256-GCM under a per-blob key), its metadata AEAD
/// (XChaCha20-Poly1305) and RustCrypto's AES-256-GCM (docs/encryption.md).
fn aead(c: &mut Criterion) {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let data = sample()[..64 << 10].to_vec();
    let mut g = c.benchmark_group("aead_64k");
    g.throughput(Throughput::Bytes(data.len() as u64));
    let keys = holdfast::crypto::Keys::new_random();
    use holdfast::crypto::Purpose;
    for (name, p) in [
        ("blob", Purpose::Blob),
        ("xchacha20poly1305", Purpose::Meta),
    ] {
        g.bench_function(format!("{name}_seal"), |b| {
            b.iter(|| keys.seal(p, b"ad", black_box(&data)))
        });
        let sealed = keys.seal(p, b"ad", &data);
        g.bench_function(format!("{name}_open"), |b| {
            b.iter(|| keys.open(p, b"ad", black_box(&sealed)))
        });
    }
    let gcm = aes_gcm::Aes256Gcm::new(&[7u8; 32].into());
    let nonce = [9u8; 12];
    g.bench_function("aes256gcm_seal", |b| {
        b.iter(|| {
            gcm.encrypt(
                (&nonce).into(),
                Payload {
                    msg: black_box(&data),
                    aad: b"ad",
                },
            )
        })
    });
    let ct = gcm
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: &data,
                aad: b"ad",
            },
        )
        .unwrap();
    g.bench_function("aes256gcm_open", |b| {
        b.iter(|| {
            gcm.decrypt(
                (&nonce).into(),
                Payload {
                    msg: black_box(&ct),
                    aad: b"ad",
                },
            )
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline, image_reader, aead);
criterion_main!(benches);
