//! Courier on `amqp://` side by side with a bare lapin loop, one process, one run, the
//! same RabbitMQ. 100-byte values, Courier's default settings.
//!
//! ```sh
//! BENCH_N=200000 cargo bench -p courier --features amqp --bench amqp
//! ```
//!
//! - produce: Courier `Producer::send` for every message, then every handle awaited;
//!   bare: `basic_publish` on one confirm-mode channel for every message, then every
//!   confirm awaited.
//! - consume: a Courier group consumer (runtime, handler, commits) from `earliest`;
//!   bare: one stream consumer per partition (prefetch 1000, acks every 500), each
//!   timed until the last message.
//!
//! Each line also gives the process's CPU time per message (user + system, all
//! threads; the broker is another process), which does not depend on how fast the
//! shared broker happens to be.
//!
//! `BENCH_SIDE=courier` (or `bare`) runs one side only, for profiling.

mod common;

use common::{courier_produce, value, with_cpu};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{Client, Delivery, TopicSpec};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const PARTITIONS: u32 = 4;

fn rate(n: usize, d: Duration) -> String {
    format!(
        "{:>9.0} msg/s ({:.2} s)",
        n as f64 / d.as_secs_f64(),
        d.as_secs_f64()
    )
}

async fn bare_produce(conn: &Connection, topic: &str, n: usize) -> Duration {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let start = Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        let rk = (i as u32 % PARTITIONS).to_string();
        confirms.push(
            ch.basic_publish(
                topic.into(),
                rk.as_str().into(),
                BasicPublishOptions::default(),
                &value(i),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        assert!(c.await.expect("confirm").is_ack());
    }
    start.elapsed()
}

async fn courier_consume(client: &Client, topic: &str, n: usize) -> Duration {
    let seen = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (s, d) = (seen.clone(), done.clone());
    let start = Instant::now();
    let c = client
        .consumer(format!("bench-{}", ulid::Ulid::new()))
        .from_earliest()
        .start([topic.to_string()], move |_m: Delivery| {
            let (s, d) = (s.clone(), d.clone());
            async move {
                if s.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    d.notify_one();
                }
                Ok::<(), courier::Error>(())
            }
        })
        .await
        .expect("subscribe");
    done.notified().await;
    let took = start.elapsed();
    c.stop().await.expect("stop");
    took
}

async fn bare_consume(conn: &Connection, topic: &str, n: usize) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::new();
    let total = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    for p in 0..PARTITIONS {
        let ch = conn.create_channel().await.expect("channel");
        let (total, done) = (total.clone(), done.clone());
        let stream = format!("{topic}:{p}");
        tasks.push(tokio::spawn(async move {
            ch.basic_qos(1000, BasicQosOptions::default())
                .await
                .expect("qos");
            let mut args = FieldTable::default();
            args.insert(
                "x-stream-offset".into(),
                AMQPValue::LongString("first".into()),
            );
            let mut c = ch
                .basic_consume(
                    stream.as_str().into(),
                    "bare".into(),
                    BasicConsumeOptions::default(),
                    args,
                )
                .await
                .expect("consume");
            let mut k = 0u32;
            while let Some(Ok(d)) = c.next().await {
                k += 1;
                if k.is_multiple_of(500) {
                    d.acker
                        .ack(BasicAckOptions { multiple: true })
                        .await
                        .expect("ack");
                }
                if total.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    done.notify_one();
                }
            }
        }));
    }
    done.notified().await;
    let took = start.elapsed();
    for t in tasks {
        t.abort();
    }
    took
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let url = std::env::var("COURIER_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let side = std::env::var("BENCH_SIDE");
    let client = Client::connect(&url).await.expect("connect");
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("bare connect");
    println!("amqp bench: {n} messages of 100 B, {PARTITIONS} partitions, {rounds} rounds");
    for r in 0..rounds {
        let ct = format!(
            "bench-courier-{}",
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let bt = format!(
            "bench-bare-{}",
            ulid::Ulid::new().to_string().to_lowercase()
        );
        for t in [&ct, &bt] {
            client
                .admin()
                .create_topic(TopicSpec::new(t, PARTITIONS))
                .await
                .expect("topic");
        }
        // CPU µs per message of the whole process (broker excluded): what the client
        // costs, whatever the broker's speed on a shared machine.
        if side.as_deref() == Ok("courier") {
            let (cp, cp_cpu) = with_cpu(n, courier_produce(&client, &ct, n)).await;
            let (cc, cc_cpu) = with_cpu(n, courier_consume(&client, &ct, n)).await;
            println!(
                "round {r}: courier produce {} cpu/msg {cp_cpu:.1} µs | consume {} cpu/msg {cc_cpu:.1} µs",
                rate(n, cp),
                rate(n, cc)
            );
        } else if side.as_deref() == Ok("bare") {
            let (bp, bp_cpu) = with_cpu(n, bare_produce(&conn, &bt, n)).await;
            let (bc, bc_cpu) = with_cpu(n, bare_consume(&conn, &bt, n)).await;
            println!(
                "round {r}: bare produce {} cpu/msg {bp_cpu:.1} µs | consume {} cpu/msg {bc_cpu:.1} µs",
                rate(n, bp),
                rate(n, bc)
            );
        } else {
            side_by_side(&client, &conn, [&ct, &bt], n, r).await;
        }
        for t in [&ct, &bt] {
            client.admin().delete_topic(t).await.expect("delete");
        }
    }
    client
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}

/// Round `r` of both sides, Courier's first, on topics `[courier, bare]`.
async fn side_by_side(client: &Client, conn: &Connection, [ct, bt]: [&str; 2], n: usize, r: usize) {
    let (cp, cp_cpu) = with_cpu(n, courier_produce(client, ct, n)).await;
    let (bp, bp_cpu) = with_cpu(n, bare_produce(conn, bt, n)).await;
    let (cc, cc_cpu) = with_cpu(n, courier_consume(client, ct, n)).await;
    let (bc, bc_cpu) = with_cpu(n, bare_consume(conn, bt, n)).await;
    println!(
        "round {r}: produce courier {} | bare {} | ratio {:.0}% | cpu/msg {cp_cpu:.1} / {bp_cpu:.1} µs",
        rate(n, cp),
        rate(n, bp),
        100.0 * bp.as_secs_f64() / cp.as_secs_f64()
    );
    println!(
        "round {r}: consume courier {} | bare {} | ratio {:.0}% | cpu/msg {cc_cpu:.1} / {bc_cpu:.1} µs",
        rate(n, cc),
        rate(n, bc),
        100.0 * bc.as_secs_f64() / cc.as_secs_f64()
    );
}
