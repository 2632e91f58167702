//! Random damage to segment and index files (seeded, many iterations): open
//! never panics, every record before the damage is served, nothing wrong is
//! ever returned, and appends continue.

use bytes::Bytes;
use courier_log::{codec, FsyncPolicy, Log, LogError, LogOptions, Record, TopicConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn opts() -> LogOptions {
    LogOptions {
        index_interval_bytes: 128,
        retention_check_interval: None,
        ..LogOptions::default()
    }
}

/// `(base_offset, start_pos, end_pos)` of every batch in a segment file.
fn batch_map(path: &Path) -> Vec<(u64, u64, u64)> {
    let data = Bytes::from(std::fs::read(path).expect("read segment"));
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let h = codec::verify_batch(&data[at..]).expect("undamaged segment is valid");
        out.push((h.base_offset, at as u64, (at + h.total_len) as u64));
        at += h.total_len;
    }
    out
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

enum Damage {
    Truncate(u64),
    Flip(u64, u8),
    Delete,
}

/// Collect everything readable, skipping over damage the way a consumer would.
fn read_everything(part: &courier_log::Partition) -> Vec<(u64, Record)> {
    let mut out = Vec::new();
    let mut next = part.start_offset();
    let mut guard = 0;
    while next < part.end_offset() {
        guard += 1;
        assert!(guard < 100_000, "read loop does not progress");
        match part.read(next, 50, 1 << 20) {
            Ok(r) if r.records.is_empty() => break,
            Ok(r) => {
                next = r.next_offset;
                out.extend(r.records.into_iter().map(|s| (s.offset, s.record)));
            }
            Err(LogError::Corrupt {
                resume_at: Some(r), ..
            }) => next = r,
            Err(LogError::Corrupt { .. }) => break,
            Err(e) => panic!("unexpected read error: {e}"),
        }
    }
    out
}

async fn one_iteration(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let pdir = dir.path().join("topics").join("t").join("0");
    let mut expected: Vec<Record> = Vec::new();
    {
        let log = Log::open(dir.path(), opts()).await.expect("open");
        let c = TopicConfig {
            segment_bytes: 1500 + rng.gen_range(0..1500),
            fsync: FsyncPolicy::Never,
            ..TopicConfig::default()
        };
        log.create_topic("t", c).await.expect("create");
        let part = log.partition("t", 0).expect("p");
        let batches = rng.gen_range(5..60);
        for _ in 0..batches {
            let n = rng.gen_range(1..5);
            let recs: Vec<Record> = (0..n)
                .map(|_| {
                    let i = expected.len();
                    Record {
                        key: Some(Bytes::from(format!("k{i}"))),
                        value: Bytes::from(vec![i as u8; rng.gen_range(0..120)]),
                        headers: vec![("i".into(), Bytes::from(i.to_string()))],
                        timestamp: 1000 + i as i64,
                    }
                })
                .collect();
            part.append(recs.clone()).await.expect("append");
            expected.extend(recs);
        }
    }
    // Pick a file and a kind of damage.
    let all = files(&pdir);
    let victim = all[rng.gen_range(0..all.len())].clone();
    let len = std::fs::metadata(&victim).expect("meta").len();
    let is_log = victim.extension().is_some_and(|e| e == "log");
    let damage = match rng.gen_range(0..10) {
        0..=3 => Damage::Truncate(rng.gen_range(0..=len)),
        4..=8 if len > 0 => Damage::Flip(rng.gen_range(0..len), 1 << rng.gen_range(0..8)),
        _ if !is_log => Damage::Delete,
        _ => Damage::Truncate(len / 2),
    };
    // First offset whose record may legitimately be lost.
    let damaged_from = if is_log {
        let map = batch_map(&victim);
        let first_bad = |pos: u64| {
            map.iter()
                .find(|(_, _, e)| pos < *e)
                .map_or(u64::MAX, |(b, _, _)| *b)
        };
        match damage {
            Damage::Truncate(to) => map
                .iter()
                .find(|(_, _, e)| *e > to)
                .map_or(u64::MAX, |(b, _, _)| *b),
            Damage::Flip(at, _) => first_bad(at),
            Damage::Delete => u64::MAX,
        }
    } else {
        u64::MAX
    };
    match damage {
        Damage::Truncate(to) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&victim)
                .expect("open victim");
            f.set_len(to).expect("truncate");
        }
        Damage::Flip(at, mask) => {
            let mut v = std::fs::read(&victim).expect("read victim");
            v[at as usize] ^= mask;
            std::fs::write(&victim, v).expect("write victim");
        }
        Damage::Delete => std::fs::remove_file(&victim).expect("delete victim"),
    }

    let ctx = format!("seed {seed} victim {}", victim.display());
    for round in 0..2 {
        let log = Log::open(dir.path(), opts()).await.expect(&ctx);
        let part = log.partition("t", 0).expect("p");
        let got = read_everything(&part);
        let mut last = None;
        for (o, r) in &got {
            assert!(last.is_none_or(|l| *o > l), "{ctx}: offsets not increasing");
            last = Some(*o);
            if (*o as usize) < expected.len() {
                assert_eq!(r, &expected[*o as usize], "{ctx}: wrong data at {o}");
            }
        }
        let served: std::collections::HashSet<u64> = got.iter().map(|(o, _)| *o).collect();
        let must = damaged_from.min(expected.len() as u64);
        for o in 0..must {
            assert!(
                served.contains(&o),
                "{ctx} round {round}: offset {o} lost (damage from {damaged_from})"
            );
        }
        // Appends continue right at the end, and are readable.
        let end = part.end_offset();
        let r = part
            .append(vec![Record::new(format!("after-{round}"))])
            .await
            .expect(&ctx);
        assert_eq!(r.base_offset, end, "{ctx}");
        let back = part.read(end, 1, 1 << 20).expect(&ctx);
        assert_eq!(
            back.records[0].record.value,
            Bytes::from(format!("after-{round}"))
        );
        if round == 0 {
            // The record appended after damage occupies a possibly-reused
            // offset; forget the old expectation beyond it.
            expected.truncate(end as usize);
            expected.push(back.records[0].record.clone());
        } else {
            // Round 1 must still see round 0's append.
            assert!(
                served.contains(&(expected.len() as u64 - 1)),
                "{ctx}: lost post-recovery append"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_damage_is_survived() {
    let iterations: u64 = std::env::var("COURIER_LOG_CORRUPTION_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for seed in 0..iterations {
        one_iteration(seed).await;
    }
}
