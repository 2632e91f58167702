//! One group member over a [`LogStore`]: fetches from owned partitions, tracks acks,
//! commits contiguous prefixes and hands partitions over on rebalance.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use courier_core::{
    AckHandle, AckToken, Acker, Delivery, OffsetReset, Result, SubscribeSpec, Subscription,
    TopicPartition,
};
use futures::future::{select_all, BoxFuture, FutureExt};
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::driver::Shared;
use crate::group::{Group, MemberId};
use crate::store::{LogStore, PartitionLog};

/// Ack bookkeeping of one owned partition.
struct Cursor {
    /// Next offset to read from the log.
    next_fetch: u64,
    /// First delivered offset not yet acknowledged: everything below is committable.
    settled_upto: u64,
    /// What was last written to the offset store.
    committed: u64,
    /// Acknowledged offsets above `settled_upto` (out-of-order acks).
    acked_ahead: BTreeSet<u64>,
    /// Bumped on every rewind; deliveries of older epochs are stale.
    epoch: u64,
    /// A nack paused fetching until then.
    paused_until: Option<Instant>,
    /// Redelivery counts of nacked offsets.
    attempts: HashMap<u64, u32>,
    /// The partition was handed over: every delivery of it is stale.
    released: bool,
}

/// The settle state of one owned partition, and the acker of its deliveries. Acks
/// and staleness checks lock only their own partition: one cursor map under one
/// lock for the whole member was looked up (and hashed) twice per message and
/// contended across the partition workers.
pub(crate) struct PartAcks {
    cursor: Mutex<Cursor>,
    signals: Arc<Signals>,
}

/// Wake-ups shared by a member's partitions.
pub(crate) struct Signals {
    /// Woken on every settle while a partition is being handed over, and on nack.
    settled: Notify,
    revoking: AtomicUsize,
}

impl PartAcks {
    /// The cursor, when `token` belongs to its current epoch of an owned partition.
    fn live(&self, token: &AckToken) -> Option<parking_lot::MutexGuard<'_, Cursor>> {
        let c = self.cursor.lock();
        (c.epoch == token.epoch && !c.released).then_some(c)
    }
}

impl Acker for PartAcks {
    fn ack(&self, token: AckToken) {
        if let Some(mut guard) = self.live(&token) {
            let c = &mut *guard;
            if token.offset == c.settled_upto {
                c.settled_upto += 1;
                while c.acked_ahead.remove(&c.settled_upto) {
                    c.settled_upto += 1;
                }
            } else if token.offset > c.settled_upto {
                c.acked_ahead.insert(token.offset);
            }
            if !c.attempts.is_empty() {
                c.attempts.remove(&token.offset);
            }
        }
        if self.signals.revoking.load(Ordering::Acquire) > 0 {
            self.signals.settled.notify_waiters();
        }
    }

    fn nack(&self, token: AckToken, redeliver_after: Duration) {
        if let Some(mut guard) = self.live(&token) {
            let c = &mut *guard;
            c.epoch += 1;
            c.next_fetch = token.offset;
            c.acked_ahead.retain(|o| *o < token.offset);
            c.paused_until = Some(Instant::now() + redeliver_after);
            *c.attempts.entry(token.offset).or_insert(1) += 1;
        }
        self.signals.settled.notify_waiters();
    }

    fn is_stale(&self, token: &AckToken) -> bool {
        self.live(token).is_none()
    }
}

struct Owned<P> {
    tp: TopicPartition,
    topic: Arc<str>,
    log: Arc<P>,
    acks: Arc<PartAcks>,
}

/// A live member of a group.
pub(crate) struct LocalSubscription<S: LogStore> {
    shared: Arc<Shared<S>>,
    group: Arc<Group>,
    member: MemberId,
    spec: SubscribeSpec,
    assignment: watch::Receiver<Vec<TopicPartition>>,
    signals: Arc<Signals>,
    owned: Vec<Owned<S::Partition>>,
    pending: Vec<TopicPartition>,
    last_commit: Instant,
    rotate: usize,
    /// Assignment last reported to the caller (an empty batch reports a change).
    reported: Vec<TopicPartition>,
    closed: Arc<AtomicBool>,
}

