//! One group member: a dedicated thread polls librdkafka (so rebalance callbacks may
//! block while handlers finish), Courier tracks acknowledgements and commits only the
//! handled prefix of each partition.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use courier_core::{
    AckHandle, AckToken, Acker, Delivery, Error, Headers, OffsetReset, Result, SubscribeSpec,
    Subscription, TopicPartition, HEADER_MESSAGE_ID,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::mpsc;

use crate::offsets;
use crate::BACKEND;

/// Messages polled from librdkafka per batch handed to the runtime.
const POLL_BATCH: usize = 512;
/// How long one poll waits; bounds the latency of nack rewinds and timed commits.
const POLL_WAIT: Duration = Duration::from_millis(20);

type Tp = (Arc<str>, i32);

/// A nack's rewind: the partition is paused, then sought back to `offset` when due.
struct Rewind {
    offset: i64,
    due: Instant,
    paused: bool,
    sought: bool,
}

/// Ack bookkeeping of one owned partition.
struct Part {
    epoch: u64,
    /// Next offset expected from librdkafka (`None` until the first message).
    next: Option<i64>,
    /// Delivered and not yet settled: offset → epoch of that delivery.
    outstanding: BTreeMap<i64, u64>,
    /// Last committed position.
    committed: i64,
    rewind: Option<Rewind>,
    /// Delivery counts of nacked offsets.
    attempts: HashMap<i64, u32>,
}

impl Part {
    /// Everything below this is handled (the contiguous prefix).
    fn committable(&self) -> Option<i64> {
        match self.outstanding.keys().next() {
            Some(first) => Some(*first),
            None => self.next,
        }
    }
}

/// State shared by the poll thread, the subscription and the ack handles.
pub(crate) struct Shared {
    parts: Mutex<HashMap<Tp, Part>>,
    /// Signalled on every settle, for revocations waiting on in-flight handlers.
    settled: Condvar,
    epochs: AtomicU64,
    assignment: Mutex<Vec<TopicPartition>>,
    closed: AtomicBool,
    events: mpsc::Sender<Event>,
    /// Bound on waiting for in-flight handlers of revoked partitions.
    revoke_timeout: Duration,
    reset: OffsetReset,
    /// librdkafka settings, for the end-of-partition lookups of `latest`.
    lookup_config: ClientConfig,
}

impl Shared {
    fn parts(&self) -> MutexGuard<'_, HashMap<Tp, Part>> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Ordering::Relaxed)
    }
}

impl Acker for Shared {
    fn ack(&self, token: AckToken) {
        let mut parts = self.parts();
        if let Some(p) = parts.get_mut(&(token.topic.clone(), token.partition as i32)) {
            if p.outstanding.get(&(token.offset as i64)) == Some(&token.epoch) {
                p.outstanding.remove(&(token.offset as i64));
                if !p.attempts.is_empty() {
                    p.attempts.remove(&(token.offset as i64));
                }
            }
        }
        drop(parts);
        self.settled.notify_all();
    }

    fn nack(&self, token: AckToken, redeliver_after: Duration) {
        let mut parts = self.parts();
        let offset = token.offset as i64;
        if let Some(p) = parts.get_mut(&(token.topic.clone(), token.partition as i32)) {
            if p.outstanding.get(&offset) == Some(&token.epoch) {
                // Everything from the nacked offset on is fetched again; deliveries of
                // the old epoch still queued are stale.
                p.epoch = self.new_epoch();
                p.outstanding.retain(|o, _| *o < offset);
                p.next = Some(offset);
                *p.attempts.entry(offset).or_insert(1) += 1;
                p.rewind = Some(Rewind {
                    offset,
                    due: Instant::now() + redeliver_after,
                    paused: false,
                    sought: false,
                });
            }
        }
        drop(parts);
        self.settled.notify_all();
    }

    fn is_stale(&self, token: &AckToken) -> bool {
        let parts = self.parts();
        parts
            .get(&(token.topic.clone(), token.partition as i32))
            .and_then(|p| p.outstanding.get(&(token.offset as i64)))
            != Some(&token.epoch)
    }
}

pub(crate) enum Event {
    Batch(Vec<Delivery>),
    Assigned,
}

/// The consumer context: rebalance handling on the poll thread.
pub(crate) struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.start_positions(consumer, tpl);
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
                self.assigned(tpl);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(consumer, tpl);
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => tracing::warn!(error = ?other, "rebalance error"),
        }
    }
}

