//! Courier on nats:// side by side with a bare async-nats JetStream loop, in one run,
//! on one server (127.0.0.1:4222 unless COURIER_NATS_URL is set).
//!
//! Bare produce: `jetstream.publish` on every message, acks awaited per 1000.
//! Bare consume: one durable pull consumer per partition subject (explicit ack),
//! `fetch` in batches of 1000, every message acked. Courier: default settings,
//! `producer.send` of every message, a group consumer from earliest. 100-byte
//! incompressible values, keyed messages, 4 partitions.
//!
//! `cargo bench -p courier --features nats --bench nats` (BENCH_N messages, default
//! 300000; BENCH_ROUNDS rounds, default 2).

mod common;

use common::{courier_produce, env_usize, rate, unique, value};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use courier::{Client, Config, Delivery, Error, TopicSpec};
use futures::StreamExt;

const PARTITIONS: u32 = 4;
const ACK_EVERY: usize = 1000;
const FETCH: usize = 1000;

/// The stream Courier made for `topic` (same config, so both sides pay the same).
fn stream_of(topic: &str) -> (String, Vec<String>) {
    // Bench topics are `[a-z0-9-]`, which Courier keeps verbatim.
    (
        format!("COURIER_{topic}"),
        (0..PARTITIONS)
            .map(|p| format!("courier.{topic}.{p}"))
            .collect(),
    )
}

async fn bare_produce(js: &jetstream::Context, topic: &str, n: usize) -> Duration {
    let (_, subjects) = stream_of(topic);
    let start = Instant::now();
    let mut acks = Vec::with_capacity(ACK_EVERY);
    for i in 0..n {
        let key = format!("k{}", i % 1000);
        let p = courier::partition_for_key(key.as_bytes(), PARTITIONS) as usize;
        acks.push(
            js.publish(subjects[p].clone(), value(i).into())
                .await
                .expect("publish"),
        );
        if acks.len() == ACK_EVERY {
            for a in acks.drain(..) {
                a.await.expect("ack");
            }
        }
    }
    for a in acks {
        a.await.expect("ack");
    }
    start.elapsed()
}

async fn courier_consume(client: &Client, topic: &str, n: usize) -> Duration {
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (c, d) = (count.clone(), done.clone());
    let start = Instant::now();
    let handle = client
        .consumer(unique("bench-courier"))
        .from_earliest()
        .start([topic.to_string()], move |_m: Delivery| {
            let (c, d) = (c.clone(), d.clone());
            async move {
                if c.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                    d.notify_one();
                }
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("subscribe");
    tokio::time::timeout(Duration::from_secs(300), done.notified())
        .await
        .expect("consumed in time");
    let total = start.elapsed();
    handle.stop().await.expect("stop");
    total
}

async fn bare_consume(js: &jetstream::Context, topic: &str, n: usize) -> Duration {
    let (stream_name, subjects) = stream_of(topic);
    let start = Instant::now();
    let stream = js.get_stream(&stream_name).await.expect("stream");
    let total = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let group = unique("bench-bare");
    for (p, subject) in subjects.into_iter().enumerate() {
        let name = format!("{group}-{p}");
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name),
                filter_subject: subject,
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: 4096,
                ..Default::default()
            })
            .await
            .expect("consumer");
        let total = total.clone();
        tasks.push(tokio::spawn(async move {
            while total.load(Ordering::Relaxed) < n {
                let mut batch = consumer
                    .batch()
                    .max_messages(FETCH)
                    .expires(Duration::from_millis(200))
                    .messages()
                    .await
                    .expect("batch");
                while let Some(m) = batch.next().await {
                    let m = m.expect("message");
                    std::hint::black_box(&m.payload);
                    m.ack().await.expect("ack");
                    total.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    start.elapsed()
}

#[tokio::main]
async fn main() {
    let n = env_usize("BENCH_N", 300_000);
    let rounds = env_usize("BENCH_ROUNDS", 2);
    let url = std::env::var("COURIER_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = Client::connect_with(Config::with_url(url.clone()))
        .await
        .expect("connect");
    let nc = async_nats::connect(url.trim_start_matches("nats://"))
        .await
        .expect("bare connect");
    let js = jetstream::new(nc);
    println!("nats bench: {n} messages of 100 bytes, {PARTITIONS} partitions, Courier defaults");
    let (mut op, mut bp, mut oc, mut bc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let t_ours = unique("bench-ours");
        let t_bare = unique("bench-bare");
        for t in [&t_ours, &t_bare] {
            client
                .admin()
                .create_topic(TopicSpec::new(t, PARTITIONS))
                .await
                .expect("create");
        }
        let b = bare_produce(&js, &t_bare, n).await;
        let o = courier_produce(&client, &t_ours, n).await;
        println!(
            "round {round}: produce  courier {:>9.0} msg/s   bare async-nats {:>9.0} msg/s",
            rate(n, o),
            rate(n, b)
        );
        op.push(rate(n, o));
        bp.push(rate(n, b));
        // Each side reads what the other wrote (same sizes; Courier's has headers).
        let bt = bare_consume(&js, &t_ours, n).await;
        let ot = courier_consume(&client, &t_bare, n).await;
        println!(
            "round {round}: consume  courier {:>9.0} msg/s   bare async-nats {:>9.0} msg/s",
            rate(n, ot),
            rate(n, bt)
        );
        oc.push(rate(n, ot));
        bc.push(rate(n, bt));
        for t in [&t_ours, &t_bare] {
            let _ = client.admin().delete_topic(t).await;
        }
    }
    let best = |v: &Vec<f64>| v.iter().cloned().fold(0.0, f64::max);
    println!("| what | courier msg/s | bare async-nats msg/s | courier / bare |");
    println!("|---|---|---|---|");
    for (what, o, b) in [
        ("produce (best of rounds)", best(&op), best(&bp)),
        ("consume (best of rounds)", best(&oc), best(&bc)),
    ] {
        println!("| {what} | {o:.0} | {b:.0} | {:.0}% |", 100.0 * o / b);
    }
    client
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
