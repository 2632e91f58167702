//! Publishing: Courier's murmur2 picks the partition subject, every record of a batch
//! is written to the connection before any JetStream ack is awaited, and the stream
//! sequence from the ack becomes the receipt's offset.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::Context;
use async_nats::Subject;
use courier_core::{partition_for_key, Error, Receipt, Record, Result, TopicSpec};
use parking_lot::Mutex;

use crate::{codec, names, topics};

/// How long a topic's partition count is trusted before it is looked up again (so a
/// topic grown elsewhere is noticed).
const PARTITIONS_TTL: Duration = Duration::from_secs(30);
/// Acks one publish call leaves unawaited while it is still writing.
const ACK_WINDOW: usize = 4096;
/// In-flight acks of the whole driver (async-nats' permit pool).
pub(crate) const MAX_ACKS_IN_FLIGHT: usize = 16 * 1024;

struct TopicState {
    partitions: u32,
    /// The partitions' subjects, built once rather than per message.
    subjects: Arc<[Subject]>,
    fetched: Instant,
    /// Keyless records stick to one partition per publish call, rotating between calls.
    sticky: Arc<AtomicU32>,
}

/// Partition count, keyless rotation and partition subjects of a topic.
type Route = (u32, Arc<AtomicU32>, Arc<[Subject]>);

/// The producing half of the driver.
pub(crate) struct Publisher {
    js: Context,
    default_partitions: u32,
    topics: Mutex<HashMap<String, TopicState>>,
    /// Fair (FIFO) lock: publish calls write to the connection in the order they were
    /// first polled, so concurrent batches keep per-key order.
    enqueue: tokio::sync::Mutex<()>,
}

impl Publisher {
    pub(crate) fn new(js: Context, default_partitions: u32) -> Self {
        Self {
            js,
            default_partitions: default_partitions.max(1),
            topics: Mutex::new(HashMap::new()),
            enqueue: tokio::sync::Mutex::new(()),
        }
    }

    /// Forgets a topic's partition count (after add partitions / delete).
    pub(crate) fn forget(&self, topic: &str) {
        self.topics.lock().remove(topic);
    }

    /// Partition count of `topic`; a topic that does not exist is created with the
    /// default partition count (implicit creation, as on the other backends).
    async fn partitions(&self, topic: &str) -> Result<Route> {
        if let Some(s) = self.topics.lock().get(topic) {
            if s.fetched.elapsed() < PARTITIONS_TTL {
                return Ok((s.partitions, s.sticky.clone(), s.subjects.clone()));
            }
        }
        let n = match topics::get(&self.js, topic).await? {
            Some(s) => topics::partition_count(s.cached_info()),
            None => {
                let spec = TopicSpec::new(topic, self.default_partitions);
                topics::create(&self.js, &spec, false).await?;
                match topics::get(&self.js, topic).await? {
                    Some(s) => topics::partition_count(s.cached_info()),
                    None => return Err(Error::TopicNotFound(topic.to_string())),
                }
            }
        };
        let sticky = Arc::new(AtomicU32::new(rand_start()));
        let subjects: Arc<[Subject]> = names::subjects(topic, n)
            .into_iter()
            .map(Subject::from)
            .collect();
        self.topics.lock().insert(
            topic.to_string(),
            TopicState {
                partitions: n,
                subjects: subjects.clone(),
                fetched: Instant::now(),
                sticky: sticky.clone(),
            },
        );
        Ok((n, sticky, subjects))
    }

    /// Publishes `batch`; receipts in input order.
    pub(crate) async fn publish(&self, batch: Vec<Record>) -> Result<Vec<Receipt>> {
        let total = batch.len();
        let mut acks: Vec<Option<std::result::Result<u64, Error>>> = Vec::with_capacity(total);
        let mut partitions: Vec<u32> = Vec::with_capacity(total);
        let mut window: VecDeque<(usize, PublishAckFuture)> = VecDeque::new();
        {
            // `unconstrained`: a coop-budget yield here would give up our FIFO place.
            let _turn = tokio::task::unconstrained(self.enqueue.lock()).await;
            let mut chosen: HashMap<&str, (u32, u32, Arc<[Subject]>)> = HashMap::new();
            for r in &batch {
                if !chosen.contains_key(r.topic.as_str()) {
                    let (n, sticky, subjects) =
                        self.partitions(&r.topic)
                            .await
                            .map_err(|e| Error::BatchSendFailed {
                                failed: total,
                                total,
                                source: Box::new(e),
                            })?;
                    let s = sticky.fetch_add(1, Ordering::Relaxed) % n;
                    chosen.insert(r.topic.as_str(), (n, s, subjects));
                }
            }
            for (i, r) in batch.iter().enumerate() {
                let (n, sticky, subjects) = &chosen[r.topic.as_str()];
                let (n, sticky) = (*n, *sticky);
                let partition = match (r.partition, &r.key) {
                    (Some(p), _) if p < n => p,
                    (Some(p), _) => {
                        return Err(Error::BatchSendFailed {
                            failed: total - i,
                            total,
                            source: Box::new(Error::InvalidArgument(format!(
                                "partition {p} of {:?} does not exist ({n} partitions)",
                                r.topic
                            ))),
                        })
                    }
                    (None, Some(k)) => partition_for_key(k, n),
                    (None, None) => sticky,
                };
                partitions.push(partition);
                // Each unawaited ack holds one of the context's in-flight permits: a
                // batch larger than the window awaits its oldest acks as it goes, so
                // it never waits on permits it holds itself.
                if window.len() >= ACK_WINDOW {
                    if let Some((j, f)) = window.pop_front() {
                        acks[j] = Some(
                            f.await
                                .map(|a| a.sequence)
                                .map_err(|e| send_error(&batch[j].topic, e)),
                        );
                    }
                }
                let sent = self
                    .js
                    .publish_with_headers(
                        subjects[partition as usize].clone(),
                        codec::encode(r),
                        r.value.clone(),
                    )
                    .await;
                match sent {
                    Ok(f) => {
                        acks.push(None);
                        window.push_back((i, f));
                    }
                    Err(e) => {
                        return Err(Error::BatchSendFailed {
                            failed: total - i,
                            total,
                            source: Box::new(send_error(&r.topic, e)),
                        })
                    }
                }
            }
        }
        for (j, f) in window {
            acks[j] = Some(
                f.await
                    .map(|a| a.sequence)
                    .map_err(|e| send_error(&batch[j].topic, e)),
            );
        }
        let mut receipts = Vec::with_capacity(total);
        let mut first_error: Option<Error> = None;
        let mut failed = 0;
        for ((r, partition), ack) in batch.into_iter().zip(partitions).zip(acks) {
            match ack {
                Some(Ok(offset)) => receipts.push(Receipt {
                    topic: r.topic,
                    partition,
                    offset,
                    id: r.id,
                    timestamp: r.timestamp,
                }),
                Some(Err(e)) => {
                    failed += 1;
                    self.forget(&r.topic);
                    first_error.get_or_insert(e);
                }
                None => {
                    failed += 1;
                    first_error.get_or_insert_with(|| Error::SendFailed {
                        topic: r.topic.clone(),
                        source: "no acknowledgement".into(),
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

fn send_error(topic: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::SendFailed {
        topic: topic.to_string(),
        source: Box::new(e),
    }
}

/// A start for keyless rotation that differs between processes.
fn rand_start() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}
