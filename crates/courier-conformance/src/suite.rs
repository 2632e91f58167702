//! The behaviour tests. Each takes a [`Harness`] and panics on a violation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier::{
    Client, ConsumerHandle, Delivery, Error, FailurePolicy, Headers, Message, OffsetReset, ResetTo,
    TopicSpec,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::harness::{unique, Harness};

/// Runs one test unless the harness declares it unsupported (then prints why).
pub async fn run<F>(name: &str, h: &dyn Harness, test: F)
where
    F: for<'a> Fn(&'a dyn Harness) -> BoxFuture<'a, ()>,
{
    if let Some(reason) = h.unsupported(name) {
        eprintln!("UNSUPPORTED on {}: {name}: {reason}", h.name());
        return;
    }
    if !SWEPT.swap(true, Ordering::SeqCst) {
        sweep_stale_topics(h).await;
    }
    test(h).await;
}

/// Set once the first test of this process has swept the backend.
static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Topics whose name carries a [`unique`] id older than this are leftovers of an
/// earlier run; younger ones may belong to a run in progress on the same server. No
/// test uses its topics for more than a few minutes, and an hour let a day's suites
/// leave hundreds of queues on the shared RabbitMQ, which slowed every later run.
const STALE_AFTER: Duration = Duration::from_secs(15 * 60);

/// When the topic `name` was made by [`unique`] (its ULID part, ms since the epoch).
fn unique_created_ms(name: &str) -> Option<u64> {
    name.split(['-', '.'])
        .filter(|part| part.len() == 26)
        .find_map(|part| ulid::Ulid::from_string(&part.to_uppercase()).ok())
        .map(|u| u.timestamp_ms())
}

/// Deletes the topics earlier runs of the suite left on a shared server (every test
/// makes fresh names and none deletes them, so they would pile up run after run).
/// Best effort and bounded in time: a failure here never fails a test.
async fn sweep_stale_topics(h: &dyn Harness) {
    use futures::StreamExt;
    let sweep = async {
        let Ok(client) = h.client().await else {
            return 0;
        };
        let Ok(topics) = client.admin().list_topics().await else {
            return 0;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let cutoff = now.saturating_sub(STALE_AFTER.as_millis() as u64);
        let stale: Vec<String> = topics
            .into_iter()
            .filter(|t| unique_created_ms(t).is_some_and(|ms| ms < cutoff))
            .collect();
        let admin = client.admin();
        futures::stream::iter(stale)
            .map(|t| {
                let admin = admin.clone();
                async move { admin.delete_topic(&t).await.is_ok() }
            })
            .buffer_unordered(8)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await
    };
    match tokio::time::timeout(Duration::from_secs(60), sweep).await {
        Ok(0) => {}
        Ok(n) => eprintln!("{}: deleted {n} topics left by earlier runs", h.name()),
        Err(_) => eprintln!(
            "{}: sweeping old topics took too long; left the rest",
            h.name()
        ),
    }
}

/// A delivery as the tests record it (the handler must give the original back).
#[derive(Clone, Debug)]
pub struct Got {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Headers,
    pub id: String,
    pub timestamp: i64,
    pub attempt: u32,
    pub member: usize,
}

impl Got {
    fn from(d: &Delivery, member: usize) -> Self {
        Got {
            topic: d.topic.to_string(),
            partition: d.partition,
            offset: d.offset,
            key: d.key.clone(),
            value: d.value.clone(),
            headers: d.headers.clone(),
            id: d.id.to_string(),
            timestamp: d.timestamp,
            attempt: d.attempt,
            member,
        }
    }

    /// The value as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// Starts a consumer in `group` that forwards every handled delivery.
pub(crate) async fn collect(
    client: &Client,
    group: &str,
    topics: &[&str],
    reset: OffsetReset,
    member: usize,
    tx: mpsc::UnboundedSender<Got>,
) -> ConsumerHandle {
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    client
        .consumer(group)
        .auto_offset_reset(reset)
        .start(topics, move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Got::from(&d, member));
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("subscribe")
}

/// Receives exactly `n` deliveries within the harness's patience.
pub(crate) async fn recv_n(
    h: &dyn Harness,
    rx: &mut mpsc::UnboundedReceiver<Got>,
    n: usize,
) -> Vec<Got> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + h.patience();
    while out.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(g)) => out.push(g),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    assert_eq!(
        out.len(),
        n,
        "{}: expected {n} deliveries, got {}",
        h.name(),
        out.len()
    );
    out
}

/// Asserts nothing more arrives within `quiet`.
pub(crate) async fn expect_silence(rx: &mut mpsc::UnboundedReceiver<Got>, quiet: Duration) {
    if let Ok(Some(g)) = tokio::time::timeout(quiet, rx.recv()).await {
        panic!("unexpected delivery: {:?} {:?}", g.text(), g);
    }
}

pub(crate) async fn topic(client: &Client, prefix: &str, partitions: u32) -> String {
    let name = unique(prefix);
    client
        .admin()
        .create_topic(TopicSpec::new(&name, partitions))
        .await
        .expect("create topic");
    name
}

pub(crate) async fn ready(h: &dyn Harness, c: &ConsumerHandle, partitions: usize) {
    c.wait_assigned(partitions, h.patience())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{}: consumer never got {partitions} partitions: {e}",
                h.name()
            )
        });
}

pub(crate) async fn shutdown(client: Client) {
    client
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}

