//! The producer: validates, stamps and batches messages, then hands batches to the
//! driver (SPEC C2).
//!
//! Batching is adaptive: when the driver is idle a message is published at once (low
//! latency); while a publish is in flight, new messages accumulate and go out together
//! as the next batch (high throughput). `batchSize`/`lingerMs` are the settings of
//! backends with their own network batching (Kafka); capping Courier's own publish
//! calls at the 16 KiB default `batchSize` cost 15–30% of file:// produce throughput
//! (measured), so its calls stay bounded by `MAX_BATCH_RECORDS`/`MAX_BATCH_BYTES`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use courier_core::{now_millis, Driver, Error, Message, Receipt, Record, Result};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::compress::compress_if_large;
use crate::live::Live;
use crate::schedule::Scheduler;
use crate::stats::Registry;
use crate::trace::inject_on_send;
use crate::txn::{Half, Transactions};
use crate::validate::validate_topic;

/// Most records handed to the driver in one publish call.
const MAX_BATCH_RECORDS: usize = 8192;
/// Most bytes handed to the driver in one publish call.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Most queue slots kept allocated between bursts.
const MAX_KEPT_QUEUE: usize = 16 * 1024;

type Pending = (Record, oneshot::Sender<Result<Receipt>>, Instant);

enum Item {
    Send(Pending),
    Flush(oneshot::Sender<()>),
}

struct Queue {
    items: Vec<Item>,
    closed: bool,
}

struct Inner {
    driver: Arc<dyn Driver>,
    max_message_size: usize,
    max_buffered: usize,
    queue: Mutex<Queue>,
    wake: Notify,
    closed: AtomicBool,
    flusher: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Registry>,
    /// False when the backend compresses natively (then Courier never does).
    compress: bool,
    /// Compression threshold in force (SPEC C7: changes live).
    live: Arc<Live>,
    schedule: Option<Arc<Scheduler>>,
}

/// Sends messages. Cheap to clone; clones share one buffer and one background
/// publisher. Thread-safe.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

impl Producer {
    pub(crate) fn new(
        driver: Arc<dyn Driver>,
        max_message_size: usize,
        max_buffered: usize,
        stats: Arc<Registry>,
        schedule: Option<Arc<Scheduler>>,
        live: Arc<Live>,
    ) -> Self {
        let compress = !driver.capabilities().native_compression;
        let inner = Arc::new(Inner {
            driver,
            max_message_size,
            max_buffered: max_buffered.max(1),
            queue: Mutex::new(Queue {
                items: Vec::new(),
                closed: false,
            }),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            flusher: Mutex::new(None),
            stats,
            compress,
            live,
            schedule,
        });
        let task = tokio::spawn(run_flusher(inner.clone()));
        *inner.flusher.lock() = Some(task);
        Self { inner }
    }

    fn check(&self, msg: &Message) -> Result<()> {
        validate_topic(&msg.topic)?;
        let size = msg.encoded_len();
        if size > self.inner.max_message_size {
            return Err(Error::MessageTooLarge {
                size,
                max: self.inner.max_message_size,
            });
        }
        if is_delayed(msg) && self.inner.schedule.is_none() {
            // Never accept a delayed send that would not be honoured.
            return Err(Error::Unsupported {
                feature: "delayed delivery",
                backend: self.inner.driver.name(),
            });
        }
        Ok(())
    }

    /// The producer pipeline after validation: trace context, then compression.
    fn stamp(&self, mut msg: Message) -> Record {
        inject_on_send(&mut msg.headers);
        if self.inner.compress {
            let threshold = self.inner.live.compression_threshold();
            compress_if_large(&mut msg.value, &mut msg.headers, threshold);
        }
        Record::from_message(msg)
    }

    /// Stores `msg` as a half message: durable but invisible until
    /// [`Half::commit`]; [`Half::rollback`] discards it. Undecided past the scheduler's
    /// `check_after`, it is checked back (see [`crate::TxnChecker`]). A `deliver_at` on
    /// `msg` is ignored: a committed half is delivered at once.
    pub async fn prepare(&self, msg: Message) -> Result<Half> {
        self.check(&Message {
            deliver_at: None,
            ..msg.clone()
        })?;
        let Some(sched) = self.inner.schedule.clone() else {
            return Err(Error::Unsupported {
                feature: "transactional messages",
                backend: self.inner.driver.name(),
            });
        };
        let record = self.stamp(msg);
        let id = record.id.clone();
        let half = sched.half(record).await?;
        let receipt = self.enqueue(half).await?;
        sched.prepared(&id);
        Ok(Half {
            id,
            receipt,
            txns: Transactions { sched },
        })
    }

