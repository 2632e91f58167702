//! Crash safety of delayed messages: a child process schedules delayed messages (its
//! scheduler member moving those that fall due meanwhile) and is killed with SIGKILL;
//! a restarted client then delivers every acknowledged delayed message once, none
//! before its due time. On the default backend under `fsync=always`, and (with their
//! features) on the shared Redis and NATS servers, with fresh topic and scope names.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use courier::{
    now_millis, Client, Delivery, Error, Message, ScheduleOptions, TopicSpec, HEADER_DELAY_UNTIL,
};
use tokio::sync::mpsc;

const TOPIC: &str = "delay.crash.events";
/// The child's backend URL.
const CHILD_ENV: &str = "COURIER_DELAY_CRASH_CHILD_URL";
/// The child's topic and schedule scope.
const TOPIC_ENV: &str = "COURIER_DELAY_CRASH_TOPIC";
const SCOPE_ENV: &str = "COURIER_DELAY_CRASH_SCOPE";

fn url(dir: &str) -> String {
    format!("file://{dir}?fsync=always")
}

/// A client of `url` whose scheduler uses `scope`.
async fn connect(url: &str, scope: &str) -> Client {
    let mut config = courier::Config::with_url(url);
    if url.starts_with("nats") {
        // A killed member's unacknowledged entries come back after `ack_wait`: short,
        // so a repeat would show within the settle window.
        config
            .backend
            .insert("nats.ack_wait_ms".into(), "2000".into());
    }
    let client = Client::connect_with(config).await.expect("connect");
    if scope != "default" {
        client
            .set_schedule_options(ScheduleOptions {
                scope: scope.to_string(),
                ..ScheduleOptions::default()
            })
            .expect("schedule options");
    }
    client
}

/// The child: schedules forever (due 200–1200 ms ahead), printing `ACK id due` after
/// each receipt.
#[test]
fn delay_crash_child() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let topic = std::env::var(TOPIC_ENV).unwrap_or_else(|_| TOPIC.to_string());
    let scope = std::env::var(SCOPE_ENV).unwrap_or_else(|_| "default".to_string());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let client = connect(&url, &scope).await;
        client
            .admin()
            .ensure_topic(TopicSpec::new(&topic, 2))
            .await
            .expect("topic");
        client.start_scheduler().await.expect("scheduler");
        let producer = client.producer();
        for seq in 0u64.. {
            let due = now_millis() + 200 + (seq % 11) as i64 * 100;
            let r = producer
                .send(Message::new(&topic, seq.to_string()).deliver_at(due))
                .await
                .expect("send");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ACK {} {due}", r.id);
            let _ = out.flush();
        }
    });
}

