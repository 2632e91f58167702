//! User tower layers sit inside the retry step: a timed-out attempt is retried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::{Backoff, Client, Delivery, Error, Message, TraceContext};

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

/// Retries, dead letters, decompression, trace scope and counts are the same whether
/// a message takes the fused path (no user layers, no span subscriber) or the layered
/// stack (forced here by a user layer that does nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fused_and_layered_paths_behave_alike() {
    for layered in [false, true] {
        let name = if layered { "layered" } else { "fused" };
        let client = Client::connect(&format!("memory://paths-{name}"))
            .await
            .expect("connect");
        let topic = format!("paths.{name}");
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let c2 = calls.clone();
        let builder = client
            .consumer("paths.group")
            .from_earliest()
            .retry(Backoff::exponential(2, Duration::from_millis(10)).jitter(0.0));
        let builder = if layered {
            builder.layer(tower::layer::util::Identity::new())
        } else {
            builder
        };
        let c = builder
            .start([topic.as_str()], move |d: Delivery| {
                let (calls, tx) = (c2.clone(), tx.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let v = String::from_utf8_lossy(&d.value).into_owned();
                    if v == "poison" || (v == "good" && d.attempt < 3) {
                        return Err(Error::backend("test", "fails"));
                    }
                    let trace = TraceContext::current().map(|c| c.trace_id_hex());
                    let _ = tx.send((v, d.attempt, trace));
                    Ok(())
                }
            })
            .await
            .expect("subscribe");
        let producer = client.producer();
        let parent = TraceContext::new_root();
        for value in ["fine", "good", "poison", "corrupt", "traced"] {
            let mut m = Message::new(topic.as_str(), value).key("k");
            if value == "corrupt" {
                m = m.header("content-encoding", "lz4");
            }
            if value == "traced" {
                parent.inject(&mut m.headers);
            }
            producer.send(m).await.expect("send");
        }
        let mut handled = Vec::new();
        while handled.len() < 3 {
            let h = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("handled in time")
                .expect("open");
            handled.push(h);
        }
        handled.sort();
        assert_eq!(
            handled,
            vec![
                ("fine".to_string(), 1, None),
                ("good".to_string(), 3, None),
                ("traced".to_string(), 1, Some(parent.trace_id_hex())),
            ],
            "{name}"
        );
        let dlq = format!("{topic}.dlq");
        let (dtx, mut drx) = tokio::sync::mpsc::unbounded_channel();
        // Bare: the corrupt value must reach this test as stored, not be decompressed
        // (and dead-lettered again) by a pipeline.
        let dc = client
            .consumer("paths.dlq")
            .from_earliest()
            .bare()
            .start([dlq.as_str()], move |d: Delivery| {
                let dtx = dtx.clone();
                async move {
                    let _ = dtx.send(d);
                    Ok::<(), Error>(())
                }
            })
            .await
            .expect("subscribe dlq");
        let mut dead = Vec::new();
        while dead.len() < 2 {
            let d = tokio::time::timeout(Duration::from_secs(10), drx.recv())
                .await
                .expect("dead letter in time")
                .expect("open");
            dead.push(d);
        }
        dead.sort_by(|a, b| a.value.cmp(&b.value));
        let header = |d: &Delivery, n: &str| d.headers.get(n).map(|v| v.to_vec());
        assert_eq!(dead[0].value.as_ref(), b"corrupt", "{name}");
        assert_eq!(
            header(&dead[0], "x-retry-count"),
            Some(b"0".to_vec()),
            "{name}"
        );
        assert_eq!(
            header(&dead[0], "content-encoding"),
            Some(b"lz4".to_vec()),
            "{name}"
        );
        assert_eq!(dead[1].value.as_ref(), b"poison", "{name}");
        assert_eq!(dead[1].key.as_deref(), Some(&b"k"[..]), "{name}");
        assert_eq!(
            header(&dead[1], "x-retry-count"),
            Some(b"2".to_vec()),
            "{name}"
        );
        assert_eq!(
            header(&dead[1], "x-original-topic"),
            Some(topic.as_bytes().to_vec()),
            "{name}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let expect = (5, 4, 3, 2); // errors, retries, consumed, dead-lettered
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
            8,
            "{name}: 1 + 3 + 3 + 1 attempts"
        );
        dc.stop().await.expect("stop dlq");
        c.stop().await.expect("stop");
        client
            .shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
    }
}
