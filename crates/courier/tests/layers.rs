//! User tower layers sit inside the retry step: a timed-out attempt is retried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::{Backoff, Client, Delivery, Error, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_layer_fails_the_attempt_and_retry_recovers() {
    let client = Client::connect("memory://layers").await.expect("connect");
    let calls = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c2 = calls.clone();
    let c = client
        .consumer("layers.group")
        .from_earliest()
        .retry(Backoff::exponential(2, Duration::from_millis(20)))
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
            100,
        )))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .start(["layers.events"], move |d: Delivery| {
            let (calls, tx) = (c2.clone(), tx.clone());
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    // First attempt hangs far past the timeout.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let _ = tx.send(d.attempt);
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("subscribe");
    client
        .producer()
        .send(Message::new("layers.events", "x"))
        .await
        .expect("send");
    let attempt = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("handled in time")
        .expect("open");
    assert_eq!(attempt, 2, "the second attempt succeeded");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The handler reports before it returns; the metrics layer counts the success
    // just after. Wait for it (bounded) instead of racing it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while client.stats().topic("layers.events").consumed == 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = client.stats().topic("layers.events");
    assert_eq!(
        (s.consume_errors, s.retries, s.consumed),
        (1, 1, 1),
        "{s:?}"
    );
    c.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

/// Retries, dead letters and counts are the same whether a message takes the fused
/// path (no headers, no user layers) or the layered stack (it carries a header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fused_and_layered_paths_retry_dead_letter_and_count_alike() {
    for (name, header) in [("fused", false), ("layered", true)] {
        let client = Client::connect(&format!("memory://paths-{name}"))
            .await
            .expect("connect");
        let topic = format!("paths.{name}");
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let c2 = calls.clone();
        let c = client
            .consumer("paths.group")
            .from_earliest()
            .retry(Backoff::exponential(2, Duration::from_millis(10)).jitter(0.0))
            .start([topic.as_str()], move |d: Delivery| {
                let (calls, tx) = (c2.clone(), tx.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let fine = d.value.as_ref() == b"fine";
                    if d.value.as_ref() == b"poison" || (!fine && d.attempt < 3) {
                        return Err(Error::backend("test", "fails"));
                    }
                    let _ = tx.send((fine, d.attempt));
                    Ok(())
                }
            })
            .await
            .expect("subscribe");
        let producer = client.producer();
        for value in ["fine", "good", "poison"] {
            let mut m = Message::new(topic.as_str(), value).key("k");
            if header {
                m = m.header("x-user", "1");
            }
            producer.send(m).await.expect("send");
        }
        let mut handled = Vec::new();
        while handled.len() < 2 {
            let h = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("handled in time")
                .expect("open");
            handled.push(h);
        }
        handled.sort();
        assert_eq!(handled, vec![(false, 3), (true, 1)], "{name}");
        let dlq = format!("{topic}.dlq");
        let (dtx, mut drx) = tokio::sync::mpsc::unbounded_channel();
        let dc = client
            .consumer("paths.dlq")
            .from_earliest()
            .start([dlq.as_str()], move |d: Delivery| {
                let dtx = dtx.clone();
                async move {
                    let _ = dtx.send(d);
                    Ok::<(), Error>(())
                }
            })
            .await
            .expect("subscribe dlq");
        let dead = tokio::time::timeout(Duration::from_secs(10), drx.recv())
            .await
            .expect("dead letter in time")
            .expect("open");
        assert_eq!(dead.value.as_ref(), b"poison", "{name}");
        assert_eq!(dead.key.as_deref(), Some(&b"k"[..]), "{name}");
        assert_eq!(
            dead.headers.get("x-retry-count").map(|v| v.as_ref()),
            Some(&b"2"[..]),
            "{name}"
        );
        assert_eq!(
            dead.headers.get("x-original-topic").map(|v| v.as_ref()),
            Some(topic.as_bytes()),
            "{name}"
        );
        assert_eq!(dead.headers.get("x-user").is_some(), header, "{name}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let expect = (5, 4, 2, 1); // errors, retries, consumed, dead-lettered
        let mut s = client.stats().topic(&topic);
        while (s.consume_errors, s.retries, s.consumed, s.dead_lettered) != expect
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
            s = client.stats().topic(&topic);
        }
        assert_eq!(
            (s.consume_errors, s.retries, s.consumed, s.dead_lettered),
            expect,
            "{name}: {s:?}"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            7,
            "{name}: 1 + 3 + 3 attempts"
        );
        dc.stop().await.expect("stop dlq");
        c.stop().await.expect("stop");
        client
            .shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
    }
}
