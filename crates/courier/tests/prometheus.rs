//! The Prometheus exposition and the shipped alert rules agree with what the client
//! records (own test binary: the recorder is process-global).

use std::time::Duration;

use courier::{Client, Delivery, Error, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_renders_counts_and_rules_name_real_metrics() {
    let handle = courier::install_prometheus_recorder().expect("recorder");
    let client = Client::connect("memory://prom").await.expect("connect");
    let p = client.producer();
    for i in 0..5 {
        p.send(Message::new("prom.events", format!("{i}")))
            .await
            .expect("send");
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c = client
        .consumer("prom.group")
        .from_earliest()
        .start(["prom.events"], move |_d: Delivery| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("subscribe");
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("in time");
    }
    client.record_lag("prom.group").await.expect("lag");
    // The handler signals before the metrics layer around it has counted its return,
    // so the last count may land a moment after the last signal.
    let consumed = r#"courier_messages_consumed_total{topic="prom.events",group="prom.group"} 5"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut text = handle.render();
    while !text.contains(consumed) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = handle.render();
    }
    assert!(
        text.contains(r#"courier_messages_sent_total{topic="prom.events"} 5"#),
        "{text}"
    );
    assert!(text.contains(consumed), "{text}");
    assert!(text.contains("courier_send_latency_seconds"), "{text}");
    assert!(text.contains("courier_consumer_lag"), "{text}");
    assert!(client.readiness().await.is_ok());
    c.stop().await.expect("stop");
    assert!(
        client.readiness().await.is_ok(),
        "a stopped consumer no longer counts"
    );

    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/prometheus/courier-alerts.yml"
    ))
    .expect("rules file");
    for name in courier::alerts::RULES {
        assert!(rules.contains(&format!("alert: {name}")), "rule {name}");
    }
    for metric in [
        courier::stats::names::SENT,
        courier::stats::names::CONSUMED,
        courier::stats::names::SEND_ERRORS,
        courier::stats::names::CONSUME_ERRORS,
        courier::stats::names::DEAD_LETTERED,
        courier::stats::names::E2E_LATENCY,
        courier::stats::names::CONSUMER_LAG,
    ] {
        assert!(rules.contains(metric), "rules use {metric}");
    }
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_without_partitions_and_after_shutdown() {
    let client = Client::connect("memory://ready").await.expect("connect");
    client
        .admin()
        .create_topic(courier::TopicSpec::new("ready.events", 1))
        .await
        .expect("topic");
    let noop = |_d: Delivery| async { Ok::<(), Error>(()) };
    let a = client
        .consumer("ready.group")
        .start(["ready.events"], noop)
        .await
        .expect("a");
    a.wait_assigned(1, Duration::from_secs(20))
        .await
        .expect("assigned");
    // Readiness reads what the fetch loop last saw; give it one round.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while client.readiness().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second member of a one-partition topic owns nothing: not ready.
    let b = client
        .consumer("ready.group")
        .start(["ready.events"], noop)
        .await
        .expect("b");
    assert!(matches!(client.readiness().await, Err(Error::NotReady(_))));
    b.stop().await.expect("stop b");
    a.stop().await.expect("stop a");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    assert!(client.readiness().await.is_err());
}
