//! `cargo bench -p courier --bench delay`: delayed messages on file:// — memory per
//! pending message, schedule rate, and delivery lateness at 10k due/s while a large
//! backlog is pending.
//!
//! Environment: `COURIER_BENCH_PENDING` (default 1,000,000 far-future messages),
//! `COURIER_BENCH_DUE` (default 100,000 messages due at `COURIER_BENCH_DUE_RATE`,
//! default 10,000/s), `COURIER_BENCH_DIR` (default a temp dir under `target/`).

mod common;

use common::env_usize;

use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{now_millis, Client, Delivery, Error, Message, TopicSpec, HEADER_DELAY_UNTIL};
use parking_lot::Mutex;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn schedule(client: &Client, topic: &str, n: u64, due: impl Fn(u64) -> i64) -> f64 {
    let producer = client.producer();
    let value = vec![b'x'; 100];
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let k = (n - i).min(10_000);
        let batch = (i..i + k)
            .map(|j| Message::new(topic, value.clone()).deliver_at(due(j)))
            .collect();
        producer.send_batch(batch).await.expect("schedule");
        i += k;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let pending = env_usize("COURIER_BENCH_PENDING", 1_000_000) as u64;
    let due_n = env_usize("COURIER_BENCH_DUE", 100_000) as u64;
    let due_rate = (env_usize("COURIER_BENCH_DUE_RATE", 10_000) as u64).max(1);
    let base = std::env::var("COURIER_BENCH_DIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bench-data").to_string()
    });
    std::fs::create_dir_all(&base).expect("bench dir");
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let client = Client::connect(&format!("file://{}", dir.path().display()))
        .await
        .expect("connect");
    client
        .scheduler_ready(Duration::from_secs(10))
        .await
        .expect("scheduler");
    let target = "bench.delay.target";
    client
        .admin()
        .create_topic(TopicSpec::new(target, 1))
        .await
        .expect("topic");

    // 1. A far-future backlog: schedule rate and index memory.
    let rss0 = rss_bytes();
    let far = now_millis() + 3_600_000;
    let rate = schedule(&client, target, pending, |_| far).await;
    let started = Instant::now();
    while (client.scheduler_pending() as u64) < pending {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "index never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let indexed_after = started.elapsed();
    let rss1 = rss_bytes();
    let per = (rss1.saturating_sub(rss0)) as f64 / pending.max(1) as f64;
    println!(
        "pending {pending}: schedule {rate:.0} msg/s; index caught up {:.2} s after the last send; RSS +{:.1} MiB ({per:.0} B per pending message, 100-byte payloads)",
        indexed_after.as_secs_f64(),
        (rss1.saturating_sub(rss0)) as f64 / (1 << 20) as f64
    );

    // 2. Lateness: `due_n` messages due at `due_rate`/s, with the backlog still pending.
    let late = Arc::new(Mutex::new(Vec::with_capacity(due_n as usize)));
    let sink = late.clone();
    let consumer = client
        .consumer("bench.delay.group")
        .auto_offset_reset(courier::OffsetReset::Earliest)
        .start([target.to_string()], move |d: Delivery| {
            let sink = sink.clone();
            async move {
                let due: i64 = d
                    .headers
                    .get_str(HEADER_DELAY_UNTIL)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                sink.lock().push(now_millis() - due);
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("consumer");
    consumer
        .wait_assigned(1, Duration::from_secs(10))
        .await
        .expect("assigned");
    let step_us = 1_000_000 / due_rate;
    let first = now_millis() + 3000;
    let due_rate_sched = schedule(&client, target, due_n, |j| {
        first + (j * step_us / 1000) as i64
    })
    .await;
    let started = Instant::now();
    while (late.lock().len() as u64) < due_n {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not all delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut l = late.lock().clone();
    l.sort_unstable();
    println!(
        "due {due_n} at {due_rate}/s (scheduled at {due_rate_sched:.0} msg/s) with {pending} pending: lateness p50 {} ms, p99 {} ms, max {} ms, early {}",
        pct(&l, 0.5),
        pct(&l, 0.99),
        l.last().copied().unwrap_or(0),
        l.iter().filter(|x| **x < 0).count()
    );
    consumer.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
