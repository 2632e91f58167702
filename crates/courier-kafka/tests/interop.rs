//! Interop with an independent client: the pure-Python `kafka-python` reads what
//! Courier produced (key, headers, partition as Java's murmur2 puts them) and Courier
//! consumes what `kafka-python` produced. Needs the broker on 127.0.0.1:9092
//! (`scripts/brokers.sh start`) and python3; installs kafka-python and lz4 (the codec Courier uses) into the project's
//! venv (`target/venv`, or `$COURIER_VENV`) when missing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use courier_core::{partition_for_key, Config, Driver, Headers, OffsetReset, Record, TopicSpec};
use courier_kafka::KafkaDriver;

fn url() -> String {
    std::env::var("COURIER_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
}

fn bootstrap() -> String {
    url().trim_start_matches("kafka://").to_string()
}

/// A python with kafka-python importable, installed idempotently.
fn python() -> PathBuf {
    let venv = std::env::var("COURIER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/venv"));
    let py = venv.join("bin/python");
    if !py.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(ok.success(), "could not create {}", venv.display());
    }
    let has = Command::new(&py)
        .args(["-c", "import kafka, lz4"])
        .status()
        .expect("run venv python");
    if !has.success() {
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "kafka-python", "lz4"])
            .status()
            .expect("pip install kafka-python");
        assert!(ok.success(), "pip install kafka-python failed");
    }
    py
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

async fn driver() -> Arc<KafkaDriver> {
    let mut c = Config::with_url(url());
    c.consumer.session_timeout_ms = 6000;
    Arc::new(KafkaDriver::connect(c).await.expect("connect"))
}

const READ: &str = r#"
import json, sys
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2
boot, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = KafkaConsumer(bootstrap_servers=boot, enable_auto_commit=False, consumer_timeout_ms=15000)
parts = sorted(c.partitions_for_topic(topic))
c.assign([TopicPartition(topic, p) for p in parts])
c.seek_to_beginning()
got = 0
for m in c:
    print(json.dumps({
        "partition": m.partition, "offset": m.offset,
        "key": m.key.decode() if m.key is not None else None,
        "value": m.value.decode(),
        "headers": {k: v.decode() for k, v in m.headers},
        "java_partition": (murmur2(m.key) & 0x7fffffff) % len(parts) if m.key is not None else None,
    }))
    got += 1
    if got == n:
        break
c.close()
"#;

const WRITE: &str = r#"
import sys
from kafka import KafkaProducer
boot, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = KafkaProducer(bootstrap_servers=boot, acks=1)
for i in range(n):
    p.send(topic, key=f"py-{i}".encode(), value=f"from-python-{i}".encode(),
           headers=[("origin", b"kafka-python"), ("seq", str(i).encode())])
p.flush()
p.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_reads_what_courier_produced() {
    let py = python();
    let d = driver().await;
    let topic = unique("interop-out");
    d.create_topic(TopicSpec::new(&topic, 3))
        .await
        .expect("create");
    let records: Vec<Record> = (0..30)
        .map(|i| {
            let mut h = Headers::new();
            h.insert("trace", format!("t{i}"));
            Record {
                topic: topic.clone(),
                partition: None,
                id: format!("id-{i}"),
                key: Some(format!("user-{i}").into()),
                value: format!("v{i}").into(),
                headers: h,
                timestamp: 1_700_000_000_000 + i,
            }
        })
        .collect();
    let receipts = d.publish(records).await.expect("publish");
    let out = Command::new(&py)
        .args(["-c", READ, &bootstrap(), &topic, "30"])
        .output()
        .expect("run kafka-python reader");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 30, "kafka-python read every message");
    for m in &lines {
        let key = m["key"].as_str().expect("key");
        let i: usize = key.trim_start_matches("user-").parse().expect("i");
        let partition = m["partition"].as_u64().expect("partition") as u32;
        assert_eq!(partition, partition_for_key(key.as_bytes(), 3), "{key}");
        assert_eq!(
            m["java_partition"].as_u64(),
            Some(u64::from(partition)),
            "{key}"
        );
        assert_eq!(receipts[i].partition, partition);
        assert_eq!(receipts[i].offset, m["offset"].as_u64().unwrap());
        assert_eq!(m["value"], format!("v{i}"));
        assert_eq!(m["headers"]["trace"], format!("t{i}"));
        assert_eq!(m["headers"]["x-message-id"], format!("id-{i}"));
    }
    d.delete_topic(&topic).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_consumes_what_kafka_python_produced() {
    let py = python();
    let d = driver().await;
    let topic = unique("interop-in");
    d.create_topic(TopicSpec::new(&topic, 3))
        .await
        .expect("create");
    let out = Command::new(&py)
        .args(["-c", WRITE, &bootstrap(), &topic, "20"])
        .output()
        .expect("run kafka-python writer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut spec = courier_core::SubscribeSpec::new(unique("g"), vec![topic.clone()]);
    spec.auto_offset_reset = OffsetReset::Earliest;
    spec.session_timeout = Duration::from_secs(6);
    let mut sub = d.subscribe(spec).await.expect("subscribe");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while got.len() < 20 {
        let batch = tokio::time::timeout_at(deadline, sub.next_batch(100))
            .await
            .expect("messages within 45 s")
            .expect("next_batch")
            .expect("open");
        got.extend(batch);
    }
    assert_eq!(got.len(), 20);
    for m in got {
        let key = String::from_utf8(m.key.clone().expect("key").to_vec()).unwrap();
        let i: usize = key.trim_start_matches("py-").parse().unwrap();
        assert_eq!(m.value_str().unwrap(), format!("from-python-{i}"));
        assert_eq!(
            m.header("origin").map(|b| b.as_ref()),
            Some(&b"kafka-python"[..])
        );
        assert_eq!(m.headers.get_str("seq"), Some(i.to_string().as_str()));
        // kafka-python's default partitioner is Java's murmur2, like Courier's.
        assert_eq!(m.partition, partition_for_key(key.as_bytes(), 3), "{key}");
        m.ack();
    }
    sub.close().await.expect("close");
    d.delete_topic(&topic).await.expect("delete");
}
