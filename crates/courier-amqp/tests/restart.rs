//! A private RabbitMQ node (its own node name, port and data directory) is killed with
//! SIGKILL and started again on the same data while a producer and a group member
//! run: every acknowledged (confirmed) publish must be delivered afterwards; duplicates
//! are allowed and counted. Needs the Debian `rabbitmq-server` package
//! (`scripts/brokers.sh start` installs it); the shared broker on 5672 is not touched.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use courier_amqp::AmqpDriver;
use courier_core::{
    Config, Driver, Headers, OffsetReset, Record, SubscribeSpec, Subscription, TopicSpec,
};

/// The server script without Debian's wrapper, which would switch to the `rabbitmq`
/// user (and so give us the wrong PID and a data directory we cannot choose).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// A RabbitMQ node on 127.0.0.1:`port` with its data in `dir`, killed on drop.
struct Node {
    script: Child,
    pid_file: PathBuf,
}

impl Node {
    fn start(name: &str, port: u16, dir: &Path) -> Self {
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("config");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins");
        let pid_file = dir.join("node.pid");
        let _ = std::fs::remove_file(&pid_file);
        let script = Command::new(SERVER)
            .env("RABBITMQ_NODENAME", format!("{name}@localhost"))
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", (port + 20000).to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", &pid_file)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server (scripts/brokers.sh start installs it)");
        let mut node = Self { script, pid_file };
        for _ in 0..600 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return node;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        node.signal("-KILL");
        panic!("private RabbitMQ node did not listen on {port} within 60 s");
    }

    /// `signal` to the Erlang VM (the PID RabbitMQ wrote), then SIGKILL to the script.
    fn signal(&mut self, signal: &str) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let pid = pid.trim().to_string();
            let _ = Command::new("kill").args([signal, &pid]).status();
            // A graceful stop takes a few seconds; wait for the VM to be gone.
            for _ in 0..300 {
                let alive = Command::new("kill")
                    .args(["-0", &pid])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !alive {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.script.kill();
        let _ = self.script.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal("-KILL");
    }
}

fn free_port() -> u16 {
    // The distribution port is port + 20000: keep both in range.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if port < 45000 && TcpListener::bind(("127.0.0.1", port + 20000)).is_ok() {
            return port;
        }
    }
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

fn take(ds: Vec<courier_core::Delivery>, received: &mut HashMap<String, usize>) {
    for d in ds {
        *received.entry(d.id.clone()).or_default() += 1;
        d.ack();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_a_broker_kill_and_restart() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    if !Path::new(SERVER).exists() {
        panic!("{SERVER} missing: run scripts/brokers.sh start (installs rabbitmq-server)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let name = format!("courier-restart-{}", std::process::id());
    let mut node = Some(Node::start(&name, port, dir.path()));
    let config = Config::with_url(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    let driver = AmqpDriver::connect(config).await.expect("connect");
    let topic = "restart.test";
    driver
        .create_topic(TopicSpec::new(topic, 2))
        .await
        .expect("create");
    let mut spec = SubscribeSpec::new("restart.group", vec![topic.to_string()]);
    spec.auto_offset_reset = OffsetReset::Earliest;
    let mut sub: Box<dyn Subscription> = driver.subscribe(spec).await.expect("subscribe");

    let total = 2000;
    let mut acked: HashSet<String> = HashSet::new();
    let mut received: HashMap<String, usize> = HashMap::new();
    let mut attempts = 0;
    let mut i = 0;
    while i < total {
        if i == total / 2 && std::env::var_os("NO_KILL").is_none() {
            if let Some(mut n) = node.take() {
                n.signal(&std::env::var("RESTART_SIGNAL").unwrap_or("-TERM".into()));
            }
            node = Some(Node::start(&name, port, dir.path()));
        }
        attempts += 1;
        let batch: Vec<Record> = (i..(i + 10).min(total)).map(|j| record(topic, j)).collect();
        let n = batch.len();
        match tokio::time::timeout(Duration::from_secs(15), driver.publish(batch)).await {
            Ok(Ok(receipts)) => {
                acked.extend(receipts.into_iter().map(|r| r.id));
                i += n;
            }
            // Not confirmed: sent again (so duplicates are possible).
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        assert!(attempts < 1500, "the driver never recovered");
        if let Ok(Ok(Some(ds))) =
            tokio::time::timeout(Duration::from_millis(1), sub.next_batch(512)).await
        {
            take(ds, &mut received);
        }
    }
    assert_eq!(acked.len(), total);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !acked.iter().all(|id| received.contains_key(id)) {
        match tokio::time::timeout_at(deadline, sub.next_batch(512)).await {
            Ok(Ok(Some(ds))) => take(ds, &mut received),
            Ok(Ok(None)) => panic!("subscription ended"),
            // A fetch error while the member re-attaches is retried until the deadline.
            Ok(Err(e)) => {
                eprintln!("fetch failed (retrying): {e}");
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
        "amqp restart: {total} confirmed, {} received distinct, {duplicates} duplicate deliveries, {attempts} publish calls",
        received.len()
    );
    assert!(
        missing.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    sub.close().await.expect("close");
    driver.health().await.expect("healthy after restart");
    drop(node);
}
