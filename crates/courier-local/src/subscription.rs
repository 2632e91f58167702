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
}

/// Cursors by topic, then partition: acks look up by `&str` without allocating.
/// Hashed with foldhash: every ack and every staleness check looks a cursor up, and
/// SipHash with its probing was ~320 of the ~490 instructions of an ack (callgrind).
#[derive(Default)]
struct Cursors(HashMap<Arc<str>, HashMap<u32, Cursor, FastHash>, FastHash>);

type FastHash = foldhash::fast::RandomState;

impl Cursors {
    fn get(&self, tp: &TopicPartition) -> Option<&Cursor> {
        self.0.get(tp.topic.as_str())?.get(&tp.partition)
    }

    fn get_mut(&mut self, topic: &str, partition: u32) -> Option<&mut Cursor> {
        self.0.get_mut(topic)?.get_mut(&partition)
    }

    fn insert(&mut self, topic: Arc<str>, partition: u32, c: Cursor) {
        self.0.entry(topic).or_default().insert(partition, c);
    }

    fn remove(&mut self, tp: &TopicPartition) {
        if let Some(m) = self.0.get_mut(tp.topic.as_str()) {
            m.remove(&tp.partition);
            if m.is_empty() {
                self.0.remove(tp.topic.as_str());
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (TopicPartition, &Cursor)> {
        self.0.iter().flat_map(|(t, m)| {
            m.iter()
                .map(move |(p, c)| (TopicPartition::new(&**t, *p), c))
        })
    }
}

/// Shared between the subscription and the ack handles it gave out.
pub(crate) struct MemberAcks {
    cursors: Mutex<Cursors>,
    /// Woken on every settle while a partition is being handed over, and on nack.
    settled: Notify,
    revoking: AtomicUsize,
}

impl MemberAcks {
    fn with_cursor<R>(&self, token: &AckToken, f: impl FnOnce(&mut Cursor) -> R) -> Option<R> {
        let mut cursors = self.cursors.lock();
        match cursors.get_mut(&token.topic, token.partition) {
            Some(c) if c.epoch == token.epoch => Some(f(c)),
            _ => None,
        }
    }
}

impl Acker for MemberAcks {
    fn ack(&self, token: AckToken) {
        self.with_cursor(&token, |c| {
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
        });
        if self.revoking.load(Ordering::Acquire) > 0 {
            self.settled.notify_waiters();
        }
    }

    fn nack(&self, token: AckToken, redeliver_after: Duration) {
        self.with_cursor(&token, |c| {
            c.epoch += 1;
            c.next_fetch = token.offset;
            c.acked_ahead.retain(|o| *o < token.offset);
            c.paused_until = Some(Instant::now() + redeliver_after);
            *c.attempts.entry(token.offset).or_insert(1) += 1;
        });
        self.settled.notify_waiters();
    }

    fn is_stale(&self, token: &AckToken) -> bool {
        self.with_cursor(token, |_| ()).is_none()
    }
}

struct Owned<P> {
    tp: TopicPartition,
    topic: Arc<str>,
    log: Arc<P>,
}

/// A live member of a group.
pub(crate) struct LocalSubscription<S: LogStore> {
    shared: Arc<Shared<S>>,
    group: Arc<Group>,
    member: MemberId,
    spec: SubscribeSpec,
    assignment: watch::Receiver<Vec<TopicPartition>>,
    acks: Arc<MemberAcks>,
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
            acks: Arc::new(MemberAcks {
                cursors: Mutex::new(Cursors::default()),
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
        self.acks.revoking.fetch_add(1, Ordering::AcqRel);
        // In-flight deliveries of a revoked partition are finished by the handlers
        // before the partition moves, so a clean rebalance processes nothing twice.
        let deadline = Instant::now() + self.spec.session_timeout;
        loop {
            let notified = self.acks.settled.notified();
            let drained = {
                let cursors = self.acks.cursors.lock();
                revoked.iter().all(|tp| {
                    cursors
                        .get(tp)
                        .is_none_or(|c| c.settled_upto >= c.next_fetch)
                })
            };
            if drained || Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        self.acks.revoking.fetch_sub(1, Ordering::AcqRel);
        self.commit(Some(revoked)).await?;
        {
            let mut cursors = self.acks.cursors.lock();
            for tp in revoked {
                cursors.remove(tp);
            }
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
            self.acks.cursors.lock().insert(
                topic.clone(),
                tp.partition,
                Cursor {
                    next_fetch: start,
                    settled_upto: start,
                    committed: start,
                    acked_ahead: BTreeSet::new(),
                    epoch: 0,
                    paused_until: None,
                    attempts: HashMap::new(),
                },
            );
            self.owned.push(Owned { topic, tp, log });
        }
        self.pending = still;
        Ok(())
    }

    /// Writes settled positions that moved (only `only`'s, when given).
    async fn commit(&mut self, only: Option<&[TopicPartition]>) -> Result<()> {
        let updates: Vec<(TopicPartition, u64)> = {
            let cursors = self.acks.cursors.lock();
            cursors
                .iter()
                .filter(|(tp, c)| {
                    c.settled_upto > c.committed && only.is_none_or(|o| o.contains(tp))
                })
                .map(|(tp, c)| (tp, c.settled_upto))
                .collect()
        };
        self.last_commit = Instant::now();
        if updates.is_empty() {
            return Ok(());
        }
        self.shared
            .store
            .commit_offsets(&self.spec.group, &updates)
            .await?;
        let mut cursors = self.acks.cursors.lock();
        for (tp, o) in updates {
            if let Some(c) = cursors.get_mut(&tp.topic, tp.partition) {
                c.committed = c.committed.max(o);
            }
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
        let acker: Arc<dyn Acker> = self.acks.clone();
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let o = &self.owned[(self.rotate + i) % n];
            let (from, epoch) = {
                let mut cursors = self.acks.cursors.lock();
                let Some(c) = cursors.get_mut(&o.topic, o.tp.partition) else {
                    continue;
                };
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
                let mut cursors = self.acks.cursors.lock();
                let Some(c) = cursors.get_mut(&o.topic, o.tp.partition) else {
                    continue;
                };
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
                let (from, paused) = self
                    .acks
                    .cursors
                    .lock()
                    .get(&o.tp)
                    .map_or((seen, false), |c| {
                        (c.next_fetch, c.paused_until.is_some_and(|u| u > now))
                    });
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
            let acks = self.acks.clone();
            waits.push(async move { acks.settled.notified().await }.boxed());
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
