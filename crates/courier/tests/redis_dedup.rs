//! The Redis dedup store against the Redis on 127.0.0.1:6379 (`COURIER_REDIS_URL`):
//! two "processes" (two clients, two store connections) of one group handle a
//! duplicated id once between them.

use std::sync::Arc;
use std::time::Duration;

use courier::{Client, DedupStore, Delivery, Error, Message, RedisDedupStore};

fn url() -> String {
    std::env::var("COURIER_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn prefix() -> String {
    format!("courier-test-dedup-{}:", ulid::Ulid::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_shared_exclusive_and_expire() {
    let p = prefix();
    let a = RedisDedupStore::connect(&url(), &p)
        .await
        .expect("connect a");
    let b = RedisDedupStore::connect(&url(), &p)
        .await
        .expect("connect b");
    let w = Duration::from_millis(400);
    assert!(a.claim("k", w).await.expect("claim"));
    assert!(
        !b.claim("k", w).await.expect("claim"),
        "the other process sees it"
    );
    b.release("k").await.expect("release");
    assert!(b.claim("k", w).await.expect("claim"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !a.claim("k", w).await.expect("claim") {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.release("k").await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_of_a_group_handle_an_id_once() {
    let p = prefix();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    let mut consumers = Vec::new();
    for n in 0..2 {
        // Separate memory:// stores stand for two processes reading one duplicated
        // message each (as a producer retry across brokers would cause).
        let client = Client::connect(&format!("memory://redis-dedup-{n}-{}", ulid::Ulid::new()))
            .await
            .expect("connect");
        let store = RedisDedupStore::connect(&url(), &p).await.expect("store");
        let tx = tx.clone();
        let c = client
            .consumer("dedup.shared.group")
            .from_earliest()
            .dedup(Arc::new(store), Duration::from_secs(60))
            .start(["dedup.events"], move |d: Delivery| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((n, d.id.to_string()));
                    Ok::<(), Error>(())
                }
            })
            .await
            .expect("subscribe");
        client
            .producer()
            .send(Message::new("dedup.events", "once").id("shared-id"))
            .await
            .expect("send");
        client
            .producer()
            .send(Message::new("dedup.events", "own").id(format!("own-{n}")))
            .await
            .expect("send");
        clients.push(client);
        consumers.push(c);
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("in time")
                .expect("open"),
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "the shared id was handled twice: {got:?}"
    );
    assert_eq!(got.iter().filter(|(_, id)| id == "shared-id").count(), 1);
    for c in consumers {
        c.stop().await.expect("stop");
    }
    for client in clients {
        client
            .shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
    }
}