    /// A delayed send: stored in the schedule log, moved to its topic when due.
    fn send_delayed(&self, msg: Message, due: i64) -> SendHandle {
        let Some(sched) = self.inner.schedule.clone() else {
            return SendHandle::ready(Err(Error::Unsupported {
                feature: "delayed delivery",
                backend: self.inner.driver.name(),
            }));
        };
        let record = self.stamp(msg);
        if let Some(started) = sched.started() {
            // The common case once the member runs: wrapped in place, no task per send.
            return self.enqueue(started.delayed(record, due));
        }
        let this = self.clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let res = match sched.delayed(record, due).await {
                Ok(r) => this.enqueue(r).await,
                Err(e) => Err(e),
            };
            let _ = tx.send(res);
        });
        SendHandle::pending(rx)
    }

    /// Queues `msg` and returns at once. Await the handle for the receipt (the seeds'
    /// `SendSync`), or pass a callback with [`SendHandle::on_complete`] (the seeds'
    /// async `Send`). Invalid input fails the handle immediately; nothing is queued.
    /// A `deliver_at` in the future stores the message in the schedule log; it becomes
    /// visible, with the same id, when due (docs/delay-and-transactions.md).
    pub fn send(&self, msg: Message) -> SendHandle {
        if let Err(e) = self.check(&msg) {
            return SendHandle::ready(Err(e));
        }
        if let Some(due) = msg.deliver_at.filter(|_| is_delayed(&msg)) {
            return self.send_delayed(msg, due);
        }
        self.enqueue(self.stamp(msg))
    }

    /// Queues a checked record.
    fn enqueue(&self, record: Record) -> SendHandle {
        let (tx, rx) = oneshot::channel();
        let mut q = self.inner.queue.lock();
        if q.closed {
            return SendHandle::ready(Err(Error::ProducerClosed));
        }
        if q.items.len() >= self.inner.max_buffered {
            return SendHandle::ready(Err(Error::QueueFull(q.items.len())));
        }
        q.items.push(Item::Send((record, tx, Instant::now())));
        let first = q.items.len() == 1;
        drop(q);
        if first {
            self.inner.wake.notify_one();
        }
        SendHandle::pending(rx)
    }

    /// Sends all of `msgs` and waits for every receipt. Every message is validated
    /// before any is queued. On failure, [`Error::BatchSendFailed`] says how many were
    /// not stored.
    pub async fn send_batch(&self, msgs: Vec<Message>) -> Result<Vec<Receipt>> {
        for m in &msgs {
            self.check(m)?;
        }
        let total = msgs.len();
        let records: Vec<Record> = if msgs.iter().any(is_delayed) {
            let Some(sched) = self.inner.schedule.clone() else {
                return Err(Error::Unsupported {
                    feature: "delayed delivery",
                    backend: self.inner.driver.name(),
                });
            };
            // One queue push for the whole batch: delayed ones wrapped for the
            // schedule log, the rest as they are.
            let started = sched.ensure_started().await?;
            msgs.into_iter()
                .map(|m| match m.deliver_at.filter(|_| is_delayed(&m)) {
                    Some(due) => started.delayed(self.stamp(m), due),
                    None => self.stamp(m),
                })
                .collect()
        } else {
            msgs.into_iter().map(|m| self.stamp(m)).collect()
        };
        let mut rxs = Vec::with_capacity(total);
        let now = Instant::now();
        {
            let mut q = self.inner.queue.lock();
            if q.closed {
                return Err(Error::ProducerClosed);
            }
            for r in records {
                let (tx, rx) = oneshot::channel();
                q.items.push(Item::Send((r, tx, now)));
                rxs.push(rx);
            }
        }
        self.inner.wake.notify_one();
        let mut receipts = Vec::with_capacity(total);
        let mut failed = 0;
        let mut first_err = None;
        for rx in rxs {
            match rx.await.unwrap_or(Err(Error::ProducerClosed)) {
                Ok(r) => receipts.push(r),
                Err(e) => {
                    failed += 1;
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => Ok(receipts),
            Some(e) => Err(Error::BatchSendFailed {
                failed,
                total,
                source: Box::new(e),
            }),
        }
    }

    /// Waits until every message queued before this call is stored or failed.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.inner.queue.lock();
            if q.closed && q.items.is_empty() {
                return Ok(());
            }
            q.items.push(Item::Flush(tx));
        }
        self.inner.wake.notify_one();
        let _ = rx.await;
        Ok(())
    }

    /// Delivers everything buffered, then refuses further sends. Idempotent; shared
    /// by all clones.
    pub async fn close(&self) -> Result<()> {
        self.inner.queue.lock().closed = true;
        self.inner.closed.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        let task = self.inner.flusher.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }

    /// True after [`Producer::close`].
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

