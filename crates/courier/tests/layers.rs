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