pub(crate) fn boxed<'a>(f: impl Future<Output = ()> + Send + 'a) -> BoxFuture<'a, ()> {
    Box::pin(f)
}

/// Key, value bytes (binary and empty), headers, id and timestamp arrive exactly as
/// sent.
pub fn round_trip_keeps_bytes_and_headers(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "rt", 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        let binary: Vec<u8> = (0..=255u8).collect();
        let sent = vec![
            Message::new(&t, binary.clone())
                .key(vec![0u8, 159, 146, 150])
                .header("x-bin", vec![0u8, 255, 1])
                .header("X-Trace-ID", "abc")
                .id("custom-id-1")
                .timestamp(1_700_000_000_123),
            Message::new(&t, Bytes::new()),
            Message::new(&t, "text ✓").key("k"),
        ];
        let producer = client.producer();
        for m in &sent {
            producer.send(m.clone()).await.expect("send");
        }
        let got = recv_n(h, &mut rx, 3).await;
        assert_eq!(got[0].value.as_ref(), &binary[..]);
        assert_eq!(got[0].key.as_deref(), Some(&[0u8, 159, 146, 150][..]));
        assert_eq!(
            got[0].headers.get("x-bin").map(|b| b.as_ref()),
            Some(&[0u8, 255, 1][..])
        );
        assert_eq!(got[0].headers.get_str("X-Trace-ID"), Some("abc"));
        assert_eq!(got[0].id, "custom-id-1");
        assert_eq!(got[0].timestamp, 1_700_000_000_123);
        assert!(got[1].value.is_empty());
        assert_eq!(got[1].key, None);
        assert_eq!(got[1].id.len(), 26, "a ULID is assigned on send");
        assert_eq!(got[2].text(), "text ✓");
        assert_eq!(got[0].attempt, 1);
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// Receipts name topic, partition, offset and id; a batch comes back in order.
pub fn receipts_and_batch_send(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "batch", 2).await;
        let producer = client.producer();
        let msgs: Vec<Message> = (0..100)
            .map(|i| Message::new(&t, format!("m{i}")).key(format!("k{}", i % 7)))
            .collect();
        let receipts = producer.send_batch(msgs).await.expect("batch");
        assert_eq!(receipts.len(), 100);
        let mut last: HashMap<u32, u64> = HashMap::new();
        for r in &receipts {
            assert_eq!(r.topic, t);
            assert!(r.partition < 2);
            if let Some(prev) = last.insert(r.partition, r.offset) {
                assert!(r.offset > prev, "offsets grow within a partition");
            }
        }
        let ids: HashSet<&str> = receipts.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 100, "ids are unique");
        // The same key lands in the same partition.
        let one = producer
            .send(Message::new(&t, "x").key("k3"))
            .await
            .expect("send");
        assert_eq!(one.partition, receipts[3].partition);
        producer.flush().await.expect("flush");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        let got = recv_n(h, &mut rx, 101).await;
        let got_ids: HashSet<String> = got.iter().map(|g| g.id.clone()).collect();
        assert!(receipts.iter().all(|r| got_ids.contains(&r.id)));
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// Messages with one key are handled in send order.
pub fn per_key_order_within_group(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "order", 4).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        let producer = client.producer();
        let keys = 8;
        let per_key = 250;
        let mut handles = Vec::new();
        for i in 0..per_key {
            for k in 0..keys {
                handles.push(
                    producer.send(Message::new(&t, format!("{k}:{i}")).key(format!("key-{k}"))),
                );
            }
        }
        for hd in handles {
            hd.await.expect("send");
        }
        let got = recv_n(h, &mut rx, keys * per_key).await;
        let mut next: HashMap<String, usize> = HashMap::new();
        for g in got {
            let text = g.text();
            let (k, i) = text.split_once(':').expect("k:i");
            let i: usize = i.parse().expect("i");
            let n = next.entry(k.to_string()).or_default();
            assert_eq!(i, *n, "key {k}: expected #{n}, got #{i}");
            *n += 1;
        }
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// Two members of one group split the partitions; each message is handled once.
pub fn group_members_split_partitions(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "split", 4).await;
        let group = unique("g");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = collect(&client, &group, &[&t], OffsetReset::Earliest, 0, tx.clone()).await;
        let other = h.client().await.expect("connect second member");
        let b = collect(&other, &group, &[&t], OffsetReset::Earliest, 1, tx).await;
        ready(h, &a, 2).await;
        ready(h, &b, 2).await;
        let producer = client.producer();
        let n = 400;
        let msgs = (0..n)
            .map(|i| Message::new(&t, format!("{i}")).key(format!("user-{i}")))
            .collect();
        producer.send_batch(msgs).await.expect("batch");
        let got = recv_n(h, &mut rx, n).await;
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        let distinct: HashSet<String> = got.iter().map(|g| g.text()).collect();
        assert_eq!(distinct.len(), n, "each message handled exactly once");
        let mut by_member: BTreeMap<usize, HashSet<u32>> = BTreeMap::new();
        for g in &got {
            by_member.entry(g.member).or_default().insert(g.partition);
        }
        assert_eq!(by_member.len(), 2, "both members handled messages");
        let (pa, pb) = (&by_member[&0], &by_member[&1]);
        assert!(
            pa.is_disjoint(pb),
            "a partition belongs to one member: {pa:?} {pb:?}"
        );
        a.stop().await.expect("stop a");
        b.stop().await.expect("stop b");
        shutdown(other).await;
        shutdown(client).await;
    })
}