/// True when `msg` asks for a due time still in the future (a past one sends now).
fn is_delayed(msg: &Message) -> bool {
    msg.deliver_at.is_some_and(|at| at > now_millis())
}

async fn run_flusher(inner: Arc<Inner>) {
    let in_flight = inner.driver.capabilities().max_in_flight_publishes.max(1);
    let permits = Arc::new(Semaphore::new(in_flight));
    // The buffer the last burst was drained from, handed back to the queue for the
    // next one: allocating a fresh multi-megabyte buffer per burst cost page faults on
    // every send at high rates.
    let mut spare: Vec<Item> = Vec::new();
    loop {
        let notified = inner.wake.notified();
        let items = {
            let mut q = inner.queue.lock();
            if q.items.is_empty() {
                if q.closed {
                    break;
                }
                None
            } else {
                Some(std::mem::replace(&mut q.items, std::mem::take(&mut spare)))
            }
        };
        let Some(mut items) = items else {
            notified.await;
            continue;
        };
        let mut left = items.len();
        let mut batch: Vec<Pending> = batch_for(left);
        let mut bytes = 0;
        for item in items.drain(..) {
            left -= 1;
            match item {
                Item::Send(p) => {
                    let size = p.0.value.len() + p.0.key.as_ref().map_or(0, |k| k.len());
                    if !batch.is_empty() && bytes + size > MAX_BATCH_BYTES {
                        dispatch_full(&inner, &permits, &mut batch, left + 1).await;
                        bytes = 0;
                    }
                    bytes += size;
                    batch.push(p);
                    if batch.len() >= MAX_BATCH_RECORDS || bytes >= MAX_BATCH_BYTES {
                        dispatch_full(&inner, &permits, &mut batch, left).await;
                        bytes = 0;
                    }
                }
                Item::Flush(done) => {
                    if !batch.is_empty() {
                        dispatch_full(&inner, &permits, &mut batch, left).await;
                        bytes = 0;
                    }
                    // All permits back = nothing in flight.
                    let all = permits.acquire_many(in_flight as u32).await;
                    drop(all);
                    let _ = done.send(());
                }
            }
        }
        if !batch.is_empty() {
            dispatch(&inner, &permits, batch).await;
        }
        // Kept for the next burst, but not a huge one forever.
        items.shrink_to(MAX_KEPT_QUEUE);
        spare = items;
    }
    let all = permits.acquire_many(in_flight as u32).await;
    drop(all);
}

/// Publishes one batch, in the background when the driver allows several in flight.
/// An empty batch sized for the `left` items still to come (at most one publish call).
fn batch_for(left: usize) -> Vec<Pending> {
    Vec::with_capacity(left.min(MAX_BATCH_RECORDS))
}

/// Dispatches `batch` and leaves a fresh one sized for the `left` items still to come.
async fn dispatch_full(
    inner: &Arc<Inner>,
    permits: &Arc<Semaphore>,
    batch: &mut Vec<Pending>,
    left: usize,
) {
    let full = std::mem::replace(batch, batch_for(left));
    dispatch(inner, permits, full).await;
}

