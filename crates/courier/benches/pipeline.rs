//! `cargo bench -p courier --bench pipeline`: the cost of the reliability pipeline
//! (trace extract, dead-letter, retry, decompress, metrics — the default consumer
//! stack) against a bare handler, side by side on one `memory://` store.
//!
//! Each round consumes the same pre-produced messages twice with fresh groups, once
//! bare and once through the default pipeline, in alternating order; the best of the
//! rounds of each is reported (the machine is shared, so the best is the least
//! disturbed). Two topics: plain messages, and messages carrying W3C trace headers
//! (what a traced producer sends), so extraction is measured too.
//!
//! Also printed: the least process CPU time per message of each side (user +
//! system, all threads; 10 ms ticks), steadier than rates when other work shares
//! the machine.
//!
//! Environment: `COURIER_BENCH_MESSAGES` (default 1,000,000), `COURIER_BENCH_ROUNDS`
//! (default 3), `COURIER_BENCH_TOPICS` (`plain` or `traced`: one kind only),
//! `COURIER_BENCH_SIDE` (`bare` or `pipeline`: one side only; for profiling),
//! `COURIER_BENCH_PARTITIONS` (default 4).

mod common;

use common::{cpu_seconds, env_usize};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{Client, Delivery, Error, Message, TopicSpec, TraceContext};
use tokio::sync::Notify;

fn partitions() -> u32 {
    env_usize("COURIER_BENCH_PARTITIONS", 4) as u32
}

async fn fill(client: &Client, topic: &str, n: u64, traced: bool) {
    client
        .admin()
        .create_topic(TopicSpec::new(topic, partitions()))
        .await
        .expect("create");
    let p = client.producer();
    let ctx = TraceContext::new_root();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(10_000);
        let batch: Vec<Message> = (sent..sent + k)
            .map(|i| {
                let mut m = Message::new(
                    topic,
                    format!("payload-{i:08}-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
                )
                .key(format!("user-{}", i % 1000));
                if traced {
                    ctx.child().inject(&mut m.headers);
                }
                m
            })
            .collect();
        p.send_batch(batch).await.expect("batch");
        sent += k;
    }
}

/// Consumes `n` messages with a fresh group: (msg/s, CPU µs per message).
async fn consume(client: &Client, topic: &str, group: &str, n: u64, bare: bool) -> (f64, f64) {
    let count = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let (c2, d2) = (count.clone(), done.clone());
    let handler = move |d: Delivery| {
        let (c, d2) = (c2.clone(), d2.clone());
        async move {
            std::hint::black_box(&d.value);
            if c.fetch_add(1, Ordering::Relaxed) + 1 == n {
                d2.notify_one();
            }
            Ok::<(), Error>(())
        }
    };
    let builder = client.consumer(group).from_earliest();
    let builder = if bare { builder.bare() } else { builder };
    let started = Instant::now();
    let cpu0 = cpu_seconds();
    let c = builder.start([topic], handler).await.expect("start");
    tokio::time::timeout(Duration::from_secs(600), done.notified())
        .await
        .expect("consumed in time");
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let cpu_us = (cpu_seconds() - cpu0) * 1e6 / n as f64;
    c.stop().await.expect("stop");
    (rate, cpu_us)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let n = env_usize("COURIER_BENCH_MESSAGES", 1_000_000) as u64;
        let rounds = env_usize("COURIER_BENCH_ROUNDS", 3) as u64;
        let client = Client::connect("memory://pipeline-bench").await.expect("connect");
        let p = partitions();
        println!("memory://, {n} messages of 64 B, {p} partitions, {rounds} rounds, best of each");
        // `COURIER_BENCH_TOPICS=traced` (or `plain`) runs one kind only, for profiling.
        let only = std::env::var("COURIER_BENCH_TOPICS").unwrap_or_default();
        // `COURIER_BENCH_SIDE=bare` (or `pipeline`) consumes with one side only.
        let side = match std::env::var("COURIER_BENCH_SIDE").as_deref() {
            Ok("bare") => Some(true),
            Ok("pipeline") => Some(false),
            _ => None,
        };
        for (topic, traced) in [("bench.plain", false), ("bench.traced", true)] {
            if !only.is_empty() && !only.split(',').any(|t| topic.ends_with(t.trim())) {
                continue;
            }
            fill(&client, topic, n, traced).await;
            let (mut bare, mut full) = (0f64, 0f64);
            let (mut bare_cpu, mut full_cpu) = (f64::MAX, f64::MAX);
            for r in 0..rounds {
                // Alternate which runs first so warm-up and drift hit both alike.
                let order = if r % 2 == 0 { [true, false] } else { [false, true] };
                for b in order.into_iter().filter(|b| side.is_none_or(|s| s == *b)) {
                    let g = format!("g-{topic}-{r}-{b}");
                    let (rate, cpu) = consume(&client, topic, &g, n, b).await;
                    if b {
                        bare = bare.max(rate);
                        bare_cpu = bare_cpu.min(cpu);
                    } else {
                        full = full.max(rate);
                        full_cpu = full_cpu.min(cpu);
                    }
                }
            }
            if let Some(bare_side) = side {
                let (rate, cpu) = if bare_side { (bare, bare_cpu) } else { (full, full_cpu) };
                let name = if bare_side { "bare" } else { "default pipeline" };
                println!("{topic:<13} {name} {rate:>10.0} msg/s   cpu/msg {cpu:>6.3} µs");
                continue;
            }
            println!(
                "{topic:<13} bare {bare:>10.0} msg/s   default pipeline {full:>10.0} msg/s   ratio {:.1}%   overhead {:.1}%",
                100.0 * full / bare,
                100.0 * (1.0 - full / bare)
            );
            // CPU per message is steadier than wall-clock rates on a loaded machine;
            // the consume loop is CPU-bound, so its ratio is the throughput cost.
            println!(
                "{topic:<13} cpu/msg bare {bare_cpu:>6.3} µs   default pipeline {full_cpu:>6.3} µs   overhead {:.1}%",
                100.0 * (1.0 - bare_cpu / full_cpu)
            );
        }
        client.shutdown(Duration::from_secs(30)).await.expect("shutdown");
    });
}