impl Context {
    /// Partitions the group never committed start at the reset position. `latest` is
    /// resolved here by reading the partition's last batch, so it is exact even on
    /// brokers whose ListOffsets(latest) is not (tansu).
    fn start_positions(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        if self.shared.reset != OffsetReset::Latest {
            return;
        }
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "committed offsets lookup failed");
                return;
            }
        };
        for e in committed.elements() {
            if let Offset::Offset(_) = e.offset() {
                continue;
            }
            match offsets::true_end(&self.shared.lookup_config, e.topic(), e.partition()) {
                Ok(end) => {
                    let _ = tpl.set_partition_offset(e.topic(), e.partition(), Offset::Offset(end));
                }
                Err(err) => tracing::warn!(error = %err, topic = e.topic(), "end lookup failed"),
            }
        }
    }

    fn assigned(&self, tpl: &TopicPartitionList) {
        let mut list = Vec::new();
        {
            let mut parts = self.shared.parts();
            for e in tpl.elements() {
                let key: Tp = (Arc::from(e.topic()), e.partition());
                parts.entry(key).or_insert_with(|| Part {
                    epoch: self.shared.new_epoch(),
                    next: None,
                    outstanding: BTreeMap::new(),
                    committed: -1,
                    rewind: None,
                    attempts: HashMap::new(),
                });
                list.push(TopicPartition::new(e.topic(), e.partition().max(0) as u32));
            }
        }
        list.sort();
        *self
            .shared
            .assignment
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = list;
        let _ = self.shared.events.try_send(Event::Assigned);
    }

    /// In-flight deliveries of revoked partitions finish and are committed before the
    /// partitions are given up (bounded by the revoke timeout).
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let revoked: Vec<Tp> = tpl
            .elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect();
        let deadline = Instant::now() + self.shared.revoke_timeout;
        let mut parts = self.shared.parts();
        loop {
            let busy = revoked
                .iter()
                .any(|tp| parts.get(tp).is_some_and(|p| !p.outstanding.is_empty()));
            let now = Instant::now();
            if !busy || now >= deadline {
                if busy {
                    tracing::warn!("revoke timeout: handlers still running; uncommitted messages will be redelivered");
                }
                break;
            }
            parts = match self.shared.settled.wait_timeout(parts, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        let positions = commit_list(&mut parts, Some(&revoked));
        for tp in &revoked {
            parts.remove(tp);
        }
        drop(parts);
        if let Some(tpl) = positions {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on revoke failed");
            }
        }
        self.shared
            .assignment
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|tp| {
                !revoked
                    .iter()
                    .any(|(t, p)| **t == *tp.topic && *p == tp.partition as i32)
            });
        let _ = self.shared.events.try_send(Event::Assigned);
    }
}

/// Positions to commit (only `only`'s when given) and marks them committed.
fn commit_list(parts: &mut HashMap<Tp, Part>, only: Option<&[Tp]>) -> Option<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (tp, p) in parts.iter_mut() {
        if only.is_some_and(|o| !o.contains(tp)) {
            continue;
        }
        let Some(pos) = p.committable().filter(|pos| *pos > p.committed) else {
            continue;
        };
        if tpl
            .add_partition_offset(&tp.0, tp.1, Offset::Offset(pos))
            .is_ok()
        {
            p.committed = pos;
        }
    }
    (tpl.count() > 0).then_some(tpl)
}

/// A live group membership on Kafka.
pub(crate) struct KafkaSubscription {
    shared: Arc<Shared>,
    events: mpsc::Receiver<Event>,
    thread: Option<JoinHandle<()>>,
    reported: Vec<TopicPartition>,
}

impl KafkaSubscription {
    pub(crate) fn start(
        config: ClientConfig,
        lookup_config: ClientConfig,
        spec: SubscribeSpec,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel((spec.prefetch / POLL_BATCH).clamp(2, 64));
        let shared = Arc::new(Shared {
            parts: Mutex::new(HashMap::new()),
            settled: Condvar::new(),
            epochs: AtomicU64::new(1),
            assignment: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            events: tx,
            revoke_timeout: spec.session_timeout.max(Duration::from_secs(5)),
            reset: spec.auto_offset_reset,
            lookup_config,
        });
        let consumer: BaseConsumer<Context> = config
            .create_with_context(Context {
                shared: shared.clone(),
            })
            .map_err(|e| Error::connection(BACKEND, e))?;
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| Error::backend(BACKEND, e))?;
        let s = shared.clone();
        let interval = spec.commit_interval;
        let thread = std::thread::Builder::new()
            .name(format!("courier-kafka-{}", spec.group))
            .spawn(move || poll_loop(consumer, s, interval))
            .map_err(Error::Io)?;
        Ok(Self {
            shared,
            events: rx,
            thread: Some(thread),
            reported: Vec::new(),
        })
    }
}

