//! Property: restore(backup(x)) == x for random sparse images (library level, small chunker
//! parameters so that many segments and chunk edges are exercised quickly).
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

use holdfast::chunk::ChunkerParams;
use holdfast::jobs::{backup, restore};
use holdfast::repo::Repo;
use holdfast::source::FileSource;
use holdfast::task::Ctx;
use proptest::prelude::*;
use std::io::{Seek, SeekFrom, Write};

#[derive(Debug, Clone)]
enum Region {
    Random(u64, u32),
    Zeros(u32),
    Repeat(u8, u32),
    Hole(u32),
}

fn region() -> impl Strategy<Value = Region> {
    prop_oneof![
        (any::<u64>(), 1u32..300_000).prop_map(|(s, l)| Region::Random(s, l)),
        (1u32..200_000).prop_map(Region::Zeros),
        (any::<u8>(), 1u32..200_000).prop_map(|(b, l)| Region::Repeat(b, l)),
        (1u32..3_000_000).prop_map(Region::Hole),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn restore_of_backup_is_identity(regions in proptest::collection::vec(region(), 1..16), second in proptest::collection::vec(region(), 0..4)) {
        let d = tempfile::tempdir().unwrap();
        let params = ChunkerParams { segment_size: 1 << 20, min_size: 4096, avg_size: 16384, max_size: 65536 };
        let repo = Repo::init(&d.path().join("repo"), params, 1).unwrap();
        let img = d.path().join("x.img");
        let write = |regions: &[Region], f: &mut std::fs::File| {
            for r in regions {
                match r {
                    Region::Random(s, l) => {
                        let mut v = vec![0u8; *l as usize];
                        let mut h = blake3::Hasher::new();
                        h.update(&s.to_le_bytes());
                        h.finalize_xof().fill(&mut v);
                        f.write_all(&v).unwrap();
                    }
                    Region::Zeros(l) => f.write_all(&vec![0u8; *l as usize]).unwrap(),
                    Region::Repeat(b, l) => f.write_all(&vec![*b; *l as usize]).unwrap(),
                    Region::Hole(l) => { f.seek(SeekFrom::Current(i64::from(*l))).unwrap(); }
                }
            }
            let end = f.stream_position().unwrap();
            f.set_len(end).unwrap();
        };
        let mut f = std::fs::File::create(&img).unwrap();
        write(&regions, &mut f);
        drop(f);
        for round in 0..2 {
            let src = FileSource::open(&img).unwrap();
            let m = backup::backup(&repo, "vm", vec![backup::DiskSpec { name: "d".into(), source: Box::new(src), since: None, checkpoint: None, origin: None }], &Ctx::quiet()).unwrap();
            let out = d.path().join(format!("out{round}.img"));
            restore::restore(&repo, &m, &m.disks[0], &out, false, &Ctx::quiet()).unwrap();
            prop_assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
            // Change the image for the second round: an incremental over the first.
            let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.seek(SeekFrom::Start(0)).unwrap();
            write(&second, &mut f);
        }
    }
}
