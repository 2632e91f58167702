//! Live config (SPEC C7) on `file://`: the config file changes while messages are
//! produced and consumed; the new compression threshold applies to the next sends,
//! consumers rejoin with the new commit interval, and no message is lost or handled
//! twice.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{
    Client, Config, Delivery, Error, FileConfigSource, Message, OffsetReset,
    HEADER_CONTENT_ENCODING,
};
use parking_lot::Mutex;

const TOPIC: &str = "live.events";

/// Replaces the file in one step, so the watcher never reads half a file.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

fn config_text(url: &str, threshold: usize, commit_ms: u64, reset: &str) -> String {
    format!(
        "url = \"{url}\"\n\
         [producerConfig]\ncompressionThreshold = {threshold}\n\
         [consumerConfig]\nautoCommitIntervalMs = {commit_ms}\nautoOffsetReset = \"{reset}\"\n"
    )
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn value(i: usize) -> String {
    // ~2 KiB and compressible: over the 1 KiB threshold, under the 1 MB one.
    format!("{i:06}-{}", "courier live config ".repeat(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_changes_apply_while_producing_and_consuming() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().join("data").display());
    let path = dir.path().join("courier.toml");
    // Compression effectively off, commits every 10 s (longer than the test takes
    // up to the commit check below; not much longer, since an idle file:// member
    // can miss a wake-up until its commit timer fires).
    write_config(&path, &config_text(&url, 1_000_000, 10_000, "latest"));
    let client = Client::connect_with(Config::from_file(&path).expect("load"))
        .await
        .expect("connect");
    client.watch_config(FileConfigSource::new(&path).poll_interval(Duration::from_millis(20)));
    client
        .admin()
        .create_topic(courier::TopicSpec::new(TOPIC, 2))
        .await
        .expect("create");

    // Group "full": the default pipeline; counts every value it is handed.
    let handled: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let h2 = handled.clone();
    let full = client
        .consumer("live.full")
        .from_earliest()
        .start([TOPIC], move |d: Delivery| {
            let h = h2.clone();
            async move {
                let v = d.value_str()?.to_string();
                assert!(v.ends_with("config "), "decompressed value");
                *h.lock().entry(v[..6].to_string()).or_default() += 1;
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("start full");
    // Group "raw": no pipeline, so it sees the stored encoding header.
    let encoded: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
    let e2 = encoded.clone();
    let raw = client
        .consumer("live.raw")
        .from_earliest()
        .bare()
        .start([TOPIC], move |d: Delivery| {
            let e = e2.clone();
            async move {
                // The value may be compressed here; the number is in a header.
                let n = d.headers.get_str("n").unwrap_or_default().to_string();
                let zipped = d.header(HEADER_CONTENT_ENCODING).is_some();
                e.lock().insert(n, zipped);
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("start raw");
    full.wait_assigned(2, Duration::from_secs(10))
        .await
        .expect("assigned");
    raw.wait_assigned(2, Duration::from_secs(10))
        .await
        .expect("assigned");

    let joined = Instant::now();
    let producer = client.producer();
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut i = 0;
    let send = |i: usize| {
        producer.send(
            Message::new(TOPIC, value(i))
                .key(format!("k{}", i % 7))
                .header("n", format!("{i:06}")),
        )
    };
    for _ in 0..200 {
        send(i).await.expect("send");
        before.push(i);
        i += 1;
    }
    wait_for("phase 1 handled", Duration::from_secs(20), || {
        handled.lock().len() == 200
    })
    .await;
    let lag = client
        .admin()
        .describe_group("live.full")
        .await
        .expect("describe");
    if joined.elapsed() < Duration::from_secs(9) {
        assert_eq!(lag.total_lag(), 200, "10 s interval: nothing committed yet");
    }

    // A broken file is ignored; the config in force stays.
    write_config(&path, "this is [not toml");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        client.current_config().producer.compression_threshold,
        1_000_000
    );

    // The real change, while sends keep going.
    write_config(&path, &config_text(&url, 1024, 50, "earliest"));
    let changed_at = Instant::now();
    while i < 400 {
        let applied = client.current_config().producer.compression_threshold == 1024;
        send(i).await.expect("send");
        if applied {
            after.push(i);
        }
        i += 1;
        if !applied {
            assert!(
                changed_at.elapsed() < Duration::from_secs(10),
                "config not applied"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert!(after.len() > 100, "most of phase 2 sent after the change");
    let cur = client.current_config();
    assert_eq!(cur.consumer.auto_commit_interval_ms, 50);
    assert_eq!(cur.url.as_deref(), Some(url.as_str()));

    let start = Instant::now();
    while handled.lock().len() != 400 || encoded.lock().len() != 400 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not everything handled: full {} raw {}",
            handled.lock().len(),
            encoded.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The rejoined consumers commit every 50 ms now, while still running.
    let start = Instant::now();
    loop {
        let info = client
            .admin()
            .describe_group("live.full")
            .await
            .expect("describe");
        if info.total_lag() == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "new commit interval not in force: lag {}",
            info.total_lag()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let enc = encoded.lock();
        for n in &before {
            assert!(
                !enc[&format!("{n:06}")],
                "message {n} compressed before the change"
            );
        }
        for n in &after {
            assert!(
                enc[&format!("{n:06}")],
                "message {n} not compressed after the change"
            );
        }
    }
    // A consumer made now takes the new offset reset.
    let late: Arc<Mutex<usize>> = Arc::default();
    let l2 = late.clone();
    let newcomer = client
        .consumer("live.newcomer")
        .start([TOPIC], move |_d: Delivery| {
            let l = l2.clone();
            async move {
                *l.lock() += 1;
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("start newcomer");
    assert_eq!(
        client.current_config().consumer.auto_offset_reset,
        OffsetReset::Earliest
    );
    wait_for(
        "newcomer reads from the start",
        Duration::from_secs(20),
        || *late.lock() == 400,
    )
    .await;

    full.stop().await.expect("stop");
    raw.stop().await.expect("stop");
    newcomer.stop().await.expect("stop");
    let counts = handled.lock().clone();
    assert_eq!(counts.len(), 400, "no message lost");
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(dups.is_empty(), "handled more than once: {dups:?}");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

/// `producerConfig.compressionThreshold` (SPEC R6) decides which values are
/// compressed: here 100 bytes instead of the default 1 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_threshold_comes_from_the_config() {
    let mut config = Config::with_url("memory://live-threshold");
    config.producer.compression_threshold = 100;
    let client = Client::connect_with(config).await.expect("connect");
    assert_eq!(client.current_config().producer.compression_threshold, 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let raw = client
        .consumer("threshold.raw")
        .from_earliest()
        .bare()
        .start(["threshold.events"], move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let zipped = d.header(HEADER_CONTENT_ENCODING).is_some();
                let _ = tx.send((d.headers.get_str("n").map(str::to_string), zipped));
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("start");
    let p = client.producer();
    for (n, len) in [("small", 90), ("large", 300)] {
        p.send(Message::new("threshold.events", "a".repeat(len)).header("n", n))
            .await
            .expect("send");
    }
    let mut seen = HashMap::new();
    while seen.len() < 2 {
        let (n, zipped) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("in time")
            .expect("open");
        seen.insert(n.unwrap_or_default(), zipped);
    }
    assert!(!seen["small"], "90 B stays under the 100 B threshold");
    assert!(
        seen["large"],
        "300 B is over it (the default would not compress)"
    );
    raw.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}