fn poll_loop(consumer: BaseConsumer<Context>, shared: Arc<Shared>, interval: Duration) {
    let acker: Arc<dyn Acker> = shared.clone();
    let mut last_commit = Instant::now();
    while !shared.closed.load(Ordering::Acquire) {
        apply_rewinds(&consumer, &shared);
        if last_commit.elapsed() >= interval {
            commit(&consumer, &shared, CommitMode::Async);
            last_commit = Instant::now();
        }
        let mut batch = Vec::new();
        let mut wait = POLL_WAIT;
        while batch.len() < POLL_BATCH {
            match consumer.poll(wait) {
                None => break,
                Some(Ok(m)) => {
                    if let Some(d) = accept(&shared, &acker, &m) {
                        batch.push(d);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        if !batch.is_empty() && shared.events.blocking_send(Event::Batch(batch)).is_err() {
            break;
        }
    }
    commit(&consumer, &shared, CommitMode::Sync);
    // Dropping the consumer leaves the group (revoke callback, then close).
    drop(consumer);
}

fn commit(consumer: &BaseConsumer<Context>, shared: &Shared, mode: CommitMode) {
    let tpl = commit_list(&mut shared.parts(), None);
    if let Some(tpl) = tpl {
        if let Err(e) = consumer.commit(&tpl, mode) {
            tracing::warn!(error = %e, "commit failed");
        }
    }
}

/// Pauses nacked partitions and seeks them back once their delay is over.
fn apply_rewinds(consumer: &BaseConsumer<Context>, shared: &Shared) {
    let now = Instant::now();
    let mut to_pause = TopicPartitionList::new();
    let mut to_seek = Vec::new();
    {
        let mut parts = shared.parts();
        for (tp, p) in parts.iter_mut() {
            let Some(r) = p.rewind.as_mut() else {
                continue;
            };
            if !r.paused {
                r.paused = true;
                let _ = to_pause.add_partition(&tp.0, tp.1);
            }
            if !r.sought && r.due <= now {
                r.sought = true;
                to_seek.push((tp.clone(), r.offset));
            }
        }
    }
    if to_pause.count() > 0 {
        if let Err(e) = consumer.pause(&to_pause) {
            tracing::warn!(error = %e, "pause failed");
        }
    }
    for ((topic, partition), offset) in to_seek {
        let tpl = single(&topic, partition, Some(offset));
        // The seek is applied to a paused partition; resuming then fetches from it.
        if let Err(e) = seek(consumer, &topic, partition, offset) {
            tracing::warn!(error = %e, %topic, partition, "seek failed");
        }
        if let Err(e) = consumer.resume(&tpl) {
            tracing::warn!(error = %e, "resume failed");
        }
    }
}

fn seek(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> KafkaResult<()> {
    consumer.seek(
        topic,
        partition,
        Offset::Offset(offset),
        Duration::from_secs(5),
    )
}

fn single(topic: &str, partition: i32, offset: Option<i64>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    match offset {
        Some(o) => {
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(o));
        }
        None => {
            tpl.add_partition(topic, partition);
        }
    }
    tpl
}

/// Turns a polled message into a delivery, unless it was fetched before a rewind.
fn accept(shared: &Shared, acker: &Arc<dyn Acker>, m: &BorrowedMessage<'_>) -> Option<Delivery> {
    let offset = m.offset();
    let mut parts = shared.parts();
    let probe: Tp = (Arc::from(m.topic()), m.partition());
    let (key, _) = parts.get_key_value(&probe)?;
    let topic = key.0.clone();
    let part = parts.get_mut(&probe)?;
    if let Some(r) = &part.rewind {
        // Prefetched before the seek: the partition is read again from `r.offset`.
        if !r.sought || offset != r.offset {
            return None;
        }
        part.rewind = None;
    } else if part.next.is_some_and(|n| offset < n) {
        return None;
    }
    part.next = Some(offset + 1);
    part.outstanding.insert(offset, part.epoch);
    let epoch = part.epoch;
    let attempt = part.attempts.get(&offset).copied().unwrap_or(1);
    drop(parts);

    let mut headers = Headers::new();
    let mut id = String::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            let value = h.value.map(Bytes::copy_from_slice).unwrap_or_default();
            if h.key == HEADER_MESSAGE_ID {
                id = String::from_utf8_lossy(&value).into_owned();
            } else {
                headers.insert(h.key, value);
            }
        }
    }
    let token = AckToken {
        topic: topic.clone(),
        partition: m.partition().max(0) as u32,
        offset: offset.max(0) as u64,
        epoch,
        extra: None,
    };
    Some(Delivery::new(
        topic,
        m.partition().max(0) as u32,
        offset.max(0) as u64,
        m.key().map(Bytes::copy_from_slice),
        m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        headers,
        id,
        m.timestamp().to_millis().unwrap_or(0),
        attempt,
        Some(AckHandle::new(acker.clone(), token)),
    ))
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Delivery>>> {
        let _ = max;
        loop {
            let now = self.assignment();
            if now != self.reported {
                self.reported = now;
                return Ok(Some(Vec::new()));
            }
            match self.events.recv().await {
                Some(Event::Batch(b)) => return Ok(Some(b)),
                Some(Event::Assigned) => continue,
                None => return Ok(None),
            }
        }
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.shared
            .assignment
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn close(&mut self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        // Deliveries never handed to a handler are dropped, which nacks them, so the
        // revocation on leave does not wait for them.
        self.events.close();
        while self.events.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            tokio::task::spawn_blocking(move || t.join())
                .await
                .map_err(|e| Error::backend(BACKEND, e))?
                .map_err(|_| Error::backend(BACKEND, "consumer thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.events.close();
    }
}