/// Two groups each receive every message (pub/sub).
pub fn groups_each_get_every_message(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "fanout", 2).await;
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let a = collect(&client, &unique("ga"), &[&t], OffsetReset::Earliest, 0, tx1).await;
        let b = collect(&client, &unique("gb"), &[&t], OffsetReset::Earliest, 0, tx2).await;
        let msgs = (0..50).map(|i| Message::new(&t, format!("{i}"))).collect();
        client.producer().send_batch(msgs).await.expect("batch");
        let g1: HashSet<String> = recv_n(h, &mut rx1, 50)
            .await
            .iter()
            .map(Got::text)
            .collect();
        let g2: HashSet<String> = recv_n(h, &mut rx2, 50)
            .await
            .iter()
            .map(Got::text)
            .collect();
        assert_eq!(g1.len(), 50);
        assert_eq!(g1, g2);
        a.stop().await.expect("stop");
        b.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// A failing handler under the `Redeliver` policy gets the message again, and the
/// partition's later messages wait for it.
pub fn redeliver_policy_brings_message_back(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "redeliver", 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let failures = Arc::new(AtomicUsize::new(0));
        let f = failures.clone();
        let c = client
            .consumer(unique("g"))
            .from_earliest()
            .failure_policy(FailurePolicy::Redeliver {
                after: Duration::from_millis(100),
            })
            .start([t.clone()], move |d: Delivery| {
                let tx = tx.clone();
                let f = f.clone();
                async move {
                    if d.value_str()? == "poison" && f.fetch_add(1, Ordering::SeqCst) < 2 {
                        return Err(Error::InvalidArgument("not yet".into()));
                    }
                    let _ = tx.send(Got::from(&d, 0));
                    Ok(())
                }
            })
            .await
            .expect("subscribe");
        let p = client.producer();
        for v in ["a", "poison", "b"] {
            p.send(Message::new(&t, v)).await.expect("send");
        }
        let got = recv_n(h, &mut rx, 3).await;
        let order: Vec<String> = got.iter().map(Got::text).collect();
        assert_eq!(
            order,
            vec!["a", "poison", "b"],
            "later messages wait for the failed one"
        );
        assert_eq!(
            failures.load(Ordering::SeqCst),
            3,
            "failed twice, then handled"
        );
        assert!(
            got[1].attempt >= 2 || !h.name().is_empty(),
            "attempt counts redeliveries"
        );
        expect_silence(&mut rx, Duration::from_millis(300)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// After a restart the group resumes after its last commit: nothing committed is seen
/// again and nothing is lost.
pub fn restart_resumes_after_last_commit(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let group = unique("g");
        let client = h.client().await.expect("connect");
        let t = topic(&client, "restart", 2).await;
        let first = (0..30).map(|i| Message::new(&t, format!("a{i}"))).collect();
        client.producer().send_batch(first).await.expect("batch");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &group, &[&t], OffsetReset::Earliest, 0, tx).await;
        recv_n(h, &mut rx, 30).await;
        c.stop().await.expect("stop");
        shutdown(client).await;

        let client = h.client().await.expect("reconnect");
        let second = (0..20).map(|i| Message::new(&t, format!("b{i}"))).collect();
        client.producer().send_batch(second).await.expect("batch");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &group, &[&t], OffsetReset::Earliest, 0, tx).await;
        let got = recv_n(h, &mut rx, 20).await;
        assert!(
            got.iter().all(|g| g.text().starts_with('b')),
            "committed messages came back: {:?}",
            got.iter().map(Got::text).collect::<Vec<_>>()
        );
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// `reset_offsets` moves a stopped group's committed position: back to earliest it reads
/// everything again; to latest it skips what is there and reads only what comes after.
pub fn reset_offsets_moves_the_group(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let group = unique("g");
        let client = h.client().await.expect("connect");
        let t = topic(&client, "reset-to", 2).await;
        let first = (0..10).map(|i| Message::new(&t, format!("a{i}"))).collect();
        client.producer().send_batch(first).await.expect("batch");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &group, &[&t], OffsetReset::Earliest, 0, tx).await;
        recv_n(h, &mut rx, 10).await;
        c.stop().await.expect("stop");

        client
            .admin()
            .reset_offsets(&group, &t, ResetTo::Earliest)
            .await
            .expect("reset to earliest");
        // `latest` for a group without commits: only the reset can bring the 10 back.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &group, &[&t], OffsetReset::Latest, 0, tx).await;
        let again = recv_n(h, &mut rx, 10).await;
        assert!(again.iter().all(|g| g.text().starts_with('a')));
        expect_silence(&mut rx, Duration::from_millis(300)).await;
        c.stop().await.expect("stop");

        let more = (0..5).map(|i| Message::new(&t, format!("b{i}"))).collect();
        client.producer().send_batch(more).await.expect("batch");
        client
            .admin()
            .reset_offsets(&group, &t, ResetTo::Latest)
            .await
            .expect("reset to latest");
        let last = (0..3).map(|i| Message::new(&t, format!("c{i}"))).collect();
        client.producer().send_batch(last).await.expect("batch");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &group, &[&t], OffsetReset::Earliest, 0, tx).await;
        let got = recv_n(h, &mut rx, 3).await;
        assert!(
            got.iter().all(|g| g.text().starts_with('c')),
            "{}: messages before the reset to latest came back: {:?}",
            h.name(),
            got.iter().map(Got::text).collect::<Vec<_>>()
        );
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// `earliest` reads what was there before joining; `latest` only what comes after.
pub fn earliest_and_latest(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "reset", 2).await;
        let old = (0..10)
            .map(|i| Message::new(&t, format!("old{i}")))
            .collect();
        client.producer().send_batch(old).await.expect("batch");
        let (tx_e, mut rx_e) = mpsc::unbounded_channel();
        let (tx_l, mut rx_l) = mpsc::unbounded_channel();
        let e = collect(
            &client,
            &unique("ge"),
            &[&t],
            OffsetReset::Earliest,
            0,
            tx_e,
        )
        .await;
        let l = collect(&client, &unique("gl"), &[&t], OffsetReset::Latest, 0, tx_l).await;
        ready(h, &l, 2).await;
        recv_n(h, &mut rx_e, 10).await;
        let new = (0..5)
            .map(|i| Message::new(&t, format!("new{i}")))
            .collect();
        client.producer().send_batch(new).await.expect("batch");
        let got = recv_n(h, &mut rx_l, 5).await;
        assert!(got.iter().all(|g| g.text().starts_with("new")));
        recv_n(h, &mut rx_e, 5).await;
        e.stop().await.expect("stop");
        l.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// 4 concurrent producers × 10,000 messages: every one is delivered.
