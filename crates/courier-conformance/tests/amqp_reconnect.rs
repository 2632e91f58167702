//! Connection loss mid-stream: every connection of one driver (its publishing
//! connection and its group member's) is closed by the broker (`rabbitmqctl
//! close_connection`, only connections carrying this test's unique name) while
//! messages flow. Producing and consuming carry on after reconnecting, and every
//! message whose publish was confirmed is delivered (duplicates allowed:
//! at-least-once).
//!
//! Needs `rabbitmqctl` on the broker's machine (the CI machine runs RabbitMQ locally);
//! without it the test says so and does nothing.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use courier::{Client, Config, Delivery, Message, TopicSpec};

fn our_connections(tag: &str) -> Option<Vec<String>> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "user_provided_name"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .filter(|l| l.contains(tag))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect(),
    )
}

fn close(pid: &str) -> bool {
    Command::new("rabbitmqctl")
        .args(["-q", "close_connection", pid, "courier reconnect test"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_connection_loss() {
    let tag = format!(
        "courier-rc-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    if our_connections(&tag).is_none() {
        eprintln!("SKIPPED: rabbitmqctl is not usable here; cannot close connections");
        return;
    }
    let url = std::env::var("COURIER_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut config = Config::with_url(url);
    config.backend.insert("connectionName".into(), tag.clone());
    config.consumer.auto_commit_interval_ms = 100;
    let client = Client::connect_with(config).await.expect("connect");
    let topic = format!("{tag}-t");
    client
        .admin()
        .create_topic(TopicSpec::new(&topic, 2))
        .await
        .expect("topic");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let consumer = client
        .consumer(format!("{tag}-g"))
        .from_earliest()
        .start([topic.clone()], move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(d.value_str()?.to_string());
                Ok::<(), courier::Error>(())
            }
        })
        .await
        .expect("subscribe");
    consumer
        .wait_assigned(2, Duration::from_secs(30))
        .await
        .expect("assigned");

    let producer = client.producer();
    let total = 3000;
    let mut confirmed = HashSet::new();
    let mut received = HashSet::new();
    let mut closed = 0;
    for i in 0..total {
        let v = format!("m{i}");
        if producer
            .send(Message::new(&topic, v.clone()).key(format!("k{}", i % 10)))
            .await
            .is_ok()
        {
            confirmed.insert(v);
        }
        while let Ok(v) = rx.try_recv() {
            received.insert(v);
        }
        if i == total / 3 {
            let pids = our_connections(&tag).expect("list connections");
            assert!(pids.len() >= 2, "driver and member connections: {pids:?}");
            closed = pids.iter().filter(|p| close(p)).count();
        }
    }
    assert!(closed >= 2, "closed {closed} connections");
    assert!(
        confirmed.len() >= total * 9 / 10,
        "publishing recovered: {} of {total} confirmed",
        confirmed.len()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !confirmed.is_subset(&received) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(v)) => {
                received.insert(v);
            }
            _ => break,
        }
    }
    let missing: Vec<&String> = confirmed.difference(&received).take(10).collect();
    assert!(
        missing.is_empty(),
        "confirmed but never delivered: {missing:?} …"
    );
    client
        .health_check()
        .await
        .expect("healthy after reconnect");
    consumer.stop().await.expect("stop");
    client.admin().delete_topic(&topic).await.expect("delete");
    client
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
