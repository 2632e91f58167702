//! Publishing: partition choice (Courier's murmur2), header mapping and delivery
//! reports turned into receipts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_core::{partition_for_key, Error, Receipt, Record, Result, HEADER_MESSAGE_ID};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

/// How long a topic's partition count is trusted before it is looked up again (so a
/// topic grown elsewhere is noticed).
const PARTITIONS_TTL: Duration = Duration::from_secs(30);
/// How long a publish waits for a new topic's metadata before letting librdkafka
/// (configured with the same murmur2 partitioner) place its records.
const METADATA_WAIT: Duration = Duration::from_secs(5);

struct TopicState {
    partitions: u32,
    fetched: Instant,
    /// Keyless records stick to one partition per publish call, rotating between calls.
    sticky: Arc<AtomicU32>,
}

/// The producing half of the driver. All records of a batch are handed to librdkafka
/// before any delivery report is awaited, so everything is in flight at once.
pub(crate) struct Publisher {
    producer: FutureProducer,
    topics: Mutex<HashMap<String, TopicState>>,
    /// Fair (FIFO) lock: publish calls enqueue in the order they were first polled, so
    /// concurrent batches keep per-key order.
    enqueue: tokio::sync::Mutex<()>,
}

impl Publisher {
    pub(crate) fn new(producer: FutureProducer) -> Self {
        Self {
            producer,
            topics: Mutex::new(HashMap::new()),
            enqueue: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Forgets a topic's partition count (after add partitions / delete).
    pub(crate) fn forget(&self, topic: &str) {
        if let Ok(mut t) = self.topics.lock() {
            t.remove(topic);
        }
    }

    fn cached(&self, topic: &str) -> Option<(u32, Arc<AtomicU32>)> {
        let t = self.topics.lock().ok()?;
        let s = t.get(topic)?;
        (s.fetched.elapsed() < PARTITIONS_TTL).then(|| (s.partitions, s.sticky.clone()))
    }

    /// Partition count of `topic`, from cache or metadata; `None` when the broker does
    /// not know the topic yet (it may be auto-created by the send itself).
    async fn partitions(&self, topic: &str) -> Option<(u32, Arc<AtomicU32>)> {
        if let Some(c) = self.cached(topic) {
            return Some(c);
        }
        let deadline = Instant::now() + METADATA_WAIT;
        loop {
            let producer = self.producer.clone();
            let name = topic.to_string();
            let n = tokio::task::spawn_blocking(move || {
                let md = producer
                    .client()
                    .fetch_metadata(Some(&name), Duration::from_secs(5))
                    .ok()?;
                let t = md.topics().iter().find(|t| t.name() == name)?;
                (t.error().is_none() && !t.partitions().is_empty())
                    .then_some(t.partitions().len() as u32)
            })
            .await
            .ok()
            .flatten();
            if let Some(n) = n {
                let sticky = Arc::new(AtomicU32::new(rand_start()));
                if let Ok(mut t) = self.topics.lock() {
                    t.insert(
                        topic.to_string(),
                        TopicState {
                            partitions: n,
                            fetched: Instant::now(),
                            sticky: sticky.clone(),
                        },
                    );
                }
                return Some((n, sticky));
            }
            if Instant::now() >= deadline {
                tracing::warn!(topic, "no metadata for topic; librdkafka will partition");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes `batch`; receipts in input order.
    pub(crate) async fn publish(&self, batch: Vec<Record>) -> Result<Vec<Receipt>> {
        let total = batch.len();
        let mut futures: Vec<DeliveryFuture> = Vec::with_capacity(total);
        {
            // `unconstrained`: a coop-budget yield here would give up our FIFO place.
            let _turn = tokio::task::unconstrained(self.enqueue.lock()).await;
            let mut chosen: HashMap<&str, Option<(u32, u32)>> = HashMap::new();
            for r in &batch {
                if !chosen.contains_key(r.topic.as_str()) {
                    let p = self
                        .partitions(&r.topic)
                        .await
                        .map(|(n, sticky)| (n, sticky.fetch_add(1, Ordering::Relaxed) % n.max(1)));
                    chosen.insert(r.topic.as_str(), p);
                }
            }
            for r in &batch {
                let partition = match (r.partition, &r.key, chosen.get(r.topic.as_str())) {
                    (Some(p), _, _) => Some(p as i32),
                    (None, Some(k), Some(Some((n, _)))) => Some(partition_for_key(k, *n) as i32),
                    (None, None, Some(Some((_, sticky)))) => Some(*sticky as i32),
                    _ => None,
                };
                let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 1);
                headers = headers.insert(Header {
                    key: HEADER_MESSAGE_ID,
                    value: Some(r.id.as_bytes()),
                });
                for (name, value) in r.headers.iter() {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(value.as_ref()),
                    });
                }
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic)
                    .payload(r.value.as_ref())
                    .headers(headers)
                    .timestamp(r.timestamp);
                if let Some(k) = &r.key {
                    record = record.key(k.as_ref());
                }
                if let Some(p) = partition {
                    record = record.partition(p);
                }
                loop {
                    match self.producer.send_result(record) {
                        Ok(f) => {
                            futures.push(f);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec)) => {
                            // librdkafka's queue drains as deliveries complete.
                            record = rec;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err((e, _)) => {
                            return Err(Error::BatchSendFailed {
                                failed: total - futures.len(),
                                total,
                                source: Box::new(send_error(&r.topic, e)),
                            });
                        }
                    }
                }
            }
        }
        let mut receipts = Vec::with_capacity(total);
        let mut first_error: Option<Error> = None;
        let mut failed = 0;
        for (r, f) in batch.into_iter().zip(futures) {
            match f.await {
                Ok(Ok(d)) => receipts.push(Receipt {
                    topic: r.topic,
                    partition: d.partition.max(0) as u32,
                    offset: d.offset.max(0) as u64,
                    id: r.id,
                    timestamp: r.timestamp,
                }),
                Ok(Err((e, _))) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| send_error(&r.topic, e));
                }
                Err(_) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| Error::SendFailed {
                        topic: r.topic.clone(),
                        source: "producer dropped the delivery report".into(),
                    });
                }
            }
        }
        match first_error {
            None => Ok(receipts),
            Some(e) => Err(Error::BatchSendFailed {
                failed,
                total,
                source: Box::new(e),
            }),
        }
    }
}

fn send_error(topic: &str, e: KafkaError) -> Error {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
            Error::TopicNotFound(topic.to_string())
        }
        _ => Error::SendFailed {
            topic: topic.to_string(),
            source: Box::new(e),
        },
    }
}

/// A start for keyless rotation that differs between processes.
fn rand_start() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}
