//! The broker-restart scenario shared by the backends' restart tests: keyed batches are
//! published while a group member consumes, the broker is restarted halfway (by the
//! test's own `restart`), and afterwards every acknowledged publish must be delivered.
//! Duplicates are allowed (at-least-once) and counted.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::time::Duration;

use bytes::Bytes;
use courier::{Driver, Headers, OffsetReset, Record, TopicSpec};
use courier_core::{Delivery, SubscribeSpec, Subscription};

/// A free TCP port on 127.0.0.1 (for a private broker).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn record(topic: &str, i: usize) -> Record {
    Record {
        topic: topic.to_string(),
        partition: None,
        id: format!("m{i}"),
        key: Some(Bytes::from(format!("k{}", i % 7))),
        value: Bytes::from(format!("v{i}")),
        headers: Headers::new(),
        timestamp: 1,
    }
}

fn take(ds: Vec<Delivery>, received: &mut HashMap<String, usize>) {
    for d in ds {
        *received.entry(d.id.to_string()).or_default() += 1;
        d.ack();
    }
}

/// Publishes `total` messages in batches of 10 to a new 2-partition topic while a
/// member of a new group reads from earliest, calls `restart` once halfway, then reads
/// until every acknowledged message arrived (or `drain` passed). Panics if an
/// acknowledged message is missing or the driver is unhealthy afterwards.
pub async fn publish_through_restart(
    label: &str,
    driver: &dyn Driver,
    total: usize,
    drain: Duration,
    mut restart: impl FnMut(),
) {
    let topic = "restart.test";
    driver
        .create_topic(TopicSpec::new(topic, 2))
        .await
        .expect("create");
    let mut spec = SubscribeSpec::new("restart.group", vec![topic.to_string()]);
    spec.auto_offset_reset = OffsetReset::Earliest;
    let mut sub: Box<dyn Subscription> = driver.subscribe(spec).await.expect("subscribe");

    let mut acked: HashSet<String> = HashSet::new();
    let mut received: HashMap<String, usize> = HashMap::new();
    let mut attempts = 0;
    let mut restarted = false;
    let mut i = 0;
    while i < total {
        if i >= total / 2 && !restarted {
            restart();
            restarted = true;
        }
        attempts += 1;
        let batch: Vec<Record> = (i..(i + 10).min(total)).map(|j| record(topic, j)).collect();
        let n = batch.len();
        match tokio::time::timeout(Duration::from_secs(15), driver.publish(batch)).await {
            Ok(Ok(receipts)) => {
                acked.extend(receipts.into_iter().map(|r| r.id));
                i += n;
            }
            // Not acknowledged: sent again (so duplicates are possible).
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        assert!(attempts < 2000, "{label}: the driver never recovered");
        // Consume as we go, so the member runs through the restart too.
        if let Ok(Ok(Some(ds))) =
            tokio::time::timeout(Duration::from_millis(1), sub.next_batch(512)).await
        {
            take(ds, &mut received);
        }
    }
    assert_eq!(acked.len(), total);
    let deadline = tokio::time::Instant::now() + drain;
    while !acked.iter().all(|id| received.contains_key(id)) {
        match tokio::time::timeout_at(deadline, sub.next_batch(512)).await {
            Ok(Ok(Some(ds))) => take(ds, &mut received),
            Ok(Ok(None)) => panic!("{label}: subscription ended"),
            // A fetch error while the member re-attaches is retried until the deadline.
            Ok(Err(e)) => {
                eprintln!("{label}: fetch failed (retrying): {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => break,
        }
    }
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !received.contains_key(*id))
        .collect();
    let duplicates: usize = received.values().map(|n| n - 1).sum();
    eprintln!(
        "{label}: {total} acknowledged, {} received distinct, {duplicates} duplicate deliveries, {attempts} publish calls",
        received.len()
    );
    assert!(
        missing.is_empty(),
        "{label}: {} acknowledged messages lost, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    sub.close().await.expect("close");
    driver.health().await.expect("healthy after restart");
}
