//! A private nats-server (its own port and store directory) is killed and restarted
//! while a producer and a group member run: every acknowledged publish must be
//! delivered afterwards (duplicates are allowed and counted). Needs `nats-server` on
//! the PATH (`scripts/brokers.sh start` installs it).

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use courier_core::{
    Config, Driver, Headers, OffsetReset, Record, SubscribeSpec, Subscription, TopicSpec,
};
use courier_nats::NatsDriver;

/// A nats-server on `port` storing JetStream data in `dir`, killed on drop.
struct Server {
    child: Child,
}

impl Server {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on the PATH (scripts/brokers.sh start installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("private nats-server did not listen on {port}");
    }

    fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_a_server_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = Server::start(port, dir.path());
    let mut config = Config::with_url(format!("nats://127.0.0.1:{port}"));
    // Deliveries whose acks die with the connection come back soon.
    config
        .backend
        .insert("nats.ack_wait_ms".into(), "2000".into());
    let driver = NatsDriver::connect(config).await.expect("connect");
    let topic = "restart.test";
    driver
        .create_topic(TopicSpec::new(topic, 2))
        .await
        .expect("create");
    let mut spec = SubscribeSpec::new("restart.group", vec![topic.to_string()]);
    spec.auto_offset_reset = OffsetReset::Earliest;
    let mut sub: Box<dyn Subscription> = driver.subscribe(spec).await.expect("subscribe");

    let total = 3000;
    let mut acked: HashSet<String> = HashSet::new();
    let mut attempts = 0;
    let mut server = Some(server);
    let mut received: HashMap<String, usize> = HashMap::new();
    let mut i = 0;
    while i < total {
        if i == total / 2 {
            if let Some(s) = server.take() {
                s.kill();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            server = Some(Server::start(port, dir.path()));
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
        assert!(attempts < 2000, "the driver never recovered");
        // Consume as we go, so the member runs through the restart too.
        if let Ok(Ok(Some(ds))) =
            tokio::time::timeout(Duration::from_millis(1), sub.next_batch(512)).await
        {
            for d in ds {
                *received.entry(d.id.clone()).or_default() += 1;
                d.ack();
            }
        }
    }
    assert_eq!(acked.len(), total);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !acked.iter().all(|id| received.contains_key(id)) {
        match tokio::time::timeout_at(deadline, sub.next_batch(512)).await {
            Ok(Ok(Some(ds))) => {
                for d in ds {
                    *received.entry(d.id.clone()).or_default() += 1;
                    d.ack();
                }
            }
            Ok(Ok(None)) => panic!("subscription ended"),
            Ok(Err(e)) => panic!("fetch failed: {e}"),
            Err(_) => break,
        }
    }
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !received.contains_key(*id))
        .collect();
    let duplicates: usize = received.values().map(|n| n - 1).sum();
    eprintln!(
        "restart: {total} acknowledged, {} received distinct, {duplicates} duplicate deliveries, {attempts} publish calls",
        received.len()
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    sub.close().await.expect("close");
    driver.health().await.expect("healthy after restart");
    if let Some(s) = server.take() {
        s.kill();
    }
}
