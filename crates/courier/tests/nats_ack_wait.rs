//! JetStream sends a delivery again once its `ack_wait` runs out. A delivery Courier
//! still holds — a delayed message waiting in the scheduler, or a slow handler —
//! must neither be handed out twice nor be sent again by the server (progress acks
//! keep its timer fresh). `ack_wait` is 2 s here; everything is held for longer.
#![cfg(feature = "nats")]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use courier::{now_millis, Client, Config, Message, TopicSpec};

mod common;

fn url() -> String {
    std::env::var("COURIER_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn client_with_ack_wait(ms: u64) -> Client {
    let mut c = Config::with_url(url());
    c.backend.insert("nats.ack_wait_ms".into(), ms.to_string());
    Client::connect_with(c).await.expect("connect")
}

async fn client() -> Client {
    client_with_ack_wait(2000).await
}

/// Creates `topic` with one partition and sends `n` plain messages to it.
async fn topic_with(client: &Client, topic: &str, n: usize) -> Vec<courier::Receipt> {
    client
        .admin()
        .ensure_topic(TopicSpec::new(topic, 1))
        .await
        .expect("topic");
    client
        .producer()
        .send_batch(
            (0..n)
                .map(|i| Message::new(topic, format!("{i}")))
                .collect(),
        )
        .await
        .expect("send")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_longer_than_ack_wait_is_delivered_once() {
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let topic = format!("nats-held-delay-{run}");
    let client = client().await;
    client
        .set_schedule_options(common::one_log_partition(&format!("held-{run}")))
        .expect("options");
    common::topic_and_scheduler(&client, &topic, Duration::from_secs(30)).await;
    let due = now_millis() + 8000;
    let msgs = (0..5)
        .map(|i| Message::new(&topic, format!("{i}")).deliver_at(due))
        .collect();
    let receipts = client.producer().send_batch(msgs).await.expect("send");
    let (consumer, mut rx) =
        common::id_reporter(&client, format!("held-delay-{run}"), &topic).await;
    let mut seen = HashMap::new();
    common::count_until(&mut rx, &mut seen, Instant::now() + Duration::from_secs(16)).await;
    consumer.stop().await.expect("stop");
    let _ = client.admin().delete_topic(&topic).await;
    let _ = client
        .admin()
        .delete_topic(&client.schedule_options().log_topic())
        .await;
    for r in &receipts {
        assert_eq!(seen.get(&r.id), Some(&1), "delivered once: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_ack_wait_runs_once() {
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let topic = format!("nats-held-handler-{run}");
    let client = client().await;
    let receipts = topic_with(&client, &topic, 3).await;
    let (consumer, mut rx) = common::slow_id_reporter(
        &client,
        format!("held-handler-{run}"),
        &topic,
        Duration::from_millis(2500),
    )
    .await;
    let mut seen = HashMap::new();
    common::count_until(&mut rx, &mut seen, Instant::now() + Duration::from_secs(14)).await;
    consumer.stop().await.expect("stop");
    let _ = client.admin().delete_topic(&topic).await;
    for r in &receipts {
        assert_eq!(seen.get(&r.id), Some(&1), "handled once: {seen:?}");
    }
}

/// What a member still has of `topic`'s partition 0 after a crash of the previous
/// owner, which had acknowledged the 2nd and 3rd of five messages only: with
/// `replay_after_takeover`, all five again in log order (from the ack floor);
/// without, only the unacknowledged ones, and only once `ack_wait` (12 s, longer than
/// the 3 s session) ran out.
fn after_takeover(replay: bool) -> Vec<String> {
    use courier_core::{OffsetReset, SubscribeSpec};
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let topic = format!("nats-takeover-{run}");
    let group = format!("takeover-{run}");
    let spec = move |topic: &str| {
        let mut s = SubscribeSpec::new(group.clone(), vec![topic.to_string()]);
        s.auto_offset_reset = OffsetReset::Earliest;
        s.session_timeout = Duration::from_secs(3);
        s.replay_after_takeover = replay;
        s
    };
    let dead = tokio::runtime::Runtime::new().expect("runtime");
    let (ids, spec) = dead.block_on(async {
        let client = client_with_ack_wait(12_000).await;
        let receipts = topic_with(&client, &topic, 5).await;
        let mut sub = client
            .driver()
            .subscribe(spec(&topic))
            .await
            .expect("subscribe");
        let mut got = Vec::new();
        while got.len() < 5 {
            got.extend(sub.next_batch(10).await.expect("read").expect("open"));
        }
        for d in &mut got[1..3] {
            d.take_ack().expect("ack handle").ack();
        }
        // Let the settler write the two acks, then die without a word.
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::mem::forget(sub);
        std::mem::forget(got);
        std::mem::forget(client);
        let ids: Vec<String> = receipts.into_iter().map(|r| r.id).collect();
        (ids, spec)
    });
    dead.shutdown_background();
    let next = tokio::runtime::Runtime::new().expect("runtime");
    next.block_on(async {
        let client = client_with_ack_wait(12_000).await;
        let mut sub = client
            .driver()
            .subscribe(spec(&topic))
            .await
            .expect("subscribe");
        let mut seen = Vec::new();
        let until = Instant::now() + Duration::from_secs(9);
        while let Ok(Ok(Some(batch))) = tokio::time::timeout(
            until.saturating_duration_since(Instant::now()),
            sub.next_batch(10),
        )
        .await
        {
            for mut d in batch {
                seen.push(d.id.to_string());
                if let Some(a) = d.take_ack() {
                    a.ack();
                }
            }
        }
        sub.close().await.expect("close");
        let _ = client.admin().delete_topic(&topic).await;
        assert_eq!(ids.len(), 5);
        seen.iter()
            .map(|id| {
                ids.iter()
                    .position(|i| i == id)
                    .map_or("?".into(), |p| p.to_string())
            })
            .collect()
    })
}

#[test]
fn a_takeover_after_a_crash_replays_from_the_ack_floor_in_order() {
    assert_eq!(after_takeover(true), ["0", "1", "2", "3", "4"]);
}

#[test]
fn without_replay_a_takeover_gets_nothing_before_ack_wait() {
    // The control: what the scheduler's catch-up could not rely on.
    assert_eq!(after_takeover(false), Vec::<String>::new());
}