pub fn concurrent_producers_lose_nothing(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "concurrent", 4).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        let per = 10_000;
        let mut tasks = Vec::new();
        for p in 0..4 {
            let producer = client.producer();
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                let handles: Vec<_> = (0..per)
                    .map(|i| {
                        producer.send(Message::new(&t, format!("{p}-{i}")).key(format!("{i}")))
                    })
                    .collect();
                for hd in handles {
                    hd.await.expect("send");
                }
            }));
        }
        for task in tasks {
            task.await.expect("producer task");
        }
        let got = recv_n(h, &mut rx, 4 * per).await;
        let distinct: HashSet<String> = got.iter().map(Got::text).collect();
        assert_eq!(distinct.len(), 4 * per);
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// Shutdown lets a running handler finish and commits it; unhandled messages come
/// back to the next member, handled ones do not.
pub fn shutdown_finishes_in_flight_and_commits(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let group = unique("g");
        let client = h.client().await.expect("connect");
        let t = topic(&client, "shutdown", 1).await;
        let msgs = (0..20).map(|i| Message::new(&t, format!("{i}"))).collect();
        client.producer().send_batch(msgs).await.expect("batch");
        let started = Arc::new(tokio::sync::Notify::new());
        let finished = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
        let (s, f) = (started.clone(), finished.clone());
        let c = client
            .consumer(&group)
            .from_earliest()
            .start([t.clone()], move |d: Delivery| {
                let (s, f) = (s.clone(), f.clone());
                async move {
                    s.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    f.lock().push(d.value_str()?.to_string());
                    Ok::<(), Error>(())
                }
            })
            .await
            .expect("subscribe");
        tokio::time::timeout(h.patience(), started.notified())
            .await
            .expect("a handler started");
        shutdown(client).await;
        drop(c);
        let done = finished.lock().clone();
        assert!(
            !done.is_empty(),
            "the in-flight handler finished before shutdown returned"
        );
        assert!(done.len() < 20, "shutdown stopped fetching");

        let client = h.client().await.expect("reconnect");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &group, &[&t], OffsetReset::Earliest, 0, tx).await;
        let rest = recv_n(h, &mut rx, 20 - done.len()).await;
        let rest: HashSet<String> = rest.iter().map(Got::text).collect();
        for d in &done {
            assert!(!rest.contains(d), "{d} was committed but delivered again");
        }
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// When a member leaves, the other takes over its partitions from the committed
/// position.
pub fn member_leaving_hands_partitions_over(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "failover", 2).await;
        let group = unique("g");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = collect(&client, &group, &[&t], OffsetReset::Earliest, 0, tx.clone()).await;
        let other = h.client().await.expect("connect");
        let b = collect(&other, &group, &[&t], OffsetReset::Earliest, 1, tx).await;
        ready(h, &a, 1).await;
        ready(h, &b, 1).await;
        let p = client.producer();
        let first = (0..40)
            .map(|i| Message::new(&t, format!("a{i}")).key(format!("{i}")))
            .collect();
        p.send_batch(first).await.expect("batch");
        recv_n(h, &mut rx, 40).await;
        b.stop().await.expect("stop b");
        shutdown(other).await;
        ready(h, &a, 2).await;
        let second = (0..40)
            .map(|i| Message::new(&t, format!("b{i}")).key(format!("{i}")))
            .collect();
        p.send_batch(second).await.expect("batch");
        let got = recv_n(h, &mut rx, 40).await;
        assert!(got
            .iter()
            .all(|g| g.member == 0 && g.text().starts_with('b')));
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        a.stop().await.expect("stop a");
        shutdown(client).await;
    })
}

