//! The crash window of delayed messages, hit on purpose: a scheduler member whose
//! driver never completes the publish of a `moved` marker (so the due batch reached
//! its targets, but the move was not recorded) is torn down with its runtime, like a
//! crash at that instant. A new member must then deliver every message exactly once
//! on backends that declare `read_by_position` (it looks the batch up in the target)
//! or `store_once` (NATS: the backend drops the repeated move, same `Nats-Msg-Id`);
//! elsewhere the repeats are counted and printed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use courier::{
    now_millis, Capabilities, Client, Config, Driver, GroupInfo, Message, Receipt, Record, ResetTo,
    Result, TopicInfo, TopicPartition, TopicSpec,
};
use courier_core::{SubscribeSpec, Subscription};

mod common;

/// Delegates to the real driver, except that a batch holding a `moved` marker never
/// completes (and is never stored).
struct NoMarkers {
    inner: Arc<dyn Driver>,
    hit: Arc<AtomicBool>,
}

#[async_trait]
impl Driver for NoMarkers {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, batch: Vec<Record>) -> Result<Vec<Receipt>> {
        if batch
            .iter()
            .any(|r| r.headers.get_str("x-courier-kind") == Some("moved"))
        {
            self.hit.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.inner.publish(batch).await
    }
    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        self.inner.subscribe(spec).await
    }
    async fn health(&self) -> Result<()> {
        self.inner.health().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        self.inner.partitions(topic).await
    }
    async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        self.inner.create_topic(spec).await
    }
    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.inner.delete_topic(name).await
    }
    async fn list_topics(&self) -> Result<Vec<String>> {
        self.inner.list_topics().await
    }
    async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        self.inner.describe_topic(name).await
    }
    async fn list_groups(&self) -> Result<Vec<String>> {
        self.inner.list_groups().await
    }
    async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        self.inner.describe_group(group).await
    }
    async fn read_records(
        &self,
        tp: &TopicPartition,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        self.inner.read_records(tp, from, max).await
    }
    async fn reset_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<()> {
        self.inner.reset_offsets(group, topic, to).await
    }
}

fn config(url: &str) -> Config {
    let mut c = Config {
        url: Some(url.to_string()),
        ..Config::default()
    };
    c.consumer.auto_commit_interval_ms = 100;
    c.consumer.session_timeout_ms = 6000;
    if url.starts_with("kafka") {
        // The dead member never leaves, and a join may wait for it up to the
        // rebalance timeout (librdkafka's max.poll.interval.ms, 300 s by default).
        // One CI run timed out in `scheduler_ready` (60 s), most likely on that, so
        // it is bounded to 10 s here.
        c.backend
            .insert("max.poll.interval.ms".to_string(), "10000".to_string());
    }
    if url.starts_with("nats") {
        // Longer than the session timeout, as by default (30 s vs 10 s): the next
        // member owns the partition before JetStream would give the dead member's
        // unacknowledged entries back on its own (behind newer records), so the
        // catch-up must not rely on that; and short enough for a repeat (if any) to
        // land within the settle window.
        c.backend
            .insert("nats.ack_wait_ms".to_string(), "12000".to_string());
    }
    c
}

/// Runs the scenario on `url`; returns (messages, delivered at least once, repeats,
/// whether the backend declares a way to repeat nothing: `read_by_position` or
/// `store_once`).
fn crash_in_window(url: &str) -> (usize, usize, usize, bool) {
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let topic = format!("delay-window-{run}");
    let scope = format!("window-{run}");
    const N: usize = 20;

    // The member that "crashes": its runtime is dropped while the marker hangs.
    let a = tokio::runtime::Runtime::new().expect("runtime");
    let ids = a.block_on(async {
        let real = Client::connect_with(config(url)).await.expect("connect");
        let hit = Arc::new(AtomicBool::new(false));
        let driver = Arc::new(NoMarkers {
            inner: real.driver().clone(),
            hit: hit.clone(),
        });
        let client = Client::from_driver(driver, config(url));
        client
            .set_schedule_options(common::one_log_partition(&scope))
            .expect("opts");
        common::topic_and_scheduler(&client, &topic, Duration::from_secs(60)).await;
        let due = now_millis() + 1000;
        let msgs = (0..N)
            .map(|i| Message::new(&topic, format!("{i}")).deliver_at(due))
            .collect();
        let receipts = client.producer().send_batch(msgs).await.expect("send");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !hit.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(hit.load(Ordering::SeqCst), "no move happened");
        let ids: Vec<String> = receipts.into_iter().map(|r| r.id).collect();
        std::mem::forget(client);
        std::mem::forget(real);
        ids
    });
    // Every task of that member stops here, mid-publish: no marker, no commit.
    a.shutdown_background();

    let b = tokio::runtime::Runtime::new().expect("runtime");
    b.block_on(async {
        let client = Client::connect_with(config(url)).await.expect("connect");
        client
            .set_schedule_options(common::one_log_partition(&scope))
            .expect("opts");
        let caps = client.capabilities();
        let declared = caps.read_by_position || caps.store_once;
        let (consumer, mut rx) = common::id_reporter(&client, format!("check-{run}"), &topic).await;
        // Caught up on the schedule log (after the dead member's lease ran out): any
        // repeat has been published by the time the settle window below ends.
        client
            .scheduler_ready(Duration::from_secs(60))
            .await
            .expect("scheduler ready");
        let mut seen: HashMap<String, usize> = HashMap::new();
        common::count_until_all(
            &mut rx,
            &mut seen,
            &ids,
            Instant::now() + Duration::from_secs(60),
        )
        .await;
        // Past the dead member's session timeout (6 s), and `ack_wait` on NATS.
        let settle = Instant::now()
            + if url.starts_with("nats") {
                Duration::from_secs(16)
            } else {
                Duration::from_secs(8)
            };
        common::count_until(&mut rx, &mut seen, settle).await;
        let delivered = ids.iter().filter(|id| seen.contains_key(*id)).count();
        let repeats = seen.values().map(|n| n - 1).sum::<usize>();
        consumer.stop().await.expect("stop");
        let _ = client.shutdown(Duration::from_secs(10)).await;
        (ids.len(), delivered, repeats, declared)
    })
}

fn check(url: &str) {
    let (n, delivered, repeats, declared) = crash_in_window(url);
    eprintln!("{url}: {n} moved before the crash, {delivered} delivered, {repeats} repeats (declared exact {declared})");
    assert_eq!(delivered, n, "lost delayed messages");
    if declared {
        assert_eq!(repeats, 0, "repeated after a crash in the window");
    }
}

#[test]
fn file_crash_between_move_and_marker_repeats_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    check(&format!("file://{}", dir.path().display()));
}

#[cfg(feature = "redis")]
#[test]
fn redis_crash_between_move_and_marker_repeats_nothing() {
    check(&std::env::var("COURIER_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()));
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_crash_between_move_and_marker_repeats_nothing() {
    check(&std::env::var("COURIER_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into()));
}

#[cfg(feature = "nats")]
#[test]
fn nats_crash_between_move_and_marker_repeats_nothing() {
    check(&std::env::var("COURIER_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()));
}

#[cfg(feature = "amqp")]
#[test]
fn amqp_crash_between_move_and_marker_repeats_nothing() {
    check(
        &std::env::var("COURIER_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    );
}
