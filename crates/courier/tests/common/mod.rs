//! What the delayed-message and redelivery tests share: a consumer that reports the
//! id of every delivery it sees (no dedup, so repeats show), and counting them.
// Each test crate compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use courier::{Client, ConsumerHandle, Delivery, Error, ScheduleOptions, TopicSpec};
use tokio::sync::mpsc;

/// Starts `group` on `topic` from the earliest message, without id dedup; every
/// delivery's id comes out of the receiver.
pub async fn id_reporter(
    client: &Client,
    group: String,
    topic: &str,
) -> (ConsumerHandle, mpsc::UnboundedReceiver<String>) {
    slow_id_reporter(client, group, topic, Duration::ZERO).await
}

/// [`id_reporter`] whose handler takes `hold` per delivery after reporting its id.
pub async fn slow_id_reporter(
    client: &Client,
    group: String,
    topic: &str,
    hold: Duration,
) -> (ConsumerHandle, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let consumer = client
        .consumer(group)
        .from_earliest()
        // No id dedup: repeats must be seen to be counted.
        .bare()
        .start([topic.to_string()], move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(d.id.to_string());
                if !hold.is_zero() {
                    tokio::time::sleep(hold).await;
                }
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("consumer");
    (consumer, rx)
}

/// Adds to `seen` the ids received until every one of `ids` was seen or `deadline`
/// passed.
pub async fn count_until_all(
    rx: &mut mpsc::UnboundedReceiver<String>,
    seen: &mut HashMap<String, usize>,
    ids: &[String],
    deadline: Instant,
) {
    while !ids.iter().all(|id| seen.contains_key(id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(id)) => *seen.entry(id).or_default() += 1,
            _ => break,
        }
    }
}

/// Adds to `seen` every id received until `until`.
pub async fn count_until(
    rx: &mut mpsc::UnboundedReceiver<String>,
    seen: &mut HashMap<String, usize>,
    until: Instant,
) {
    while let Ok(Some(id)) =
        tokio::time::timeout(until.saturating_duration_since(Instant::now()), rx.recv()).await
    {
        *seen.entry(id).or_default() += 1;
    }
}

/// Schedule options with one schedule-log partition under `scope` (one member owns
/// the whole log, which the hand-over and crash scenarios need).
pub fn one_log_partition(scope: &str) -> ScheduleOptions {
    ScheduleOptions {
        scope: scope.to_string(),
        partitions: 1,
        ..ScheduleOptions::default()
    }
}

/// Creates `topic` with one partition and waits up to `within` for `client`'s
/// scheduler to own its log and catch up.
pub async fn topic_and_scheduler(client: &Client, topic: &str, within: Duration) {
    client
        .admin()
        .ensure_topic(TopicSpec::new(topic, 1))
        .await
        .expect("topic");
    client
        .scheduler_ready(within)
        .await
        .expect("scheduler ready");
}