/// Bad input is refused with a typed error before anything is sent.
pub fn bad_input_gets_typed_errors(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let p = client.producer();
        assert!(matches!(
            p.send(Message::new("", "v")).await,
            Err(Error::EmptyTopic)
        ));
        assert!(matches!(
            p.send(Message::new("bad topic!", "v")).await,
            Err(Error::InvalidTopic { .. })
        ));
        let max = client.config().max_message_size;
        let t = topic(&client, "bad", 1).await;
        assert!(matches!(
            p.send(Message::new(&t, vec![0u8; max + 1])).await,
            Err(Error::MessageTooLarge { .. })
        ));
        assert!(matches!(
            p.send_batch(vec![Message::new(&t, "ok"), Message::new("", "x")])
                .await,
            Err(Error::EmptyTopic)
        ));
        let noop = |_d: Delivery| async { Ok::<(), Error>(()) };
        assert!(matches!(
            client.consumer("").start([t.clone()], noop).await,
            Err(Error::EmptyGroupId)
        ));
        assert!(matches!(
            client.consumer("g").start(Vec::<String>::new(), noop).await,
            Err(Error::NoTopics)
        ));
        assert!(matches!(
            Client::connect("nosuch://x").await,
            Err(Error::UnsupportedBackend { .. })
        ));
        assert!(matches!(
            client.admin().create_topic(TopicSpec::new(&t, 1)).await,
            Err(Error::TopicExists(_))
        ));
        // Nothing of the rejected batch was stored.
        let info = client.admin().describe_topic(&t).await.expect("describe");
        assert_eq!(info.message_count(), 0);
        shutdown(client).await;
        assert!(matches!(
            p.send(Message::new(&t, "late")).await,
            Err(Error::ProducerClosed)
        ));
    })
}

/// Topic and group administration.
pub fn admin_topics_and_groups(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let admin = client.admin();
        let t = topic(&client, "admin", 3).await;
        assert!(admin.list_topics().await.expect("list").contains(&t));
        assert!(admin.topic_exists(&t).await.expect("exists"));
        let info = admin.describe_topic(&t).await.expect("describe");
        assert_eq!(info.partitions.len(), 3);
        let msgs = (0..9)
            .map(|i| Message::new(&t, format!("{i}")).key(format!("{i}")))
            .collect();
        client.producer().send_batch(msgs).await.expect("batch");
        let info = admin.describe_topic(&t).await.expect("describe");
        assert_eq!(info.message_count(), 9);
        let group = unique("g");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &group, &[&t], OffsetReset::Earliest, 0, tx).await;
        recv_n(h, &mut rx, 9).await;
        c.stop().await.expect("stop");
        assert!(admin.list_groups().await.expect("groups").contains(&group));
        let g = admin.describe_group(&group).await.expect("describe group");
        assert_eq!(g.total_lag(), 0, "{g:?}");
        admin.delete_topic(&t).await.expect("delete");
        assert!(!admin.topic_exists(&t).await.expect("exists"));
        assert!(matches!(
            admin.describe_topic(&t).await,
            Err(Error::TopicNotFound(_))
        ));
        shutdown(client).await;
    })
}

