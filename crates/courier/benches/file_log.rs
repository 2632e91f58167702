//! `cargo bench -p courier --bench file_log`: the embedded file:// backend through the
//! public API, with the raw disk ceiling measured in the same run.
//!
//! Environment: `COURIER_BENCH_MESSAGES` (default 2,000,000), `COURIER_BENCH_DIR`
//! (default a temp dir under `target/`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{Client, Delivery, Error, Message, TopicSpec};
use tokio::sync::Notify;

fn messages() -> u64 {
    std::env::var("COURIER_BENCH_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000)
}

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var("COURIER_BENCH_DIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bench-data").to_string()
    });
    std::fs::create_dir_all(&base).expect("bench dir");
    tempfile::tempdir_in(base).expect("temp dir")
}

/// The ceiling: the same payload bytes (value + 40 bytes of per-record framing)
/// written with plain `write` in 1 MiB chunks, then one `fdatasync`.
fn raw_ceiling(n: u64, value_len: usize) -> f64 {
    let dir = bench_dir();
    let path = dir.path().join("raw.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(0)
        .open(&path)
        .expect("open raw");
    let total = n as usize * (value_len + 40);
    let chunk = vec![b'x'; 1 << 20];
    let started = Instant::now();
    let mut left = total;
    while left > 0 {
        let k = left.min(chunk.len());
        f.write_all(&chunk[..k]).expect("write");
        left -= k;
    }
    f.sync_data().expect("fdatasync");
    total as f64 / started.elapsed().as_secs_f64()
}

async fn client(dir: &std::path::Path, fsync: &str) -> Client {
    Client::connect(&format!("file://{}?fsync={fsync}", dir.display()))
        .await
        .expect("connect")
}

/// Batched produce through `Producer::send_batch` (1,000 per batch, 2 tasks).
async fn produce_batched(n: u64, value_len: usize) -> (f64, Client, tempfile::TempDir) {
    let dir = bench_dir();
    let c = client(dir.path(), "interval:1000").await;
    c.admin()
        .create_topic(TopicSpec::new("bench", 4))
        .await
        .expect("topic");
    let value = bytes::Bytes::from(vec![b'x'; value_len]);
    let started = Instant::now();
    let tasks: Vec<_> = (0..2)
        .map(|t| {
            let p = c.producer();
            let value = value.clone();
            tokio::spawn(async move {
                let mut sent = 0;
                while sent < n / 2 {
                    let batch: Vec<Message> = (0..1000)
                        .map(|i| {
                            Message::new("bench", value.clone())
                                .partition(((t * 2) + (i & 1)) as u32)
                        })
                        .collect();
                    p.send_batch(batch).await.expect("batch");
                    sent += 1000;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let secs = started.elapsed().as_secs_f64();
    (n as f64 / secs, c, dir)
}

/// Single-message `send`s from `senders` concurrent tasks under `fsync`.
async fn produce_concurrent(n: u64, senders: u64, fsync: &str) -> f64 {
    let dir = bench_dir();
    let c = client(dir.path(), fsync).await;
    c.admin()
        .create_topic(TopicSpec::new("bench", 4))
        .await
        .expect("topic");
    let started = Instant::now();
    let tasks: Vec<_> = (0..senders)
        .map(|s| {
            let p = c.producer();
            tokio::spawn(async move {
                for i in 0..n / senders {
                    p.send(
                        Message::new("bench", vec![b'x'; 100])
                            .key((s * 1_000_003 + i).to_le_bytes().to_vec()),
                    )
                    .await
                    .expect("send");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    c.shutdown(Duration::from_secs(30)).await.expect("shutdown");
    rate
}

/// Consume everything in `c`'s `bench` topic: handler + ack + commit.
async fn consume_all(c: &Client, n: u64) -> f64 {
    let seen = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let (s, d) = (seen.clone(), done.clone());
    let started = Instant::now();
    let consumer = c
        .consumer("bench.consume.group")
        .from_earliest()
        .start(["bench"], move |_m: Delivery| {
            if s.fetch_add(1, Ordering::Relaxed) + 1 == n {
                d.notify_one();
            }
            async { Ok::<(), Error>(()) }
        })
        .await
        .expect("consumer");
    done.notified().await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    consumer.stop().await.expect("stop");
    rate
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let n = messages();
    rt.block_on(async {
        let raw100 = raw_ceiling(n, 100);
        let (batched, c, _dir) = produce_batched(n, 100).await;
        let consumed = consume_all(&c, n).await;
        c.shutdown(Duration::from_secs(30)).await.expect("shutdown");
        let always64 = produce_concurrent(n / 10, 64, "always").await;
        let n1k = n / 4;
        let raw1k = raw_ceiling(n1k, 1024);
        let (batched1k, c1k, _dir1k) = produce_batched(n1k, 1024).await;
        c1k.shutdown(Duration::from_secs(30))
            .await
            .expect("shutdown");
        let mb = |rate: f64, len: usize| rate * (len + 40) as f64 / 1e6;
        println!("file:// backend, {n} messages of 100 bytes ({n1k} of 1 KiB)");
        println!("{:<46} {:>12} {:>10}", "case", "msg/s", "MB/s");
        println!(
            "{:<46} {:>12.0} {:>10.1}",
            "raw write+fdatasync ceiling (100 B)",
            raw100 / 140.0,
            raw100 / 1e6
        );
        println!(
            "{:<46} {:>12.0} {:>10.1}  ({:.0}% of raw)",
            "produce send_batch(1000), fsync=interval",
            batched,
            mb(batched, 100),
            100.0 * mb(batched, 100) * 1e6 / raw100
        );
        println!(
            "{:<46} {:>12.0}",
            "consume (handler + ack + commit)", consumed
        );
        println!(
            "{:<46} {:>12.0}",
            "64 concurrent send(), fsync=always", always64
        );
        println!(
            "{:<46} {:>12.0} {:>10.1}",
            "raw write+fdatasync ceiling (1 KiB)",
            raw1k / 1064.0,
            raw1k / 1e6
        );
        println!(
            "{:<46} {:>12.0} {:>10.1}  ({:.0}% of raw)",
            "produce send_batch(1000) 1 KiB, interval",
            batched1k,
            mb(batched1k, 1024),
            100.0 * mb(batched1k, 1024) * 1e6 / raw1k
        );
    });
}
