//! Functional tests of the log: round trips, indexes, rolling, retention,
//! restart, locking, group commit, side state.

use bytes::Bytes;
use courier_log::{
    FsyncPolicy, KvOp, Log, LogError, LogOptions, OffsetCommit, Record, StoredRecord, TopicConfig,
};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;

fn opts() -> LogOptions {
    LogOptions {
        index_interval_bytes: 256,
        retention_check_interval: None,
        ..LogOptions::default()
    }
}

fn cfg(fsync: FsyncPolicy) -> TopicConfig {
    TopicConfig {
        fsync,
        ..TopicConfig::default()
    }
}

fn rec(i: u64, ts: i64) -> Record {
    Record {
        key: if i.is_multiple_of(3) {
            None
        } else {
            Some(Bytes::from(format!("k{i}")))
        },
        value: Bytes::from(format!("value-{i}-{}", "x".repeat((i % 50) as usize))),
        headers: if i.is_multiple_of(2) {
            vec![("h".to_string(), Bytes::from(i.to_string()))]
        } else {
            vec![]
        },
        timestamp: ts,
    }
}

async fn read_all(log: &Log, topic: &str, p: u32) -> Vec<StoredRecord> {
    let part = log.partition(topic, p).expect("partition");
    let mut out = Vec::new();
    let mut next = part.start_offset();
    loop {
        let r = part.read(next, 1000, 1 << 20).expect("read");
        if r.records.is_empty() {
            break;
        }
        next = r.next_offset;
        out.extend(r.records);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut expected = Vec::new();
    {
        let log = Log::open(dir.path(), opts()).await.expect("open");
        log.create_topic("t", cfg(FsyncPolicy::Never))
            .await
            .expect("create");
        let part = log.partition("t", 0).expect("p");
        assert_eq!(part.end_offset(), 0);
        let mut i = 0u64;
        for b in 0..50u64 {
            let recs: Vec<Record> = (0..(b % 7 + 1))
                .map(|_| {
                    i += 1;
                    rec(i, 1000 + i as i64)
                })
                .collect();
            let res = part.append(recs.clone()).await.expect("append");
            assert_eq!(res.base_offset, expected.len() as u64);
            assert_eq!(res.count as usize, recs.len());
            expected.extend(recs);
        }
        assert_eq!(part.end_offset(), expected.len() as u64);
        let got = read_all(&log, "t", 0).await;
        assert_eq!(got.len(), expected.len());
        for (j, s) in got.iter().enumerate() {
            assert_eq!(s.offset, j as u64);
            assert_eq!(s.record, expected[j]);
        }
        // Partial reads honour limits and always make progress.
        let r = part.read(5, 3, 1 << 20).expect("read");
        assert_eq!(r.records.len(), 3);
        assert_eq!(r.records[0].offset, 5);
        assert_eq!(r.next_offset, 8);
        let r = part.read(5, 100, 1).expect("read");
        assert_eq!(r.records.len(), 1);
        let end = part.end_offset();
        assert!(part.read(end, 10, 1000).expect("read").records.is_empty());
        assert!(matches!(
            part.read(end + 1, 10, 1000),
            Err(LogError::OffsetOutOfRange { .. })
        ));
        drop(part);
        log.close().await.expect("close");
    }
    // Restart: everything is still there and appends continue.
    let log = Log::open(dir.path(), opts()).await.expect("reopen");
    assert_eq!(log.list_topics(), vec!["t".to_string()]);
    let got = read_all(&log, "t", 0).await;
    assert_eq!(got.len(), expected.len());
    assert!(got.iter().zip(&expected).all(|(g, e)| &g.record == e));
    let part = log.partition("t", 0).expect("p");
    let res = part.append(vec![rec(9999, 5)]).await.expect("append");
    assert_eq!(res.base_offset, expected.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_prevents_second_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), opts()).await.expect("open");
    match Log::open(dir.path(), opts()).await {
        Err(LogError::Locked { path }) => assert!(path.ends_with("LOCK")),
        other => panic!("expected Locked, got {other:?}"),
    }
    // A partition handle keeps the log (and its lock) alive.
    log.create_topic("t", TopicConfig::default())
        .await
        .expect("create");
    let part = log.partition("t", 0).expect("p");
    drop(log);
    assert!(matches!(
        Log::open(dir.path(), opts()).await,
        Err(LogError::Locked { .. })
    ));
    drop(part);
    let _again = Log::open(dir.path(), opts())
        .await
        .expect("reopen after close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_admin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), opts()).await.expect("open");
    let c = TopicConfig {
        partitions: 2,
        ..TopicConfig::default()
    };
    log.create_topic("a", c.clone()).await.expect("create");
    assert!(matches!(
        log.create_topic("a", c.clone()).await,
        Err(LogError::TopicExists(_))
    ));
    assert!(matches!(
        log.create_topic("../x", c.clone()).await,
        Err(LogError::InvalidTopicName(_))
    ));
    log.create_topic("b", c.clone()).await.expect("create b");
    assert_eq!(log.list_topics(), vec!["a", "b"]);
    assert!(log.partition("a", 2).is_err());
    log.add_partitions("a", 4).await.expect("add");
    let p3 = log.partition("a", 3).expect("p3");
    p3.append(vec![Record::new("x")]).await.expect("append");
    let mut c2 = log.topic_config("a").expect("cfg");
    assert_eq!(c2.partitions, 4);
    c2.retention_bytes = Some(12345);
    log.update_topic_config("a", c2.clone())
        .await
        .expect("update");
    let pb = log.partition("b", 0).expect("pb");
    let waiter = {
        let pb = pb.clone();
        tokio::spawn(async move { pb.wait_for(0).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    log.delete_topic("b").await.expect("delete");
    assert!(matches!(
        waiter.await.expect("join"),
        Err(LogError::TopicNotFound(_))
    ));
    assert!(matches!(
        pb.append(vec![Record::new("x")]).await,
        Err(LogError::TopicNotFound(_))
    ));
    assert!(log.partition("b", 0).is_err());
    drop((log, p3, pb));
    let log = Log::open(dir.path(), opts()).await.expect("reopen");
    assert_eq!(log.list_topics(), vec!["a"]);
    assert_eq!(log.topic_config("a").expect("cfg"), c2);
    assert_eq!(log.partition("a", 3).expect("p").end_offset(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roll_retention_and_time_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), opts()).await.expect("open");
    let c = TopicConfig {
        segment_bytes: 2048,
        retention_ms: None,
        ..cfg(FsyncPolicy::Interval(5))
    };
    log.create_topic("t", c.clone()).await.expect("create");
    let part = log.partition("t", 0).expect("p");
    for i in 0..400u64 {
        part.append(vec![rec(i, 10_000 + i as i64 * 10)])
            .await
            .expect("append");
    }
    assert!(
        part.segment_count() > 10,
        "segments: {}",
        part.segment_count()
    );
    // Time index: first record with ts >= t.
    for t in [0i64, 10_000, 10_005, 10_010, 12_345, 13_990, 13_991, 99_999] {
        let want = (0..400u64).find(|&i| 10_000 + i as i64 * 10 >= t);
        assert_eq!(part.offset_for_timestamp(t).expect("ts"), want, "t={t}");
    }
    // Retention by size deletes whole old segments only.
    let size = part.size_bytes();
    log.update_topic_config(
        "t",
        TopicConfig {
            retention_bytes: Some(size / 2),
            ..c.clone()
        },
    )
    .await
    .expect("update");
    let deleted = log.enforce_retention().await.expect("retention");
    assert!(deleted > 0);
    assert!(part.size_bytes() >= size / 2);
    let start = part.start_offset();
    assert!(start > 0);
    let r = part.read(0, 5, 1 << 20).expect("read");
    assert_eq!(r.reset_from, Some(0));
    assert_eq!(r.records[0].offset, start);
    assert_eq!(r.records[0].record, rec(start, 10_000 + start as i64 * 10));
    // Retention by age: all records are ancient (ts ~ 1970).
    log.update_topic_config(
        "t",
        TopicConfig {
            retention_ms: Some(1000),
            ..c
        },
    )
    .await
    .expect("update");
    log.enforce_retention().await.expect("retention");
    assert_eq!(part.segment_count(), 1);
    let start2 = part.start_offset();
    assert!(start2 > start);
    // Survives restart with the new start.
    drop((log, part));
    let log = Log::open(dir.path(), opts()).await.expect("reopen");
    let part = log.partition("t", 0).expect("p");
    assert_eq!(part.start_offset(), start2);
    assert_eq!(part.end_offset(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_roll_by_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), opts()).await.expect("open");
    let c = TopicConfig {
        segment_ms: Some(20),
        ..cfg(FsyncPolicy::Never)
    };
    log.create_topic("t", c).await.expect("create");
    let part = log.partition("t", 0).expect("p");
    part.append(vec![Record::new("a")]).await.expect("append");
    tokio::time::sleep(Duration::from_millis(40)).await;
    part.append(vec![Record::new("b")]).await.expect("append");
    assert_eq!(part.segment_count(), 2);
    let r = part.read(0, 10, 1 << 20).expect("read");
    assert_eq!(r.records.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_concurrent_appenders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), opts()).await.expect("open");
    let c = TopicConfig {
        partitions: 2,
        segment_bytes: 64 * 1024,
        ..cfg(FsyncPolicy::Always)
    };
    log.create_topic("t", c).await.expect("create");
    let mut tasks = Vec::new();
    for w in 0..64u64 {
        let part = log.partition("t", (w % 2) as u32).expect("p");
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for s in 0..40u64 {
                let v = format!("{w}-{s}");
                let r = part
                    .append(vec![Record::new(v.clone())])
                    .await
                    .expect("append");
                // Acknowledged means visible.
                assert!(part.end_offset() > r.base_offset);
                acked.push((r.base_offset, v));
            }
            (w % 2, acked)
        }));
    }
    let mut by_part: [Vec<(u64, String)>; 2] = [Vec::new(), Vec::new()];
    for t in tasks {
        let (p, acked) = t.await.expect("join");
        // Per appender, offsets increase in call order.
        assert!(acked.windows(2).all(|w| w[0].0 < w[1].0));
        by_part[p as usize].extend(acked);
    }
    for (p, acked) in by_part.iter_mut().enumerate() {
        acked.sort();
        assert_eq!(acked.len(), 32 * 40);
        assert!(acked.iter().enumerate().all(|(i, (o, _))| *o == i as u64));
        let got = read_all(&log, "t", p as u32).await;
        assert_eq!(got.len(), acked.len());
        for (g, (o, v)) in got.iter().zip(acked.iter()) {
            assert_eq!(g.offset, *o);
            assert_eq!(g.record.value, Bytes::from(v.clone()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_is_notified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), opts()).await.expect("open");
    log.create_topic("t", cfg(FsyncPolicy::Never))
        .await
        .expect("create");
    let part = log.partition("t", 0).expect("p");
    let p2 = part.clone();
    let waiter = tokio::spawn(async move { p2.wait_for(0).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished());
    part.append(vec![Record::new("a"), Record::new("b")])
        .await
        .expect("append");
    let end = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("timely")
        .expect("join")
        .expect("wait");
    assert_eq!(end, 2);
    // Already satisfied: resolves at once.
    assert_eq!(part.wait_for(1).await.expect("wait"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), opts()).await.expect("open");
    let c = TopicConfig {
        max_message_bytes: 100,
        ..TopicConfig::default()
    };
    log.create_topic("t", c).await.expect("create");
    let part = log.partition("t", 0).expect("p");
    assert!(matches!(
        part.append(vec![]).await,
        Err(LogError::EmptyBatch)
    ));
    assert!(matches!(
        part.append(vec![Record::new(vec![0u8; 200])]).await,
        Err(LogError::MessageTooLarge { .. })
    ));
    assert!(TopicConfig {
        partitions: 0,
        ..TopicConfig::default()
    }
    .validate()
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = Log::open(dir.path(), opts()).await.expect("open");
        let o = log.offsets();
        o.commit(
            "g1",
            &[OffsetCommit::new("a", 0, 10), OffsetCommit::new("a", 1, 20)],
        )
        .await
        .expect("commit");
        o.commit(
            "g2",
            &[OffsetCommit {
                metadata: "meta".into(),
                ..OffsetCommit::new("b", 0, 5)
            }],
        )
        .await
        .expect("commit");
        o.commit("g1", &[OffsetCommit::new("a", 0, 11)])
            .await
            .expect("commit");
        let kv = log.kv();
        kv.batch(vec![
            KvOp::Put(Bytes::from("d/1"), Bytes::from("one")),
            KvOp::Put(Bytes::from("d/2"), Bytes::from("two")),
            KvOp::Put(Bytes::from("e/1"), Bytes::from("other")),
        ])
        .await
        .expect("batch");
        kv.delete("d/2").await.expect("delete");
        kv.put("d/3", "three").await.expect("put");
    }
    let log = Log::open(dir.path(), opts()).await.expect("reopen");
    let o = log.offsets();
    assert_eq!(
        o.committed("g1", "a", 0)
            .await
            .expect("c")
            .map(|c| c.offset),
        Some(11)
    );
    assert_eq!(
        o.committed("g1", "a", 1)
            .await
            .expect("c")
            .map(|c| c.offset),
        Some(20)
    );
    assert_eq!(
        o.committed("g2", "b", 0)
            .await
            .expect("c")
            .map(|c| c.metadata),
        Some("meta".to_string())
    );
    assert_eq!(o.committed("g3", "b", 0).await.expect("c"), None);
    assert_eq!(o.list_groups().await.expect("groups"), vec!["g1", "g2"]);
    assert_eq!(o.group_offsets("g1").await.expect("g").len(), 2);
    assert_eq!(o.delete_group("g1").await.expect("del"), 2);
    assert_eq!(o.list_groups().await.expect("groups"), vec!["g2"]);
    let kv = log.kv();
    assert_eq!(kv.get("d/1").await.expect("get"), Some(Bytes::from("one")));
    assert_eq!(kv.get("d/2").await.expect("get"), None);
    let d = kv.scan_prefix("d/").await.expect("scan");
    assert_eq!(
        d,
        vec![
            (Bytes::from("d/1"), Bytes::from("one")),
            (Bytes::from("d/3"), Bytes::from("three"))
        ]
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Sparse index lookups (offset and time) agree with a brute-force model,
    /// before and after a restart (rebuilt vs. loaded indexes).
    #[test]
    fn index_lookups(
        batches in proptest::collection::vec((1usize..6, 0usize..300, -5i64..20), 1..60),
        probes in proptest::collection::vec(any::<prop::sample::Index>(), 1..20),
        ts_probes in proptest::collection::vec(-10i64..2000, 1..10),
    ) {
        let rt = runtime();
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut model: Vec<Record> = Vec::new();
            let mut ts = 0i64;
            {
                let log = Log::open(dir.path(), LogOptions { index_interval_bytes: 64, ..opts() }).await.expect("open");
                let c = TopicConfig { segment_bytes: 4096, ..cfg(FsyncPolicy::Never) };
                log.create_topic("t", c).await.expect("create");
                let part = log.partition("t", 0).expect("p");
                for (n, vlen, dts) in &batches {
                    let recs: Vec<Record> = (0..*n).map(|_| {
                        ts += dts;
                        Record { key: None, value: Bytes::from(vec![7u8; *vlen]), headers: vec![], timestamp: ts }
                    }).collect();
                    part.append(recs.clone()).await.expect("append");
                    model.extend(recs);
                }
            }
            for round in 0..2 {
                let log = Log::open(dir.path(), opts()).await.expect("open");
                let part = log.partition("t", 0).expect("p");
                for p in &probes {
                    let o = p.index(model.len());
                    let r = part.read(o as u64, 1, 1).expect("read");
                    assert_eq!(r.records.len(), 1, "round {round}");
                    assert_eq!(r.records[0].offset, o as u64);
                    assert_eq!(&r.records[0].record, &model[o]);
                }
                for &t in &ts_probes {
                    let want = model.iter().position(|r| r.timestamp >= t).map(|p| p as u64);
                    assert_eq!(part.offset_for_timestamp(t).expect("ts"), want, "t={t}");
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_run_concurrently_with_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), opts()).await.expect("open");
    let c = TopicConfig {
        segment_bytes: 8192,
        ..cfg(FsyncPolicy::Never)
    };
    log.create_topic("t", c).await.expect("create");
    let part = log.partition("t", 0).expect("p");
    let reader = {
        let part: Arc<_> = part.clone();
        tokio::spawn(async move {
            let mut next = 0u64;
            while next < 2000 {
                let r = part.read(next, 100, 1 << 20).expect("read");
                for s in &r.records {
                    assert_eq!(s.offset, next);
                    assert_eq!(s.record.value, Bytes::from(format!("v{next}")));
                    next += 1;
                }
                if r.records.is_empty() {
                    part.wait_for(next).await.expect("wait");
                }
            }
        })
    };
    for i in 0..200u64 {
        let recs = (0..10)
            .map(|j| Record::new(format!("v{}", i * 10 + j)))
            .collect();
        part.append(recs).await.expect("append");
    }
    tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("reader finished")
        .expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_write_is_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = dir.path().join("topics/t/0").join(format!("{:020}.log", 0));
    {
        let log = Log::open(dir.path(), opts()).await.expect("open");
        log.create_topic("t", cfg(FsyncPolicy::Always))
            .await
            .expect("create");
        let part = log.partition("t", 0).expect("p");
        for i in 0..10 {
            part.append(vec![rec(i, i as i64)]).await.expect("append");
        }
    }
    // Simulate a crash in the middle of writing the 11th batch.
    let full = courier_log::codec::encode_batch(10, &[rec(10, 10), rec(11, 11)]);
    let good_len = std::fs::metadata(&seg).expect("meta").len();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .expect("open seg");
        f.write_all(&full[..full.len() / 2]).expect("write");
    }
    let log = Log::open(dir.path(), opts()).await.expect("reopen");
    assert_eq!(std::fs::metadata(&seg).expect("meta").len(), good_len);
    let part = log.partition("t", 0).expect("p");
    assert_eq!(part.end_offset(), 10);
    let r = part.append(vec![rec(10, 10)]).await.expect("append");
    assert_eq!(r.base_offset, 10);
    let got = read_all(&log, "t", 0).await;
    assert_eq!(got.len(), 11);
    assert!(got
        .iter()
        .all(|s| s.record == rec(s.offset, s.offset as i64)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_created_topic_is_cleaned_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Log::open(dir.path(), opts()).await.expect("open"));
    // A crash during create_topic leaves a directory without metadata.
    std::fs::create_dir_all(dir.path().join("topics/half/0")).expect("mkdir");
    let log = Log::open(dir.path(), opts()).await.expect("reopen");
    assert!(log.list_topics().is_empty());
    log.create_topic("half", TopicConfig::default())
        .await
        .expect("create again");
    // Damaged metadata is reported, never guessed at.
    std::fs::write(dir.path().join("topics/half/topic.json"), b"{garbage").expect("write");
    drop(log);
    assert!(matches!(
        Log::open(dir.path(), opts()).await,
        Err(LogError::Metadata { .. })
    ));
}