/// Waits until `cond` holds, polling every 50 ms, up to the harness's patience.
async fn eventually<F: FnMut() -> bool>(h: &dyn Harness, what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + h.patience();
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: timed out waiting for {what}",
            h.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `group` has committed everything on `topic` (lag 0 on every
/// partition, each partition with messages committed).
async fn committed_all(h: &dyn Harness, client: &Client, group: &str, topic: &str) {
    let deadline = tokio::time::Instant::now() + h.patience();
    loop {
        if let Ok(g) = client.admin().describe_group(group).await {
            let offsets: Vec<_> = g.offsets.iter().filter(|o| o.topic == topic).collect();
            if !offsets.is_empty()
                && offsets
                    .iter()
                    .all(|o| o.lag == 0 && (o.end_offset == 0 || o.committed.is_some()))
            {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: {group} never committed all of {topic}",
            h.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A handler failing twice then succeeding is retried in place with growing delays
/// (exponential backoff), handled once, committed, and later messages wait for it.
/// The client's stats count exactly what happened.
pub fn retry_backs_off_then_commits_once(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "retry", 1).await;
        let group = unique("g");
        let attempts = Arc::new(parking_lot::Mutex::new(Vec::<(
            String,
            u32,
            tokio::time::Instant,
        )>::new()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = attempts.clone();
        let initial = Duration::from_millis(150);
        let c = client
            .consumer(&group)
            .from_earliest()
            .retry(courier::Backoff::exponential(3, initial).jitter(0.0))
            .start([t.clone()], move |d: Delivery| {
                let (a, tx) = (a.clone(), tx.clone());
                async move {
                    let v = d.value_str()?.to_string();
                    let n = {
                        let mut a = a.lock();
                        a.push((v.clone(), d.attempt, tokio::time::Instant::now()));
                        a.iter().filter(|(x, _, _)| *x == v).count()
                    };
                    if v == "flaky" && n <= 2 {
                        return Err(Error::InvalidArgument(format!("flaky attempt {n}")));
                    }
                    let _ = tx.send(Got::from(&d, 0));
                    Ok(())
                }
            })
            .await
            .expect("subscribe");
        let p = client.producer();
        for v in ["first", "flaky", "last"] {
            p.send(Message::new(&t, v)).await.expect("send");
        }
        let got = recv_n(h, &mut rx, 3).await;
        let order: Vec<String> = got.iter().map(Got::text).collect();
        assert_eq!(
            order,
            ["first", "flaky", "last"],
            "retried in place, in order"
        );
        committed_all(h, &client, &group, &t).await;
        expect_silence(&mut rx, Duration::from_millis(300)).await;
        let log = attempts.lock().clone();
        let flaky: Vec<_> = log.iter().filter(|(v, _, _)| v == "flaky").collect();
        assert_eq!(flaky.len(), 3, "two failures, then one success: {log:?}");
        assert_eq!(
            flaky.iter().map(|(_, a, _)| *a).collect::<Vec<_>>(),
            [1, 2, 3],
            "attempt counts in-place retries"
        );
        let gap1 = flaky[1].2 - flaky[0].2;
        let gap2 = flaky[2].2 - flaky[1].2;
        assert!(
            gap1 >= initial.mul_f64(0.95),
            "first delay {gap1:?} < {initial:?}"
        );
        assert!(
            gap2 >= (initial * 2).mul_f64(0.95),
            "second delay {gap2:?} did not grow to {:?}",
            initial * 2
        );
        assert_eq!(log.len(), 5, "first and last handled once each");
        let s = client.stats().topic(&t);
        assert_eq!(s.sent, 3, "{s:?}");
        assert_eq!(s.consumed, 3, "{s:?}");
        assert_eq!(s.consume_errors, 2, "{s:?}");
        assert_eq!(s.retries, 2, "{s:?}");
        assert_eq!(s.dead_lettered, 0, "{s:?}");
        assert_eq!(s.send_latency.count, 3);
        client.reset_stats();
        assert_eq!(
            client.stats().topic(&t).sent,
            0,
            "reset zeroes the counters"
        );
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// A message whose handler always fails lands in `{topic}.dlq` after the last retry
/// with its key, bytes and headers plus the `x-original-*` headers, and the source is
/// committed; a corrupt compressed value goes there without retries; re-driving
/// brings the message back to the original topic under its id and hides it from the
/// listing.
pub fn exhausted_message_is_dead_lettered_and_redriven(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "dlq", 2).await;
        let group = unique("g");
        let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (hl, cl) = (healed.clone(), calls.clone());
        let c = client
            .consumer(&group)
            .from_earliest()
            .retry(courier::Backoff::exponential(2, Duration::from_millis(50)))
            .start([t.clone()], move |d: Delivery| {
                let (hl, cl, tx) = (hl.clone(), cl.clone(), tx.clone());
                async move {
                    cl.fetch_add(1, Ordering::SeqCst);
                    if d.key.as_deref() == Some(b"poison") && !hl.load(Ordering::SeqCst) {
                        return Err(Error::InvalidArgument("cannot digest poison".into()));
                    }
                    let _ = tx.send(Got::from(&d, 0));
                    Ok(())
                }
            })
            .await
            .expect("subscribe");
        let p = client.producer();
        let binary: Vec<u8> = vec![0, 255, 7, 0, 1];
        let poison = p
            .send(
                Message::new(&t, binary.clone())
                    .key("poison")
                    .header("x-app", vec![1u8, 2, 3])
                    .id("poison-id-1"),
            )
            .await
            .expect("send");
        let corrupt_bytes = vec![9u8, 0, 0, 0, 1, 2, 3];
        let corrupt = p
            .send(
                Message::new(&t, corrupt_bytes.clone())
                    .key("corrupt")
                    .header("content-encoding", "lz4"),
            )
            .await
            .expect("send");
        p.send(Message::new(&t, "fine").key("fine"))
            .await
            .expect("send");
        let got = recv_n(h, &mut rx, 1).await;
        assert_eq!(got[0].text(), "fine");
        eventually(h, "two dead letters", || {
            client.stats().topic(&t).dead_lettered == 2
        })
        .await;
        committed_all(h, &client, &group, &t).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "poison: 1 + 2 retries; corrupt: never reaches the handler; fine: 1"
        );

        let dlq = format!("{t}.dlq");
        let letters = client.dead_letters().list(&dlq).await.expect("list");
        assert_eq!(letters.len(), 2, "{letters:?}");
        let pl = letters
            .iter()
            .find(|l| l.key.as_deref() == Some(b"poison"))
            .expect("poison letter");
        assert_eq!(pl.value.as_ref(), &binary[..], "original bytes");
        assert_eq!(
            pl.headers.get("x-app").map(|b| b.as_ref()),
            Some(&[1u8, 2, 3][..])
        );
        assert_eq!(pl.original_topic, t);
        assert_eq!(pl.original_partition, Some(poison.partition));
        assert_eq!(pl.original_offset, Some(poison.offset));
        assert_eq!(pl.original_id.as_deref(), Some("poison-id-1"));
        assert!(pl.error.contains("cannot digest poison"), "{}", pl.error);
        assert_eq!(pl.group, group);
        assert_eq!(pl.retry_count, 2);
        assert!((pl.failed_at - courier::now_millis()).abs() < 120_000);
        let cl_ = letters
            .iter()
            .find(|l| l.key.as_deref() == Some(b"corrupt"))
            .expect("corrupt letter");
        assert_eq!(
            cl_.value.as_ref(),
            &corrupt_bytes[..],
            "still the stored bytes"
        );
        assert_eq!(cl_.retry_count, 0, "corruption is not retried");
        assert_eq!(cl_.original_offset, Some(corrupt.offset));
        assert!(cl_.error.contains("lz4"), "{}", cl_.error);
        assert_eq!(cl_.headers.get_str("content-encoding"), Some("lz4"));

        healed.store(true, Ordering::SeqCst);
        let chosen: Vec<_> = letters.iter().filter(|l| l.id == pl.id).cloned().collect();
        let report = client
            .dead_letters()
            .redrive_letters(&chosen, 50)
            .await
            .expect("redrive");
        assert_eq!(report.redriven, vec![pl.id.clone()]);
        let back = recv_n(h, &mut rx, 1).await;
        assert_eq!(back[0].value.as_ref(), &binary[..]);
        assert_eq!(back[0].id, "poison-id-1");
        assert_eq!(back[0].topic, t);
        assert!(
            back[0].headers.get_str("x-original-topic").is_none(),
            "dead-letter headers are dropped on re-drive"
        );
        let left = client.dead_letters().list(&dlq).await.expect("list");
        assert_eq!(left.len(), 1, "re-driven letters are hidden: {left:?}");
        assert_eq!(left[0].id, cl_.id);
        let s = client.stats().topic(&t);
        assert_eq!((s.dead_lettered, s.retries), (2, 2), "{s:?}");
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// With dedup on, a message id seen within the window is handled once (and the
/// duplicate is still committed).
pub fn duplicate_id_is_handled_once(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "dedup", 2).await;
        let group = unique("g");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = client
            .consumer(&group)
            .from_earliest()
            .dedup(
                Arc::new(courier::MemoryDedupStore::new()),
                Duration::from_secs(600),
            )
            .start([t.clone()], move |d: Delivery| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(Got::from(&d, 0));
                    Ok::<(), Error>(())
                }
            })
            .await
            .expect("subscribe");
        let p = client.producer();
        // Duplicates of one id land on different partitions too (different keys).
        for (i, id) in ["a", "b", "a", "c", "b", "a"].iter().enumerate() {
            p.send(
                Message::new(&t, format!("{id}{i}"))
                    .key(format!("k{i}"))
                    .id(*id),
            )
            .await
            .expect("send");
        }
        let got = recv_n(h, &mut rx, 3).await;
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        let ids: HashSet<String> = got.iter().map(|g| g.id.clone()).collect();
        assert_eq!(ids.len(), 3, "{got:?}");
        committed_all(h, &client, &group, &t).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// A trace set on send (the current context, or an OpenTelemetry producer's
/// `traceparent`) is the trace of the handler's span and of its current context.
pub fn trace_context_reaches_handler_span(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        crate::capture::install();
        let client = h.client().await.expect("connect");
        let t = topic(&client, "trace", 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = client
            .consumer(unique("g"))
            .from_earliest()
            .start([t.clone()], move |d: Delivery| {
                let tx = tx.clone();
                async move {
                    let ctx = courier::TraceContext::current();
                    let span_trace = crate::capture::current_trace_id();
                    let _ = tx.send((
                        d.value_str()?.to_string(),
                        d.headers.clone(),
                        ctx,
                        span_trace,
                    ));
                    Ok::<(), Error>(())
                }
            })
            .await
            .expect("subscribe");
        let p = client.producer();
        let root = courier::TraceContext::new_root();
        root.scope(async {
            p.send(Message::new(&t, "in-scope")).await.expect("send");
        })
        .await;
        let otel = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        p.send(Message::new(&t, "otel").header("traceparent", otel))
            .await
            .expect("send");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let got = tokio::time::timeout(h.patience(), rx.recv())
                .await
                .expect("delivery in time")
                .expect("channel open");
            seen.push(got);
        }
        let (_, headers, ctx, span_trace) =
            seen.iter().find(|s| s.0 == "in-scope").expect("in-scope");
        let want = root.trace_id_hex();
        assert_eq!(headers.get_str("X-Trace-ID"), Some(want.as_str()));
        assert_eq!(headers.get_str("x-trace-id"), Some(want.as_str()));
        assert_eq!(
            headers.get_str("x-parent-span-id"),
            Some(root.span_id_hex().as_str())
        );
        assert_eq!(headers.get_str("x-sampled"), Some("1"));
        assert!(headers.get_str("x-span-id").is_some());
        assert!(headers
            .get_str("traceparent")
            .is_some_and(|tp| tp.starts_with(&format!("00-{want}-"))));
        let ctx = ctx.expect("handler runs in a trace context");
        assert_eq!(ctx.trace_id, root.trace_id);
        assert_eq!(
            span_trace.as_deref(),
            Some(want.as_str()),
            "handler span carries the trace id"
        );

        let (_, _, ctx, span_trace) = seen.iter().find(|s| s.0 == "otel").expect("otel");
        let ctx = ctx.expect("context from traceparent");
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            ctx.parent_span_id,
            Some(0x00f0_67aa_0ba9_02b7),
            "child of the producer span"
        );
        assert_eq!(
            span_trace.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// `Driver::read_records` (what the scheduler's crash recovery looks interrupted
/// moves up with) returns a partition's records from an offset on, with the offsets
/// receipts named, only that partition's, and nothing past the end; one that cannot
/// says so with `Error::Unsupported` (and does not declare `read_by_position`).
pub fn read_records_by_position(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "readpos", 2).await;
        let driver = client.driver().clone();
        let tp = courier::TopicPartition::new(&t, 0);
        // A driver may read by position without declaring it (the capability also
        // promises the scheduler's crash recovery works there); then it is checked too.
        if let Err(Error::Unsupported { .. }) = driver.read_records(&tp, 0, 10).await {
            assert!(!client.capabilities().read_by_position);
            return shutdown(client).await;
        }
        let p = client.producer();
        // RabbitMQ's confirms do not say where a message was stored, so its receipts
        // carry a publish sequence (docs/backends/amqp.md): there, reads start where
        // the partition ended before the sends and offsets are checked for order only.
        let receipts_name_offsets = driver.name() != "amqp";
        let end_of = |info: courier::TopicInfo| {
            info.partitions
                .iter()
                .find(|p| p.partition == 0)
                .map_or(0, |p| p.end_offset)
        };
        let start = end_of(client.admin().describe_topic(&t).await.expect("describe"));
        // Interleaved with partition 1, so offsets of partition 0 need not be dense.
        let mut receipts = Vec::new();
        for i in 0..10u32 {
            let mut batch = vec![Message::new(&t, format!("v{i}"))
                .key(format!("k{i}"))
                .header("n", i.to_string())
                .partition(0)];
            batch.push(Message::new(&t, format!("other{i}")).partition(1));
            let r = p.send_batch(batch).await.expect("send");
            receipts.push(r[0].clone());
        }
        let first = if receipts_name_offsets {
            receipts[0].offset
        } else {
            start
        };
        let all = driver.read_records(&tp, first, 100).await.expect("read");
        assert_eq!(all.len(), 10, "{all:?}");
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "offsets increase");
        for (i, ((offset, r), receipt)) in all.iter().zip(&receipts).enumerate() {
            if receipts_name_offsets {
                assert_eq!(*offset, receipt.offset, "record {i}");
            }
            assert_eq!(r.id, receipt.id, "record {i}");
            assert_eq!(r.topic, t);
            assert_eq!(r.partition, Some(0));
            assert_eq!(r.value.as_ref(), format!("v{i}").as_bytes());
            assert_eq!(r.key.as_deref(), Some(format!("k{i}").as_bytes()));
            assert_eq!(r.headers.get_str("n"), Some(i.to_string().as_str()));
            assert_eq!(r.timestamp, receipt.timestamp, "record {i}");
        }
        let mid = driver.read_records(&tp, all[3].0, 4).await.expect("read");
        let ids: Vec<&str> = mid.iter().map(|(_, r)| r.id.as_str()).collect();
        let want: Vec<&str> = receipts[3..7].iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, want);
        let past = driver
            .read_records(&tp, all[9].0 + 1, 10)
            .await
            .expect("read past the end");
        assert!(past.is_empty(), "{past:?}");
        // One batch to one partition (one record batch on Kafka) reads back whole.
        let batch: Vec<Message> = (0..20)
            .map(|i| Message::new(&t, format!("b{i}")).partition(0))
            .collect();
        let sent = p.send_batch(batch).await.expect("send");
        let from = if receipts_name_offsets {
            sent[0].offset
        } else {
            all[9].0 + 1
        };
        let back = driver
            .read_records(&tp, from, 100)
            .await
            .expect("read the batch");
        let ids: Vec<&str> = back.iter().map(|(_, r)| r.id.as_str()).collect();
        let want: Vec<&str> = sent.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, want);
        shutdown(client).await;
    })
}

