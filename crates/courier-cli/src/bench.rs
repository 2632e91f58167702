//! `courier bench`: throughput of produce and consume, and end-to-end latency at a
//! fixed rate, through the public API, against any backend.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use courier::{Client, Delivery, Error, Message, OffsetReset, TopicSpec};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Produce, then consume, then latency.
    All,
    Produce,
    Consume,
    Latency,
}

#[derive(clap::Args)]
pub struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// Messages to produce and consume.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Concurrent sending tasks.
    #[arg(long, default_value_t = 4)]
    producers: u64,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Topic (default: a fresh bench-… topic).
    #[arg(long)]
    topic: Option<String>,
    /// Messages per second for the latency run.
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
}

struct Row {
    what: &'static str,
    count: u64,
    secs: f64,
    bytes: u64,
    note: String,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>9} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn unique_topic() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("bench-{nanos}")
}

async fn produce(client: &Client, topic: &str, args: &Args) -> anyhow::Result<Row> {
    let value = vec![b'x'; args.size];
    let pb = bar(args.messages, "produce");
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per = args.messages / args.producers.max(1);
    for p in 0..args.producers.max(1) {
        let producer = client.producer();
        let (topic, value, pb) = (topic.to_string(), value.clone(), pb.clone());
        let n = if p == 0 {
            args.messages - per * (args.producers.max(1) - 1)
        } else {
            per
        };
        tasks.push(tokio::spawn(async move {
            let value = bytes::Bytes::from(value);
            let mut window = VecDeque::new();
            for i in 0..n {
                let msg = Message::new(&topic, value.clone()).key(format!("k{}", i % 1024));
                window.push_back(producer.send(msg));
                if window.len() >= 50_000 {
                    if let Some(h) = window.pop_front() {
                        h.await?;
                        pb.inc(1);
                    }
                }
            }
            for h in window {
                h.await?;
                pb.inc(1);
            }
            Ok::<(), Error>(())
        }));
    }
    for t in tasks {
        t.await.context("producer task")??;
    }
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    Ok(Row {
        what: "produce",
        count: args.messages,
        secs,
        bytes: args.messages * args.size as u64,
        note: format!("{} sender task(s)", args.producers),
    })
}

async fn consume(client: &Client, topic: &str, args: &Args) -> anyhow::Result<Row> {
    let pb = bar(args.messages, "consume");
    let seen = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let target = args.messages;
    let started = Instant::now();
    let s = seen.clone();
    let pbc = pb.clone();
    let consumer = client
        .consumer(format!("{topic}.bench.group"))
        .auto_offset_reset(OffsetReset::Earliest)
        .start([topic.to_string()], move |_d: Delivery| {
            let n = s.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 4096 == 0 {
                pbc.set_position(n);
            }
            let done = done_tx.clone();
            async move {
                if n == target {
                    let _ = done.send(()).await;
                }
                Ok::<(), Error>(())
            }
        })
        .await?;
    let timeout = Duration::from_secs(600);
    tokio::time::timeout(timeout, done_rx.recv())
        .await
        .with_context(|| format!("consumed only {} of {target}", seen.load(Ordering::Relaxed)))?;
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    consumer.stop().await?;
    Ok(Row {
        what: "consume",
        count: target,
        secs,
        bytes: target * args.size as u64,
        note: "from subscribe, incl. group join; handler + ack + commit".into(),
    })
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn latency(client: &Client, topic: &str, args: &Args) -> anyhow::Result<Row> {
    let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
    let consumer = client
        .consumer(format!("{topic}.latency.group"))
        .auto_offset_reset(OffsetReset::Latest)
        .start([topic.to_string()], move |d: Delivery| {
            let sent: Option<u64> = d
                .headers
                .get_str("x-bench-sent-us")
                .and_then(|s| s.parse().ok());
            if let Some(sent) = sent {
                let _ = tx.send(now_micros().saturating_sub(sent));
            }
            async { Ok::<(), Error>(()) }
        })
        .await?;
    consumer.wait_assigned(1, Duration::from_secs(60)).await?;
    let total = args.rate * args.duration;
    let pb = bar(total, "latency");
    let producer = client.producer();
    let value = bytes::Bytes::from(vec![b'x'; args.size]);
    let started = Instant::now();
    // Send in 1 ms ticks so the rate is steady rather than bursty.
    let per_tick = (args.rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut handles = Vec::new();
    while sent < total {
        tick.tick().await;
        for _ in 0..per_tick.min(total - sent) {
            let msg = Message::new(topic, value.clone())
                .header("x-bench-sent-us", now_micros().to_string());
            handles.push(producer.send(msg));
            sent += 1;
        }
        pb.set_position(sent);
    }
    for h in handles {
        h.await?;
    }
    let mut lat = Vec::with_capacity(total as usize);
    while (lat.len() as u64) < total {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(us)) => lat.push(us),
            _ => break,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    consumer.stop().await?;
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0
    };
    Ok(Row {
        what: "latency",
        count: lat.len() as u64,
        secs,
        bytes: lat.len() as u64 * args.size as u64,
        note: format!(
            "at {} msg/s: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            args.rate,
            pct(0.5),
            pct(0.99),
            pct(1.0)
        ),
    })
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let topic = args.topic.clone().unwrap_or_else(unique_topic);
    client
        .admin()
        .ensure_topic(TopicSpec::new(&topic, args.partitions))
        .await?;
    let mut rows = Vec::new();
    if matches!(args.mode, Mode::All | Mode::Produce) {
        rows.push(produce(client, &topic, &args).await?);
    }
    if matches!(args.mode, Mode::All | Mode::Consume) {
        rows.push(consume(client, &topic, &args).await?);
    }
    if matches!(args.mode, Mode::All | Mode::Latency) {
        rows.push(latency(client, &topic, &args).await?);
    }
    println!(
        "backend {} · topic {topic} · {} partition(s) · {}-byte values",
        client.backend(),
        args.partitions,
        args.size
    );
    println!(
        "{:<8} {:>10} {:>9} {:>13} {:>9}  notes",
        "phase", "messages", "seconds", "msg/s", "MB/s"
    );
    for r in rows {
        println!(
            "{:<8} {:>10} {:>9.3} {:>13.0} {:>9.1}  {}",
            r.what,
            r.count,
            r.secs,
            r.count as f64 / r.secs.max(1e-9),
            r.bytes as f64 / r.secs.max(1e-9) / 1e6,
            r.note
        );
    }
    Ok(())
}
