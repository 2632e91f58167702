//! Courier on kafka:// side by side with bare rdkafka, in one run, on one broker
//! (127.0.0.1:9092 unless COURIER_KAFKA_URL is set): producer vs a bare
//! `FutureProducer` with the same librdkafka settings (everything in flight), consumer
//! vs a bare `StreamConsumer`, timed from subscribe including the group join.
//! Courier's default settings, 100-byte incompressible values, keyed messages.
//!
//! `cargo bench -p courier --features kafka --bench kafka` (BENCH_N messages, default
//! 500000; BENCH_ROUNDS rounds, default 2).

mod common;

use common::{courier_produce, env_usize, rate, unique, value, with_cpu};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{Client, Config, Delivery, Error, TopicSpec};
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const PARTITIONS: u32 = 4;

async fn bare_produce(config: &Config, topic: &str, n: usize, with_id: bool) -> Duration {
    let producer: FutureProducer = courier_kafka::config::producer(config)
        .expect("config")
        .create()
        .expect("producer");
    let start = Instant::now();
    let mut futures = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("k{}", i % 1000);
        let v = value(i);
        let mut record = FutureRecord::to(topic).payload(&v).key(key.as_bytes());
        if with_id {
            // What Courier adds to every record: its message id header.
            let id = format!("{:026}", i);
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "x-message-id",
                value: Some(id.as_bytes()),
            }));
        }
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    futures.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => panic!("send: {e}"),
            }
        }
    }
    for f in futures {
        f.await.expect("delivery").expect("delivered");
    }
    start.elapsed()
}

/// (from subscribe, from first message)
async fn courier_consume(client: &Client, topic: &str, n: usize) -> (Duration, Duration) {
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let first = Arc::new(parking_lot::Mutex::new(None::<Instant>));
    let (c, d, f) = (count.clone(), done.clone(), first.clone());
    let start = Instant::now();
    let handle = client
        .consumer(unique("bench-courier"))
        .from_earliest()
        .start([topic.to_string()], move |_m: Delivery| {
            let (c, d, f) = (c.clone(), d.clone(), f.clone());
            async move {
                if c.fetch_add(1, Ordering::Relaxed) == 0 {
                    *f.lock() = Some(Instant::now());
                }
                if c.load(Ordering::Relaxed) >= n {
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
    let after_first = first.lock().map_or(total, |t| t.elapsed());
    handle.stop().await.expect("stop");
    (total, after_first)
}

async fn bare_consume(config: &Config, topic: &str, n: usize) -> (Duration, Duration) {
    let mut kc = courier_kafka::config::consumer(
        config,
        &unique("bench-bare"),
        courier::OffsetReset::Earliest,
        config.consumer.session_timeout_ms,
    )
    .expect("config");
    // A bare client as usually written: librdkafka stores and auto-commits offsets.
    kc.set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "true");
    let start = Instant::now();
    let consumer: StreamConsumer = kc.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut stream = consumer.stream();
    let mut got = 0;
    let mut first = None;
    while got < n {
        let m = tokio::time::timeout(Duration::from_secs(300), stream.next())
            .await
            .expect("consumed in time")
            .expect("stream open")
            .expect("message");
        std::hint::black_box(&m);
        if first.is_none() {
            first = Some(Instant::now());
        }
        got += 1;
    }
    let total = start.elapsed();
    (total, first.map_or(total, |t| t.elapsed()))
}

#[tokio::main]
async fn main() {
    let n = env_usize("BENCH_N", 500_000);
    let rounds = env_usize("BENCH_ROUNDS", 2);
    let url =
        std::env::var("COURIER_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let config = Config::with_url(url);
    let client = Client::connect_with(config.clone()).await.expect("connect");
    println!("kafka bench: {n} messages of 100 bytes, {PARTITIONS} partitions, Courier defaults (acks=1, linger.ms=5, batch.size=16384, lz4, session.timeout.ms={})", config.consumer.session_timeout_ms);
    let (mut ours_p, mut bare_p, mut ours_c, mut bare_c) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ours_cf, mut bare_cf) = (Vec::new(), Vec::new());
    let mut bare_id_p = Vec::new();
    for round in 0..rounds {
        let t_ours = unique("bench-ours");
        let t_bare = unique("bench-bare");
        let t_bare_id = unique("bench-bare-id");
        for t in [&t_ours, &t_bare, &t_bare_id] {
            client
                .admin()
                .create_topic(TopicSpec::new(t, PARTITIONS))
                .await
                .expect("create");
        }
        let (b, b_cpu) = with_cpu(n, bare_produce(&config, &t_bare, n, false)).await;
        let (o, o_cpu) = with_cpu(n, courier_produce(&client, &t_ours, n)).await;
        let (bi, bi_cpu) = with_cpu(n, bare_produce(&config, &t_bare_id, n, true)).await;
        println!("round {round}: produce CPU µs/msg: courier {o_cpu:.2}  bare {b_cpu:.2}  bare + id header {bi_cpu:.2}");
        println!(
            "round {round}: produce  courier {:>9.0} msg/s   bare FutureProducer {:>9.0} msg/s   bare + x-message-id header {:>9.0} msg/s",
            rate(n, o), rate(n, b), rate(n, bi)
        );
        bare_id_p.push(rate(n, bi));
        ours_p.push(rate(n, o));
        bare_p.push(rate(n, b));
        // Each consumer reads the topic the other producer wrote (same content).
        let ((bt, bf), bc_cpu) = with_cpu(n, bare_consume(&config, &t_ours, n)).await;
        let ((ot, of), oc_cpu) = with_cpu(n, courier_consume(&client, &t_bare, n)).await;
        println!("round {round}: consume CPU µs/msg: courier {oc_cpu:.2}  bare {bc_cpu:.2}");
        println!(
            "round {round}: consume  courier {:>9.0} msg/s ({:.2} s incl. join; {:>9.0} msg/s after first)   bare StreamConsumer {:>9.0} msg/s ({:.2} s incl. join; {:>9.0} msg/s after first)",
            rate(n, ot), ot.as_secs_f64(), rate(n, of), rate(n, bt), bt.as_secs_f64(), rate(n, bf)
        );
        ours_c.push(rate(n, ot));
        bare_c.push(rate(n, bt));
        ours_cf.push(rate(n, of));
        bare_cf.push(rate(n, bf));
        for t in [&t_ours, &t_bare, &t_bare_id] {
            let _ = client.admin().delete_topic(t).await;
        }
    }
    let best = |v: &Vec<f64>| v.iter().cloned().fold(0.0, f64::max);
    println!("| what | courier msg/s | bare rdkafka msg/s | courier / bare |");
    println!("|---|---|---|---|");
    for (what, o, b) in [
        ("produce (best of rounds)", best(&ours_p), best(&bare_p)),
        (
            "produce vs bare with the same id header (best)",
            best(&ours_p),
            best(&bare_id_p),
        ),
        (
            "consume incl. group join (best)",
            best(&ours_c),
            best(&bare_c),
        ),
        (
            "consume after first message (best)",
            best(&ours_cf),
            best(&bare_cf),
        ),
    ] {
        println!("| {what} | {o:.0} | {b:.0} | {:.0}% |", 100.0 * o / b);
    }
    client
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