impl<S: LogStore> LocalSubscription<S> {
    pub(crate) fn new(
        shared: Arc<Shared<S>>,
        group: Arc<Group>,
        member: MemberId,
        assignment: watch::Receiver<Vec<TopicPartition>>,
        spec: SubscribeSpec,
    ) -> Self {
        Self {
            shared,
            group,
            member,
            spec,
            assignment,
            signals: Arc::new(Signals {
                settled: Notify::new(),
                revoking: AtomicUsize::new(0),
            }),
            owned: Vec::new(),
            pending: Vec::new(),
            last_commit: Instant::now(),
            rotate: 0,
            reported: Vec::new(),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Applies a new assignment: revoked partitions are drained, committed and
    /// released; new ones wait to be acquired.
    async fn apply_assignment(&mut self) -> Result<()> {
        let target: Vec<TopicPartition> = self.assignment.borrow_and_update().clone();
        let revoked: Vec<TopicPartition> = self
            .owned
            .iter()
            .map(|o| o.tp.clone())
            .filter(|tp| !target.contains(tp))
            .collect();
        self.pending.retain(|tp| target.contains(tp));
        for tp in &target {
            if !self.owned.iter().any(|o| &o.tp == tp) && !self.pending.contains(tp) {
                self.pending.push(tp.clone());
            }
        }
        if !revoked.is_empty() {
            self.revoke(&revoked).await?;
        }
        Ok(())
    }

    async fn revoke(&mut self, revoked: &[TopicPartition]) -> Result<()> {
        self.signals.revoking.fetch_add(1, Ordering::AcqRel);
        // In-flight deliveries of a revoked partition are finished by the handlers
        // before the partition moves, so a clean rebalance processes nothing twice.
        let deadline = Instant::now() + self.spec.session_timeout;
        loop {
            let notified = self.signals.settled.notified();
            let drained = self
                .owned
                .iter()
                .filter(|o| revoked.contains(&o.tp))
                .all(|o| {
                    let c = o.acks.cursor.lock();
                    c.settled_upto >= c.next_fetch
                });
            if drained || Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        self.signals.revoking.fetch_sub(1, Ordering::AcqRel);
        self.commit(Some(revoked)).await?;
        for o in self.owned.iter().filter(|o| revoked.contains(&o.tp)) {
            o.acks.cursor.lock().released = true;
        }
        self.owned.retain(|o| !revoked.contains(&o.tp));
        for tp in revoked {
            self.group.release(self.member, tp);
        }
        Ok(())
    }

    /// Takes over pending partitions whose previous owner has let go.
    async fn acquire_pending(&mut self) -> Result<()> {
        let mut still = Vec::new();
        for tp in std::mem::take(&mut self.pending) {
            let Some(topic) = self.shared.store.topic(&tp.topic) else {
                continue;
            };
            let Some(log) = topic.partitions.get(tp.partition as usize).cloned() else {
                continue;
            };
            if !self.group.try_acquire(self.member, &tp) {
                still.push(tp);
                continue;
            }
            let start = match self.shared.store.committed(&self.spec.group, &tp).await? {
                Some(o) => o.max(log.start_offset()),
                None => match self.spec.auto_offset_reset {
                    OffsetReset::Earliest => log.start_offset(),
                    OffsetReset::Latest => log.end_offset(),
                },
            };
            let topic: Arc<str> = Arc::from(tp.topic.as_str());
            let acks = Arc::new(PartAcks {
                cursor: Mutex::new(Cursor {
                    next_fetch: start,
                    settled_upto: start,
                    committed: start,
                    acked_ahead: BTreeSet::new(),
                    epoch: 0,
                    paused_until: None,
                    attempts: HashMap::new(),
                    released: false,
                }),
                signals: self.signals.clone(),
            });
            self.owned.push(Owned {
                topic,
                tp,
                log,
                acks,
            });
        }
        self.pending = still;
        Ok(())
    }

    /// Writes settled positions that moved (only `only`'s, when given).
    async fn commit(&mut self, only: Option<&[TopicPartition]>) -> Result<()> {
        let (updates, acks): (Vec<(TopicPartition, u64)>, Vec<&Arc<PartAcks>>) = self
            .owned
            .iter()
            .filter(|o| only.is_none_or(|only| only.contains(&o.tp)))
            .filter_map(|o| {
                let c = o.acks.cursor.lock();
                (c.settled_upto > c.committed).then(|| ((o.tp.clone(), c.settled_upto), &o.acks))
            })
            .unzip();
        self.last_commit = Instant::now();
        if updates.is_empty() {
            return Ok(());
        }
        self.shared
            .store
            .commit_offsets(&self.spec.group, &updates)
            .await?;
        for ((_, offset), part) in updates.iter().zip(acks) {
            let mut c = part.cursor.lock();
            c.committed = c.committed.max(*offset);
        }
        Ok(())
    }

    /// Reads what is available from owned partitions, fairly rotated.
    async fn fetch(&mut self, max: usize) -> Result<(Vec<Delivery>, Option<Instant>)> {
        let mut out = Vec::new();
        let mut wake_at: Option<Instant> = None;
        let n = self.owned.len();
        if n == 0 {
            return Ok((out, None));
        }
        self.rotate = (self.rotate + 1) % n;
        let now = Instant::now();
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let o = &self.owned[(self.rotate + i) % n];
            let (from, epoch) = {
                let mut c = o.acks.cursor.lock();
                if let Some(until) = c.paused_until {
                    if until > now {
                        wake_at = Some(wake_at.map_or(until, |w| w.min(until)));
                        continue;
                    }
                    c.paused_until = None;
                }
                (c.next_fetch, c.epoch)
            };
            if from >= o.log.end_offset() {
                continue;
            }
            let records = o.log.read(from, max - out.len()).await?;
            let Some(last) = records.last() else {
                continue;
            };
            let next = last.offset + 1;
            let attempts = {
                let mut c = o.acks.cursor.lock();
                if c.epoch != epoch {
                    continue; // nacked meanwhile: re-read from the rewound position
                }
                c.next_fetch = next;
                // Retention may have deleted what the group had not read yet: the
                // gap [from, first) is settled. Deliveries before `from` may still be
                // in flight, so only jump the settled prefix when it reached `from`.
                let first = records[0].offset;
                if first > from {
                    if c.settled_upto >= from {
                        c.settled_upto = c.settled_upto.max(first);
                    } else {
                        c.acked_ahead.extend(from..first);
                    }
                }
                records
                    .iter()
                    .map(|r| c.attempts.get(&r.offset).copied().unwrap_or(1))
                    .collect::<Vec<_>>()
            };
            let acker: Arc<dyn Acker> = o.acks.clone();
            for (r, attempt) in records.into_iter().zip(attempts) {
                let token = AckToken {
                    topic: o.topic.clone(),
                    partition: o.tp.partition,
                    offset: r.offset,
                    epoch,
                    extra: None,
                };
                out.push(Delivery::new(
                    o.topic.clone(),
                    o.tp.partition,
                    r.offset,
                    r.key,
                    r.value,
                    r.headers,
                    r.id,
                    r.timestamp,
                    attempt,
                    Some(AckHandle::new(acker.clone(), token)),
                ));
            }
        }
        Ok((out, wake_at))
    }
}

#[async_trait]
impl<S: LogStore> Subscription for LocalSubscription<S> {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Delivery>>> {
        let max = max.max(1);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Ok(None);
            }
            if self.assignment.has_changed().unwrap_or(false) {
                self.apply_assignment().await?;
            }
            if !self.pending.is_empty() {
                self.acquire_pending().await?;
            }
            let commit_due = self.last_commit + self.spec.commit_interval;
            if Instant::now() >= commit_due {
                self.commit(None).await?;
            }
            let (batch, wake_at) = self.fetch(max).await?;
            let owned = self.assignment();
            if !batch.is_empty() || owned != self.reported {
                self.reported = owned;
                return Ok(Some(batch));
            }
            // Nothing to read: sleep until new data, an assignment change, a release
            // of a partition we wait for, a nack's pause ending, or the commit timer.
            let mut waits: Vec<BoxFuture<'static, ()>> = Vec::new();
            let mut readable = false;
            let now = Instant::now();
            for o in &self.owned {
                let mut rx = o.log.watch_end();
                let seen = *rx.borrow_and_update();
                let (from, paused) = {
                    let c = o.acks.cursor.lock();
                    (c.next_fetch, c.paused_until.is_some_and(|u| u > now))
                };
                if seen > from {
                    if paused {
                        continue; // the pause's end is in `wake_at`
                    }
                    // Appended after the fetch looked (or rewound by a nack): waiting
                    // for the next append would miss it until another event came.
                    readable = true;
                    break;
                }
                waits.push(
                    async move {
                        let _ = rx.changed().await;
                    }
                    .boxed(),
                );
            }
            if readable {
                // A short pause, not a spin, should a log's end run ahead of what it
                // can read yet.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let mut assignment = self.assignment.clone();
            waits.push(
                async move {
                    let _ = assignment.changed().await;
                }
                .boxed(),
            );
            let signals = self.signals.clone();
            waits.push(async move { signals.settled.notified().await }.boxed());
            if !self.pending.is_empty() {
                let group = self.group.clone();
                waits.push(async move { group.released.notified().await }.boxed());
                // A partition of a topic created after the assignment: look again soon.
                waits.push(tokio::time::sleep(Duration::from_millis(50)).boxed());
            }
            let wake = wake_at.map_or(commit_due, |w| w.min(commit_due));
            waits.push(tokio::time::sleep_until(wake).boxed());
            select_all(waits).await;
        }
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.owned.iter().map(|o| o.tp.clone()).collect()
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let result = self.commit(None).await;
        self.group.leave(self.member);
        self.shared.rebalance(&self.group);
        result
    }
}

impl<S: LogStore> Drop for LocalSubscription<S> {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.group.leave(self.member);
            self.shared.rebalance(&self.group);
        }
    }
}