async fn dispatch(inner: &Arc<Inner>, permits: &Arc<Semaphore>, batch: Vec<Pending>) {
    let Ok(permit) = permits.clone().acquire_owned().await else {
        return;
    };
    let driver = inner.driver.clone();
    let stats = inner.stats.clone();
    let job = async move {
        let mut records = Vec::with_capacity(batch.len());
        let mut txs = Vec::with_capacity(batch.len());
        let mut started = Vec::with_capacity(batch.len());
        for (r, tx, at) in batch {
            records.push(r);
            txs.push(tx);
            started.push(at);
        }
        let topics = TopicRuns::of(&records);
        match driver.publish(records).await {
            Ok(receipts) if receipts.len() == txs.len() => {
                let done = Instant::now();
                let mut counters: Option<Arc<crate::stats::Counters>> = None;
                let mut run = 0u64;
                for ((tx, r), at) in txs.into_iter().zip(receipts).zip(started) {
                    // One registry lookup per run of one topic, not per message.
                    if counters.as_ref().is_none_or(|c| **c.topic() != *r.topic) {
                        if let Some(prev) = &counters {
                            prev.sent(run);
                        }
                        run = 0;
                        counters = Some(stats.counters(&r.topic, None));
                    }
                    if let Some(c) = &counters {
                        c.send_latency(done.saturating_duration_since(at));
                    }
                    run += 1;
                    let _ = tx.send(Ok(r));
                }
                if let Some(c) = counters {
                    c.sent(run);
                }
            }
            Ok(receipts) => {
                let e = Error::backend(
                    driver.name(),
                    format!(
                        "driver returned {} receipts for {} records",
                        receipts.len(),
                        txs.len()
                    ),
                );
                topics.fail(&stats, txs, e);
            }
            Err(e) => {
                tracing::warn!(error = %e, "publish failed");
                topics.fail(&stats, txs, e);
            }
        }
        drop(permit);
    };
    if inner.driver.capabilities().max_in_flight_publishes <= 1 {
        job.await;
    } else {
        // Polled once here, in dispatch order, so the driver takes its place in line
        // (e.g. enqueues into its client) before a later batch can overtake it: spawned
        // tasks run in no fixed order, which would break per-key order.
        let mut job = Box::pin(job);
        if futures::poll!(&mut job).is_pending() {
            tokio::spawn(job);
        }
    }
}

/// The topics of a batch as runs `(first index, topic)`, kept so failures can name
/// each message's topic without cloning a string per message on the happy path.
struct TopicRuns(Vec<(usize, String)>);

impl TopicRuns {
    fn of(records: &[Record]) -> Self {
        let mut runs: Vec<(usize, String)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if runs.last().is_none_or(|(_, t)| *t != r.topic) {
                runs.push((i, r.topic.clone()));
            }
        }
        Self(runs)
    }

    /// Fails every message of the batch with the batch's one error, shared (not turned
    /// into text) so each caller can still match on its type via [`Error::root_cause`].
    fn fail(&self, stats: &Registry, txs: Vec<oneshot::Sender<Result<Receipt>>>, e: Error) {
        let shared = Arc::new(e);
        let total = txs.len();
        for (n, (start, topic)) in self.0.iter().enumerate() {
            let end = self.0.get(n + 1).map_or(total, |(s, _)| *s);
            stats.counters(topic, None).send_error((end - start) as u64);
        }
        for (i, tx) in txs.into_iter().enumerate() {
            let run = self
                .0
                .partition_point(|(start, _)| *start <= i)
                .saturating_sub(1);
            let topic = self.0.get(run).map(|(_, t)| t.clone()).unwrap_or_default();
            let _ = tx.send(Err(Error::SendFailed {
                topic,
                source: Box::new(shared.clone()),
            }));
        }
    }
}

/// The pending result of one send. Await it for the [`Receipt`], or hand it a callback.
#[must_use = "a send is only confirmed by awaiting the handle or registering a callback"]
pub struct SendHandle {
    state: HandleState,
}

enum HandleState {
    Ready(Option<Result<Receipt>>),
    Pending(oneshot::Receiver<Result<Receipt>>),
}

impl SendHandle {
    fn ready(r: Result<Receipt>) -> Self {
        Self {
            state: HandleState::Ready(Some(r)),
        }
    }

    fn pending(rx: oneshot::Receiver<Result<Receipt>>) -> Self {
        Self {
            state: HandleState::Pending(rx),
        }
    }

    /// Calls `f` with the result once the send completes (the seeds' async `Send`
    /// with callback). Must be called inside a Tokio runtime.
    pub fn on_complete<F>(self, f: F)
    where
        F: FnOnce(Result<Receipt>) + Send + 'static,
    {
        tokio::spawn(async move { f(self.await) });
    }
}

impl Future for SendHandle {
    type Output = Result<Receipt>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            HandleState::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(Error::ProducerClosed))),
            HandleState::Pending(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(Error::ProducerClosed))),
        }
    }
}