fn run_child(
    url: &str,
    topic: &str,
    scope: &str,
    kill_after: Duration,
    acked: &mut HashMap<String, i64>,
) {
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(exe)
        .args([
            "delay_crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, url)
        .env(TOPIC_ENV, topic)
        .env(SCOPE_ENV, scope)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            lines.push(line);
        }
        lines
    });
    std::thread::sleep(kill_after);
    // SIGKILL: no destructor, no flush, no commit.
    child.kill().expect("kill");
    let _ = child.wait();
    for line in reader.join().expect("reader") {
        let mut parts = line.split_whitespace();
        if let (Some("ACK"), Some(id), Some(due)) = (parts.next(), parts.next(), parts.next()) {
            acked.insert(id.to_string(), due.parse().expect("due"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_delayed_messages_survive_kill_9() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().display().to_string();
    let dups = crash_and_recover(
        &url(&path),
        TOPIC,
        "default",
        "delay.crash.check",
        [1500, 900],
    )
    .await;
    // A kill between a move's publish and its marker is resolved from the move's
    // intent record: nothing due is delivered twice.
    assert_eq!(dups, 0, "delivered more than once");
}

/// The same on the shared Redis server (positional reads by `XRANGE`).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acknowledged_delayed_messages_survive_kill_9() {
    let url =
        std::env::var("COURIER_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let topic = format!("delay-crash-{run}");
    let scope = format!("crash-{run}");
    let dups = crash_and_recover(&url, &topic, &scope, &format!("check-{run}"), [3000, 2500]).await;
    assert_eq!(dups, 0, "delivered more than once");
}

/// The same on the shared Kafka broker (tansu; positional reads by an assigned
/// consumer). Kills later: joining the group takes seconds there.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_acknowledged_delayed_messages_survive_kill_9() {
    let url =
        std::env::var("COURIER_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let topic = format!("delay-crash-{run}");
    let scope = format!("crash-{run}");
    let dups = crash_and_recover(&url, &topic, &scope, &format!("check-{run}"), [8000, 7000]).await;
    assert_eq!(dups, 0, "delivered more than once");
}

/// The same on the shared NATS server: JetStream alone would redeliver a killed
/// member's unacknowledged entries late and out of log order, so the scheduler's
/// takeover reads the partition again from its ack floor, and moves are stored once
/// per id (`Nats-Msg-Id`), so a repeated move is dropped.
#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_acknowledged_delayed_messages_survive_kill_9() {
    let url = std::env::var("COURIER_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let topic = format!("delay-crash-{run}");
    let scope = format!("crash-{run}");
    let dups = crash_and_recover(&url, &topic, &scope, &format!("check-{run}"), [3000, 2500]).await;
    assert_eq!(dups, 0, "delivered more than once");
}

/// The same on the shared RabbitMQ server (positional reads by a stream consumer
/// attached at the offset).
#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_acknowledged_delayed_messages_survive_kill_9() {
    let url = std::env::var("COURIER_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let topic = format!("delay-crash-{run}");
    let scope = format!("crash-{run}");
    let dups = crash_and_recover(&url, &topic, &scope, &format!("check-{run}"), [3000, 2500]).await;
    assert_eq!(dups, 0, "delivered more than once");
}

/// Kills a scheduling child after each of `kills` ms, then checks that a new client
/// delivers every acknowledged delayed message, none early. Returns how many were
/// delivered more than once.
async fn crash_and_recover(
    url: &str,
    topic: &str,
    scope: &str,
    group: &str,
    kills: [u64; 2],
) -> usize {
    let mut acked = HashMap::new();
    for kill_after in kills {
        run_child(
            url,
            topic,
            scope,
            Duration::from_millis(kill_after),
            &mut acked,
        );
    }
    assert!(acked.len() > 20, "child acknowledged only {}", acked.len());

    let client = connect(url, scope).await;
    if url.starts_with("file:") {
        // The restarted client resumes the default scope by itself (file://).
        assert!(
            client.scheduler_started(),
            "pending schedule resumed at connect"
        );
    } else {
        client.start_scheduler().await.expect("scheduler");
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = client
        .consumer(group)
        .from_earliest()
        .start([topic.to_string()], move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let due: i64 = d
                    .headers
                    .get_str(HEADER_DELAY_UNTIL)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(i64::MAX);
                let _ = tx.send((d.id.to_string(), due, now_millis()));
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("consumer");
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let want: HashSet<&String> = acked.keys().collect();
    while !want.iter().all(|id| seen.contains_key(*id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((id, due, at))) => {
                assert!(at >= due, "{id} delivered {} ms early", due - at);
                *seen.entry(id).or_default() += 1;
            }
            _ => break,
        }
    }
    let lost: Vec<_> = want.iter().filter(|id| !seen.contains_key(**id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged delayed messages lost",
        lost.len(),
        want.len()
    );
    // Wait out a possible late duplicate before counting.
    // NATS: past the dead members' session timeout and `ack_wait`.
    let settle = Instant::now()
        + if url.starts_with("nats") {
            Duration::from_secs(12)
        } else {
            Duration::from_millis(1500)
        };
    while let Ok(Some((id, _, _))) =
        tokio::time::timeout(settle.saturating_duration_since(Instant::now()), rx.recv()).await
    {
        *seen.entry(id).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "delay crash: {} acknowledged, {} delivered, {} delivered twice",
        want.len(),
        seen.len(),
        dups.len()
    );
    if !dups.is_empty() {
        eprintln!("delivered more than once: {dups:?}");
    }
    let repeated = dups.len();
    consumer.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    repeated
}
