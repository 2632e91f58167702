//! Revocation waits for in-flight deliveries: a member that still holds unsettled
//! messages when a second member joins finishes them and commits before giving the
//! partitions up, so the new owner sees none of them again. Needs the broker on
//! 127.0.0.1:9092 (`scripts/brokers.sh start`).

use std::time::Duration;

use courier_core::{
    Config, Delivery, Driver, OffsetReset, Record, SubscribeSpec, Subscription, TopicSpec,
};
use courier_kafka::KafkaDriver;

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn spec(group: &str, topic: &str) -> SubscribeSpec {
    let mut s = SubscribeSpec::new(group, vec![topic.to_string()]);
    s.auto_offset_reset = OffsetReset::Earliest;
    s.session_timeout = Duration::from_secs(6);
    s.commit_interval = Duration::from_millis(100);
    s
}

async fn take(sub: &mut Box<dyn Subscription>, n: usize, within: Duration) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, sub.next_batch(100)).await {
            Ok(Ok(Some(b))) => got.extend(b),
            _ => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_partitions_finish_in_flight_work_before_moving() {
    let url =
        std::env::var("COURIER_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let d = KafkaDriver::connect(Config::with_url(url))
        .await
        .expect("connect");
    let topic = unique("rebalance");
    let group = unique("g");
    d.create_topic(TopicSpec::new(&topic, 2))
        .await
        .expect("create");
    let records = (0..20)
        .map(|i| Record {
            topic: topic.clone(),
            partition: Some(i % 2),
            id: format!("id-{i}"),
            key: None,
            value: format!("{i}").into(),
            headers: Default::default(),
            timestamp: 1,
        })
        .collect();
    d.publish(records).await.expect("publish");

    let mut a = d.subscribe(spec(&group, &topic)).await.expect("a");
    let got = take(&mut a, 20, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 20, "member a got everything");
    // Settle all but the last message of each partition: those stay "in flight".
    let (held, done): (Vec<_>, Vec<_>) = got.into_iter().partition(|m| m.offset == 9);
    assert_eq!(held.len(), 2);
    for m in done {
        m.ack();
    }
    let mut b = d.subscribe(spec(&group, &topic)).await.expect("b");
    // The rebalance starts (on tansu the join takes half the session timeout, ~3 s);
    // a's revocation must wait for the held messages, up to the 6 s session timeout.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    for m in held {
        m.ack();
    }
    let mut assigned = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !assigned && tokio::time::Instant::now() < deadline {
        let _ = take(&mut b, 1, Duration::from_millis(200)).await;
        assigned = !b.assignment().is_empty();
        let _ = take(&mut a, 1, Duration::from_millis(10)).await;
    }
    assert!(assigned, "member b got partitions");
    let again = take(&mut b, 1, Duration::from_secs(3)).await;
    assert!(
        again.is_empty(),
        "messages handled before the hand-over came back: {:?}",
        again
            .iter()
            .map(|m| (m.partition, m.offset))
            .collect::<Vec<_>>()
    );
    a.close().await.expect("close a");
    b.close().await.expect("close b");
    let info = d.describe_group(&group).await.expect("describe group");
    assert_eq!(info.total_lag(), 0, "{info:?}");
    d.delete_topic(&topic).await.expect("delete");
}
