//! Crash safety of the default backend through the public API: a child process sends
//! under `fsync=always` and is killed with SIGKILL at random points; after every kill
//! each acknowledged message is present exactly once, in per-key order, and the
//! group resumes from its last commit without losing anything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use courier::{Client, Delivery, Error, Message, TopicSpec};
use tokio::sync::mpsc;

const TOPIC: &str = "crash.events";
const GROUP: &str = "crash.check.group";
const CHILD_ENV: &str = "COURIER_CRASH_CHILD_DIR";

fn url(dir: &str) -> String {
    format!("file://{dir}?fsync=always")
}

/// The child: sends forever (16 in flight), printing `ACK key seq partition offset`
/// after each receipt, and handles the topic in `GROUP`, printing `HANDLED key seq`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let client = Client::connect(&url(&dir)).await.expect("connect");
        client
            .admin()
            .ensure_topic(TopicSpec::new(TOPIC, 3))
            .await
            .expect("topic");
        let start: u64 = std::env::var("COURIER_CRASH_SEQ")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let _consumer = client
            .consumer(GROUP)
            .from_earliest()
            .commit_interval(Duration::from_millis(20))
            .start([TOPIC], |d: Delivery| async move {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "HANDLED {}", d.value_str()?);
                let _ = out.flush();
                Ok::<(), Error>(())
            })
            .await
            .expect("consumer");
        let producer = client.producer();
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for seq in start.. {
                let key = seq % 7;
                let h =
                    producer.send(Message::new(TOPIC, format!("{key} {seq}")).key(key.to_string()));
                if tx.send((key, seq, h)).await.is_err() {
                    break;
                }
            }
        });
        while let Some((key, seq, h)) = rx.recv().await {
            let r = h.await.expect("send");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ACK {key} {seq} {} {}", r.partition, r.offset);
            let _ = out.flush();
        }
    });
}

#[derive(Default)]
struct Seen {
    acked: BTreeMap<u64, (u64, u32, u64)>, // seq -> (key, partition, offset)
    handled: HashSet<u64>,
}

fn run_child(dir: &str, start_seq: u64, kill_after: Duration, seen: &mut Seen) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env("COURIER_CRASH_SEQ", start_seq.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + kill_after;
    // Count time from the first acknowledgement so every run writes something.
    let mut started = false;
    let mut deadline = deadline;
    loop {
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(line) => {
                if !started && line.starts_with("ACK") {
                    started = true;
                    deadline = Instant::now() + kill_after;
                }
                record(&line, seen);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
        if started && Instant::now() >= deadline {
            break;
        }
        assert!(
            started || Instant::now() < deadline + Duration::from_secs(30),
            "child never acknowledged anything"
        );
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    // Lines the child wrote before dying still count: they were acknowledged.
    let _ = reader.join();
    while let Ok(line) = rx.try_recv() {
        record(&line, seen);
    }
}

fn record(line: &str, seen: &mut Seen) {
    // The test harness may print "test crash_child ... " without a newline first.
    let line = ["ACK ", "HANDLED "]
        .iter()
        .filter_map(|m| line.find(m))
        .min()
        .map_or(line, |i| &line[i..]);
    let parts: Vec<&str> = line.split_whitespace().collect();
    match parts.as_slice() {
        ["ACK", key, seq, p, o] => {
            let parse = |s: &str| s.parse::<u64>().expect("number");
            seen.acked
                .insert(parse(seq), (parse(key), parse(p) as u32, parse(o)));
        }
        ["HANDLED", _key, seq] => {
            seen.handled.insert(seq.parse().expect("seq"));
        }
        _ => {}
    }
}

/// Reads everything stored and checks it against what was acknowledged.
async fn verify(dir: &str, seen: &Seen) {
    let client = Client::connect(&url(dir)).await.expect("reopen");
    let info = client
        .admin()
        .describe_topic(TOPIC)
        .await
        .expect("describe");
    let total = info.message_count();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let c = client
        .consumer(format!("verify-{}", seen.acked.len()))
        .from_earliest()
        .start([TOPIC], move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((d.partition, d.offset, d.value_str()?.to_string()));
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("verify consumer");
    let mut stored: HashMap<u64, Vec<(u32, u64)>> = HashMap::new();
    let mut per_key_last: HashMap<u64, u64> = HashMap::new();
    for _ in 0..total {
        let (p, o, v) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("stored message delivered")
            .expect("open");
        let (key, seq) = v.split_once(' ').expect("key seq");
        let (key, seq): (u64, u64) = (key.parse().expect("key"), seq.parse().expect("seq"));
        if let Some(prev) = per_key_last.insert(key, seq) {
            // Per-key order: a later offset never carries an earlier acknowledged seq.
            assert!(
                seq > prev || !seen.acked.contains_key(&seq),
                "key {key}: seq {seq} after {prev}"
            );
        }
        stored.entry(seq).or_default().push((p, o));
    }
    for (seq, (_key, p, o)) in &seen.acked {
        let places = stored
            .get(seq)
            .unwrap_or_else(|| panic!("acknowledged seq {seq} lost"));
        assert_eq!(
            places,
            &vec![(*p, *o)],
            "seq {seq} stored once, where acknowledged"
        );
    }
    c.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().display().to_string();
    let mut seen = Seen::default();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..20 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = Duration::from_millis(20 + rng % 180);
        let next_seq = seen.acked.keys().next_back().map_or(0, |s| s + 1) + 1_000_000 * round;
        run_child(&path, next_seq, kill_after, &mut seen);
        verify(&path, &seen).await;
    }
    assert!(
        seen.acked.len() > 100,
        "only {} acknowledged",
        seen.acked.len()
    );
    // The group resumed from its commits: everything acknowledged was handled by some
    // child or is still waiting for the group now.
    let client = Client::connect(&url(&path)).await.expect("reopen");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let c = client
        .consumer(GROUP)
        .from_earliest()
        .start([TOPIC], move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let seq: u64 = d
                    .value_str()?
                    .split_once(' ')
                    .map_or(0, |(_, s)| s.parse().unwrap_or(0));
                let _ = tx.send(seq);
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("group consumer");
    let mut rest = HashSet::new();
    while let Ok(Some(seq)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        rest.insert(seq);
    }
    let group_info = client.admin().describe_group(GROUP).await.expect("group");
    for (seq, place) in &seen.acked {
        assert!(
            seen.handled.contains(seq) || rest.contains(seq),
            "seq {seq} at {place:?} neither handled before a crash nor delivered after; group {group_info:?}; handled {}",
            seen.handled.len()
        );
    }
    c.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}