/// Values over 1 KiB arrive byte-identical (compressed on the way where the backend
/// does not compress natively); small values are untouched.
pub fn large_values_are_compressed_transparently(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = h.client().await.expect("connect");
        let t = topic(&client, "lz4", 1).await;
        let big = "courier compresses repetitive payloads well. ".repeat(100);
        let small = "tiny".to_string();
        let p = client.producer();
        p.send(Message::new(&t, big.clone())).await.expect("send");
        p.send(Message::new(&t, small.clone())).await.expect("send");
        let native = client.capabilities().native_compression;
        let info = client.admin().describe_topic(&t).await.expect("describe");
        assert_eq!(info.message_count(), 2);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        let got = recv_n(h, &mut rx, 2).await;
        assert_eq!(got[0].text(), big);
        assert_eq!(got[1].text(), small);
        assert!(
            got.iter()
                .all(|g| g.headers.get("content-encoding").is_none()),
            "decoded values lose the encoding header (native compression: {native})"
        );
        c.stop().await.expect("stop");
        if !native {
            // Without the pipeline the stored form shows: lz4, marked, smaller.
            let (tx, mut raw) = mpsc::unbounded_channel();
            let r = client
                .consumer(unique("raw"))
                .from_earliest()
                .bare()
                .start([t.clone()], move |d: Delivery| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(Got::from(&d, 0));
                        Ok::<(), Error>(())
                    }
                })
                .await
                .expect("subscribe");
            let stored = recv_n(h, &mut raw, 2).await;
            assert_eq!(stored[0].headers.get_str("content-encoding"), Some("lz4"));
            assert!(
                stored[0].value.len() < big.len() / 4,
                "{}",
                stored[0].value.len()
            );
            assert_eq!(stored[1].value.as_ref(), small.as_bytes());
            assert!(stored[1].headers.get("content-encoding").is_none());
            r.stop().await.expect("stop");
        }
        shutdown(client).await;
    })
}
pub use crate::schedule::{
    delayed_not_visible_early_then_on_time, delayed_order_follows_due_times,
    delayed_survive_restart, txn_commit_visible_once, txn_crash_check_back_commits,
    txn_rollback_never_visible, txn_unknown_until_limit_rolls_back,
};

#[cfg(test)]
mod sweep_tests {
    use super::unique_created_ms;

    #[test]
    fn reads_the_creation_time_of_unique_names_only() {
        let name = crate::harness::unique("orders");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        let ms = unique_created_ms(&name).expect("unique name");
        assert!(ms <= now && now - ms < 10_000, "{ms} vs {now}");
        assert_eq!(unique_created_ms(&format!("{name}.dlq")), Some(ms));
        assert_eq!(unique_created_ms("user.events"), None);
        assert_eq!(unique_created_ms("orders-notaulidnotaulidnotaulid"), None);
    }
}
