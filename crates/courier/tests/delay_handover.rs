//! A clean hand-over of the schedule log between two scheduler members. Member B
//! joins while A owns the only partition, so B's start marker lands in the log after
//! an early far-future entry (which pins the group's position) and before messages A
//! then moves. When A leaves, B reads the partition again from that position: B's old
//! start marker must not count as "caught up", or B would move A's messages again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use courier::{now_millis, Client, Config, Message};

mod common;

fn config(url: &str) -> Config {
    let mut c = Config::with_url(url);
    c.consumer.session_timeout_ms = 6000;
    c.consumer.auto_commit_interval_ms = 100;
    c
}

async fn member(url: &str, scope: &str) -> Client {
    let client = Client::connect_with(config(url)).await.expect("connect");
    client
        .set_schedule_options(common::one_log_partition(scope))
        .expect("options");
    client
}

async fn hand_over(url: &str) {
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let topic = format!("delay-handover-{run}");
    let scope = format!("handover-{run}");
    let a = member(url, &scope).await;
    common::topic_and_scheduler(&a, &topic, Duration::from_secs(60)).await;
    // Pins the group's position (committed prefix, or ack floor) before B's marker.
    a.producer()
        .send(Message::new(&topic, "later").delay(Duration::from_secs(3600)))
        .await
        .expect("send far");
    let b = member(url, &scope).await;
    b.start_scheduler().await.expect("b joins");
    if b.scheduler_ready(Duration::from_secs(4)).await.is_ok() {
        eprintln!("{url}: the new member took the partition at once; scenario not reached");
        let _ = b.shutdown(Duration::from_secs(10)).await;
        let _ = a.shutdown(Duration::from_secs(10)).await;
        return;
    }
    let (consumer, mut rx) = common::id_reporter(&b, format!("check-{run}"), &topic).await;
    let due = now_millis() + 1000;
    let ids: Vec<String> = a
        .producer()
        .send_batch(
            (0..10)
                .map(|i| Message::new(&topic, format!("{i}")).deliver_at(due))
                .collect(),
        )
        .await
        .expect("send")
        .into_iter()
        .map(|r| r.id)
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    common::count_until_all(
        &mut rx,
        &mut seen,
        &ids,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    // A leaves; B takes the partition over and catches up.
    a.shutdown(Duration::from_secs(10)).await.expect("a leaves");
    b.scheduler_ready(Duration::from_secs(60))
        .await
        .expect("b owns the partition");
    common::count_until(&mut rx, &mut seen, Instant::now() + Duration::from_secs(6)).await;
    consumer.stop().await.expect("stop");
    let _ = b.admin().delete_topic(&topic).await;
    let _ = b
        .admin()
        .delete_topic(&b.schedule_options().log_topic())
        .await;
    let _ = b.shutdown(Duration::from_secs(10)).await;
    let repeats: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "{url}: {} of {} delivered, {repeats} repeats",
        seen.len(),
        ids.len()
    );
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1), "delivered once: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_hand_over_repeats_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    hand_over(&format!("file://{}", dir.path().display())).await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_hand_over_repeats_nothing() {
    hand_over(
        &std::env::var("COURIER_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
    )
    .await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hand_over_repeats_nothing() {
    hand_over(
        &std::env::var("COURIER_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    )
    .await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_hand_over_repeats_nothing() {
    hand_over(
        &std::env::var("COURIER_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into()),
    )
    .await;
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_hand_over_repeats_nothing() {
    hand_over(
        &std::env::var("COURIER_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    )
    .await;
}
