//! redis:// under failure:
//!
//! - a PRIVATE `redis-server` (own port, own temp dir, AOF with `appendfsync always`)
//!   is killed with SIGKILL mid-stream and restarted on the same data: producers
//!   surface errors or retry, consumers resume, no acknowledged message is lost, and
//!   duplicates are counted;
//! - every client connection killed (`CLIENT KILL`) again and again while thousands
//!   of keyed sends are in flight: every acknowledged message arrives, and per key the
//!   acknowledged messages arrive in send order (the publish lane resends failed
//!   pipelines in order; duplicates are allowed and counted);
//! - a member process killed with SIGKILL while holding unacknowledged messages: its
//!   partitions are taken over and its pending messages redelivered within about the
//!   lease (session) time.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use courier::{Client, Config, Delivery, Error, Message, OffsetReset, TopicSpec};
use courier_conformance::restart::free_port;
use courier_conformance::unique;
use tokio::sync::mpsc;

fn shared_url() -> String {
    std::env::var("COURIER_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A redis-server of our own, stopped (by PID) and cleaned up on drop.
struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> Self {
        let port = free_port();
        let mut r = PrivateRedis {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        wait_ready(self.port, self.dir.path());
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_ready(port: u16, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "PING"])
            .output();
        if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "private redis on {port} (dir {}) never answered",
        dir.display()
    );
}

fn fast(url: String) -> Config {
    let mut c = courier_conformance::harness::fast_config();
    c.url = Some(url);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_loses_no_acknowledged_message() {
    let mut server = PrivateRedis::start();
    let client = Client::connect_with(fast(server.url()))
        .await
        .expect("connect");
    let t = unique("fault");
    client
        .admin()
        .create_topic(TopicSpec::new(&t, 2))
        .await
        .expect("create");
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let consumer = client
        .consumer(unique("g"))
        .auto_offset_reset(OffsetReset::Earliest)
        .start([t.clone()], move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(d.value_str()?.to_string());
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("subscribe");

    let producer = client.producer();
    let total = 3000;
    let mut acked: HashSet<String> = HashSet::new();
    let mut failed = 0usize;
    let mut restarted = false;
    for batch in 0..(total / 50) {
        if batch == 20 && !restarted {
            server.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.spawn();
            restarted = true;
        }
        let msgs: Vec<Message> = (0..50)
            .map(|i| {
                let n = batch * 50 + i;
                Message::new(&t, format!("m{n}")).key(format!("k{}", n % 13))
            })
            .collect();
        let values: Vec<String> = (0..50).map(|i| format!("m{}", batch * 50 + i)).collect();
        match producer.send_batch(msgs).await {
            Ok(_) => acked.extend(values),
            Err(e) => {
                failed += 50;
                eprintln!("batch {batch} failed (surfaced to the caller): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(restarted);
    assert!(
        acked.len() >= total / 2,
        "most sends succeed around a restart ({} of {total})",
        acked.len()
    );

    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !acked.iter().all(|v| seen.contains_key(v)) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(v)) => *seen.entry(v).or_default() += 1,
            _ => break,
        }
    }
    let lost: Vec<&String> = acked.iter().filter(|v| !seen.contains_key(*v)).collect();
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "restart: {} acknowledged, {failed} failed and surfaced, {} received, {duplicates} duplicates, {} lost",
        acked.len(),
        seen.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged messages lost: {}",
        lost.len()
    );
    consumer.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_keep_per_key_order() {
    let server = PrivateRedis::start();
    let client = Client::connect_with(fast(server.url()))
        .await
        .expect("connect");
    let t = unique("order");
    client
        .admin()
        .create_topic(TopicSpec::new(&t, 2))
        .await
        .expect("create");
    let port = server.port.to_string();
    let killer = std::thread::spawn(move || {
        let mut killed = 0;
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(15));
            let out = Command::new("redis-cli")
                .args(["-p", &port, "CLIENT", "KILL", "TYPE", "normal"])
                .output()
                .expect("redis-cli");
            killed += String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<usize>()
                .unwrap_or(0);
        }
        killed
    });
    let producer = client.producer();
    let keys = 7;
    let mut handles = Vec::new();
    for n in 0..20_000usize {
        let msg = Message::new(&t, format!("{n}")).key(format!("k{}", n % keys));
        handles.push((n, producer.send(msg)));
        if n % 100 == 99 {
            // Spread the sends over the kills, many pipelines in flight at each.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut acked = HashSet::new();
    let mut failed = 0;
    for (n, h) in handles {
        match h.await {
            Ok(_) => {
                acked.insert(n);
            }
            Err(_) => failed += 1,
        }
    }
    let killed = killer.join().expect("killer");
    assert!(killed > 0, "the kills hit no connection");
    assert!(
        acked.len() > 10_000,
        "most sends succeed despite the kills ({} of 20000, {failed} failed)",
        acked.len()
    );

    let (tx, mut rx) = mpsc::unbounded_channel::<usize>();
    // The admin connection was killed too; its first command after a kill fails
    // while it reconnects.
    let mut consumer = None;
    for _ in 0..10 {
        let tx = tx.clone();
        match client
            .consumer(unique("g"))
            .auto_offset_reset(OffsetReset::Earliest)
            .start([t.clone()], move |d: Delivery| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(d.value_str()?.parse().unwrap_or(usize::MAX));
                    Ok::<(), Error>(())
                }
            })
            .await
        {
            Ok(c) => {
                consumer = Some(c);
                break;
            }
            Err(e) => {
                eprintln!("subscribe after the kills: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let consumer = consumer.expect("subscribe");
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut last: HashMap<usize, usize> = HashMap::new();
    let mut out_of_order = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !acked.iter().all(|n| seen.contains(n)) {
        let Ok(Some(n)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            break;
        };
        if !seen.insert(n) {
            duplicates += 1;
            continue;
        }
        if !acked.contains(&n) {
            continue;
        }
        // The first arrival of each acknowledged message, per key, must follow send order.
        if let Some(prev) = last.insert(n % keys, n) {
            if prev > n {
                out_of_order.push((prev, n));
            }
        }
    }
    let lost = acked.iter().filter(|n| !seen.contains(n)).count();
    eprintln!(
        "client kills: {killed} connections killed, {} acknowledged, {failed} failed, {duplicates} duplicates, {lost} lost, {} out of order",
        acked.len(),
        out_of_order.len()
    );
    assert_eq!(lost, 0, "acknowledged messages lost");
    assert!(
        out_of_order.is_empty(),
        "per-key order broken: {:?}",
        &out_of_order[..out_of_order.len().min(10)]
    );
    consumer.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

const CHILD_ENV: &str = "COURIER_REDIS_CHILD";
const SESSION_MS: u64 = 3000;

/// Not a test by itself: the member process that `killed_member_is_taken_over` starts
/// and kills. It takes every message and never settles one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of killed_member_is_taken_over"]
async fn child_member() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (topic, group) = spec.split_once(' ').expect("topic group");
    let mut config = fast(shared_url());
    config.consumer.session_timeout_ms = SESSION_MS;
    let client = Client::connect_with(config).await.expect("connect");
    let _c = client
        .consumer(group)
        .from_earliest()
        .start([topic.to_string()], |d: Delivery| async move {
            println!("GOT {}", d.value_str()?);
            std::future::pending::<()>().await;
            Ok::<(), Error>(())
        })
        .await
        .expect("subscribe");
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_is_taken_over() {
    let mut config = fast(shared_url());
    config.consumer.session_timeout_ms = SESSION_MS;
    let client = Client::connect_with(config).await.expect("connect");
    let t = unique("killed");
    let group = unique("g");
    client
        .admin()
        .create_topic(TopicSpec::new(&t, 2))
        .await
        .expect("create");
    let msgs: Vec<Message> = (0..40)
        .map(|i| Message::new(&t, format!("{}:{i}", i % 4)).key(format!("key-{}", i % 4)))
        .collect();
    let receipts = client.producer().send_batch(msgs).await.expect("batch");
    let used: HashSet<u32> = receipts.iter().map(|r| r.partition).collect();

    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_member", "--ignored", "--nocapture"])
        .env(CHILD_ENV, format!("{t} {group}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child member");
    let stdout = child.stdout.take().expect("stdout");
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            let _ = line_tx.send(line);
        }
    });
    // The child handles (and holds) the first message of each partition, with the rest
    // delivered to it and pending.
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got < used.len() && Instant::now() < deadline {
        if let Ok(l) = line_rx.recv_timeout(Duration::from_millis(200)) {
            if l.starts_with("GOT ") {
                got += 1;
            }
        }
    }
    assert_eq!(got, used.len(), "the child took every partition");
    let g = client
        .admin()
        .describe_group(&group)
        .await
        .expect("describe");
    let pending: u64 = g.offsets.iter().filter_map(|o| o.pending).sum();
    assert!(pending >= 2, "the child holds pending messages: {g:?}");

    child.kill().expect("SIGKILL the member");
    child.wait().expect("reap");
    let killed = Instant::now();

    let (tx, mut rx) = mpsc::unbounded_channel::<(String, u32)>();
    let c = client
        .consumer(&group)
        .from_earliest()
        .start([t.clone()], move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((d.value_str()?.to_string(), d.attempt));
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("subscribe");
    let mut received = Vec::new();
    let wait_until = tokio::time::Instant::now() + Duration::from_secs(30);
    while received.len() < 40 {
        match tokio::time::timeout_at(wait_until, rx.recv()).await {
            Ok(Some(r)) => received.push(r),
            _ => break,
        }
    }
    let took = killed.elapsed();
    assert_eq!(received.len(), 40, "every message came back: {received:?}");
    let lease = Duration::from_millis(SESSION_MS);
    assert!(
        took <= lease + Duration::from_secs(2),
        "takeover took {took:?}, lease is {lease:?}"
    );
    assert!(
        received.iter().any(|(_, attempt)| *attempt >= 2),
        "redeliveries are counted as such"
    );
    // Per-key order holds across the takeover.
    let mut next: HashMap<String, usize> = HashMap::new();
    for (v, _) in &received {
        let (k, i) = v.split_once(':').expect("k:i");
        let i: usize = i.parse().expect("i");
        let n = next.entry(k.to_string()).or_insert(i % 4);
        assert_eq!(i, *n, "key {k}: expected #{n}, got #{i}");
        *n += 4;
    }
    eprintln!("killed member: all 40 redelivered {took:?} after SIGKILL (lease {lease:?})");
    c.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}
