//! The scheduler member's loop: ingest schedule-log deliveries into an index ordered
//! by due time, move what is due, check back halves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use courier_core::{
    now_millis, AckHandle, Delivery, Driver, Error, Record, Subscription, TopicPartition,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Kind};
use super::{ScheduleOptions, Scheduler};
use crate::txn::{HalfMessage, TxnDecision};

/// Most entries moved per publish.
const MOVE_BATCH: usize = 4096;
/// Wait before retrying a failed move.
const RETRY_AFTER_MS: i64 = 1000;
/// Longest a check-back may take before it counts as Unknown.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an entry's message is.
enum Body {
    /// Still in the schedule log, read when due (log backends: index entry only).
    At(u32, u64),
    /// In memory, already addressed to its target.
    Target(Record),
}

enum What {
    Delay,
    Half { checks: u32 },
}

struct Entry {
    /// Schedule-log partition and offset.
    pos: (u32, u64),
    id: String,
    what: What,
    body: Body,
    ack: AckHandle,
}

pub(crate) struct Engine {
    sched: Arc<Scheduler>,
    driver: Arc<dyn Driver>,
    log: String,
    opts: ScheduleOptions,
    by_position: bool,
    /// `(due ms, arrival)` → entry; arrival keeps equal due times in log order.
    index: BTreeMap<(i64, u64), Entry>,
    halves: HashMap<String, (i64, u64)>,
    seq: u64,
    hello: String,
    /// Partitions where this member read its own start marker: everything written
    /// before it (moved markers of an earlier incarnation included) has been seen.
    greeted: HashSet<u32>,
    /// Entries of partitions not caught up yet, released at the start marker.
    parked: HashMap<u32, Vec<(i64, Entry)>>,
    /// Offsets moved by an earlier incarnation, per partition not caught up yet.
    moved: HashMap<u32, HashSet<u64>>,
    last_greet: Instant,
    partitions: u32,
    ready: watch::Sender<bool>,
}

impl Engine {
    pub(crate) async fn new(
        sched: Arc<Scheduler>,
        log: String,
        partitions: u32,
        opts: ScheduleOptions,
        ready: watch::Sender<bool>,
    ) -> Self {
        let driver = sched.driver.clone();
        let by_position = !matches!(
            driver
                .read_records(&TopicPartition::new(&log, 0), 0, 1)
                .await,
            Err(Error::Unsupported { .. })
        );
        Self {
            sched,
            driver,
            log,
            opts,
            by_position,
            index: BTreeMap::new(),
            halves: HashMap::new(),
            seq: 0,
            hello: format!("__hello.{}", ulid::Ulid::new()),
            greeted: HashSet::new(),
            parked: HashMap::new(),
            moved: HashMap::new(),
            last_greet: Instant::now(),
            partitions,
            ready,
        }
    }

    pub(crate) async fn run(mut self, sub: Box<dyn Subscription>, stop: CancellationToken) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (close_tx, close_rx) = oneshot::channel();
        let reader = tokio::spawn(read(sub, tx, close_rx));
        self.greet(None).await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            self.sched
                .pending
                .store(self.index.len(), std::sync::atomic::Ordering::Relaxed);
            let next = self.index.first_key_value().map(|((due, _), _)| *due);
            let sleep = tokio::time::sleep_until(instant_of(next.unwrap_or(i64::MAX)));
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = sleep, if next.is_some() => self.fire().await,
                _ = tick.tick() => self.regreet().await,
                batch = rx.recv() => match batch {
                    Some(batch) => {
                        for d in batch {
                            self.ingest(d);
                        }
                    }
                    None => break,
                },
            }
        }
        // Unsettled entries are dropped (nacked) before the subscription closes and
        // commits, so they come back to the next member.
        self.index.clear();
        self.sched
            .pending
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let _ = close_tx.send(());
        let _ = reader.await;
        tracing::debug!(log = %self.log, "scheduler member stopped");
    }

    /// A partition gained after start (rebalance) never shows this member's first
    /// marker again: write another so its entries are released.
    async fn regreet(&mut self) {
        if self.last_greet.elapsed() < Duration::from_secs(2) {
            return;
        }
        let waiting: Vec<u32> = self
            .parked
            .iter()
            .filter(|(p, v)| !v.is_empty() && !self.greeted.contains(p))
            .map(|(p, _)| *p)
            .collect();
        if !waiting.is_empty() {
            self.greet(Some(waiting)).await;
        }
    }

    /// One marker per partition, so this member learns when it has caught up with
    /// each and when it owns them all.
    async fn greet(&mut self, only: Option<Vec<u32>>) {
        self.last_greet = Instant::now();
        let hellos = only
            .unwrap_or_else(|| (0..self.partitions).collect())
            .into_iter()
            .map(|p| {
                let mut r = wire::op(&format!("{}.{p}", self.hello), false, &self.log, 1);
                r.partition = Some(p);
                r
            })
            .collect();
        if let Err(e) = self.driver.publish(hellos).await {
            tracing::warn!(error = %e, "scheduler: could not write readiness markers");
        }
    }

    /// Indexes a newly read entry, or parks it until its partition caught up.
    fn admit(&mut self, due: i64, e: Entry) {
        let p = e.pos.0;
        if self.greeted.contains(&p) {
            self.insert(due, e);
        } else {
            self.parked.entry(p).or_default().push((due, e));
        }
    }

    /// Partition `p` caught up: release its parked entries, except those an earlier
    /// incarnation already moved.
    fn caught_up(&mut self, p: u32) {
        if !self.greeted.insert(p) {
            return;
        }
        let moved = self.moved.remove(&p).unwrap_or_default();
        for (due, e) in self.parked.remove(&p).unwrap_or_default() {
            if moved.contains(&e.pos.1) {
                e.ack.ack();
            } else {
                self.insert(due, e);
            }
        }
        if self.greeted.len() as u32 >= self.partitions {
            self.ready.send_replace(true);
        }
    }

    fn insert(&mut self, due: i64, e: Entry) -> (i64, u64) {
        self.seq += 1;
        let key = (due, self.seq);
        if matches!(e.what, What::Half { .. }) {
            if let Some(old) = self.halves.insert(e.id.clone(), key) {
                // Delivered again (rebalance or rewind): the newer copy wins.
                self.index.remove(&old);
            }
        }
        self.index.insert(key, e);
        key
    }

    fn ingest(&mut self, mut d: Delivery) {
        let Some(ack) = d.take_ack() else { return };
        if ack.is_stale() {
            ack.discard();
            return;
        }
        match wire::kind(&d.headers) {
            Kind::Delay { due } => {
                let pos = (d.partition, d.offset);
                let body = if self.by_position {
                    Body::At(d.partition, d.offset)
                } else {
                    match target_of(d) {
                        Some(r) => Body::Target(r),
                        None => return ack.ack(),
                    }
                };
                self.admit(
                    due,
                    Entry {
                        pos,
                        id: String::new(),
                        what: What::Delay,
                        body,
                        ack,
                    },
                );
            }
            Kind::Moved => {
                if !self.greeted.contains(&d.partition) {
                    self.moved
                        .entry(d.partition)
                        .or_default()
                        .extend(wire::moved_offsets(&d.value));
                }
                ack.ack();
            }
            Kind::Half { check_at } => {
                let id = d.id.clone();
                let pos = (d.partition, d.offset);
                match target_of(d) {
                    Some(r) => {
                        self.admit(
                            check_at,
                            Entry {
                                pos,
                                id,
                                what: What::Half { checks: 0 },
                                body: Body::Target(r),
                                ack,
                            },
                        );
                    }
                    None => ack.ack(),
                }
            }
            Kind::Op { id, commit } => {
                if let Some(p) = id
                    .strip_prefix(self.hello.as_str())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .and_then(|p| p.parse::<u32>().ok())
                {
                    self.caught_up(p);
                } else if let Some(parked) = self.parked.get_mut(&d.partition).and_then(|v| {
                    let i = v
                        .iter()
                        .position(|(_, e)| matches!(e.what, What::Half { .. }) && e.id == id)?;
                    Some((v, i))
                }) {
                    // Decided while catching up.
                    let (v, i) = parked;
                    if commit {
                        v[i].0 = i64::MIN;
                        v[i].1.what = What::Delay;
                    } else {
                        v.remove(i).1.ack.ack();
                    }
                } else if let Some(key) = self.halves.remove(&id) {
                    if let Some(mut e) = self.index.remove(&key) {
                        if commit {
                            // Committed: moved like a delayed message due now.
                            e.what = What::Delay;
                            self.seq += 1;
                            self.index.insert((i64::MIN, self.seq), e);
                        } else {
                            tracing::debug!(id = %id, "half rolled back");
                            e.ack.ack();
                        }
                    }
                } else {
                    tracing::debug!(id = %id, commit, "decision for an unknown or decided half");
                }
                // Safe to settle at once: the half precedes its decision in the
                // partition, so the decision is not committed before the half is.
                ack.ack();
            }
            Kind::Unknown => {
                tracing::warn!(id = %d.id, "scheduler: skipping a record it does not understand");
                ack.ack();
            }
        }
    }

    fn insert_delay(&mut self, due: i64, pos: (u32, u64), body: Body, ack: AckHandle) {
        self.insert(
            due,
            Entry {
                pos,
                id: String::new(),
                what: What::Delay,
                body,
                ack,
            },
        );
    }

    /// Moves (or checks back) everything due now, in due order.
    async fn fire(&mut self) {
        let now = now_millis();
        let mut due = Vec::new();
        while due.len() < MOVE_BATCH {
            match self.index.first_entry() {
                Some(e) if e.key().0 <= now => due.push(e.remove()),
                _ => break,
            }
        }
        let mut moves: Vec<((u32, u64), AckHandle, Record)> = Vec::with_capacity(due.len());
        let (mut found, failed) = self.read_positions(&due).await;
        for e in due {
            if e.ack.is_stale() {
                // The partition moved to another member, which has it again.
                if matches!(e.what, What::Half { .. }) {
                    self.halves.remove(&e.id);
                }
                e.ack.discard();
                continue;
            }
            match e.what {
                What::Delay => match e.body {
                    Body::Target(r) => moves.push((e.pos, e.ack, r)),
                    Body::At(p, offset) => match found.remove(&(p, offset)) {
                        Some(r) => match wire::unwrap(r) {
                            Some(r) => moves.push((e.pos, e.ack, r)),
                            None => e.ack.ack(),
                        },
                        None if failed.contains(&p) => {
                            self.insert_delay(
                                now + RETRY_AFTER_MS,
                                e.pos,
                                Body::At(p, offset),
                                e.ack,
                            );
                        }
                        None => {
                            tracing::error!(
                                partition = p,
                                offset,
                                "scheduler: delayed message no longer in the schedule log"
                            );
                            e.ack.ack();
                        }
                    },
                },
                What::Half { checks } => {
                    self.halves.remove(&e.id);
                    let Body::Target(r) = e.body else {
                        e.ack.ack();
                        continue;
                    };
                    match self.check(&e.id, &r, checks).await {
                        TxnDecision::Commit => moves.push((e.pos, e.ack, r)),
                        TxnDecision::Rollback => {
                            tracing::info!(id = %e.id, "half rolled back by check-back");
                            e.ack.ack();
                        }
                        TxnDecision::Unknown if checks + 1 >= self.opts.max_checks => {
                            tracing::warn!(
                                id = %e.id,
                                topic = %r.topic,
                                checks = checks + 1,
                                "half still unknown after the last check-back: rolled back"
                            );
                            e.ack.ack();
                        }
                        TxnDecision::Unknown => {
                            let at = now + self.opts.check_interval.as_millis() as i64;
                            self.insert(
                                at,
                                Entry {
                                    pos: e.pos,
                                    id: e.id,
                                    what: What::Half { checks: checks + 1 },
                                    body: Body::Target(r),
                                    ack: e.ack,
                                },
                            );
                        }
                    }
                }
            }
        }
        if moves.is_empty() {
            return;
        }
        let mut acks = Vec::with_capacity(moves.len());
        let mut records = Vec::with_capacity(moves.len());
        let mut done: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (pos, ack, r) in moves {
            acks.push((pos, ack));
            records.push(r);
        }
        match self.driver.publish(records.clone()).await {
            Ok(_) => {
                for (pos, _) in &acks {
                    done.entry(pos.0).or_default().push(pos.1);
                }
                // Out-of-order acks are not committed while an earlier entry waits,
                // so the log itself records what moved; a restart skips those.
                let markers = done
                    .iter()
                    .map(|(p, offsets)| wire::moved(*p, offsets, &self.log))
                    .collect();
                if let Err(e) = self.driver.publish(markers).await {
                    tracing::warn!(error = %e, "scheduler: recording moves failed; a crash now would repeat them (same ids)");
                }
                acks.into_iter().for_each(|(_, a)| a.ack());
            }
            Err(e) => {
                tracing::warn!(error = %e, count = records.len(), "scheduler: moving due messages failed; retrying");
                for ((pos, ack), r) in acks.into_iter().zip(records) {
                    self.insert_delay(now + RETRY_AFTER_MS, pos, Body::Target(r), ack);
                }
            }
        }
    }

    /// Reads the due entries stored by position, one range read per run of offsets
    /// per partition. Returns what was found and the partitions whose read failed
    /// (their entries are retried).
    async fn read_positions(&self, due: &[Entry]) -> (HashMap<(u32, u64), Record>, HashSet<u32>) {
        let mut wanted: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for e in due {
            if let (What::Delay, Body::At(p, o)) = (&e.what, &e.body) {
                wanted.entry(*p).or_default().push(*o);
            }
        }
        let mut found = HashMap::new();
        let mut failed = HashSet::new();
        for (p, mut offsets) in wanted {
            offsets.sort_unstable();
            let tp = TopicPartition::new(&self.log, p);
            let last = offsets[offsets.len() - 1];
            let mut i = 0;
            while i < offsets.len() {
                let from = offsets[i];
                let span = (last - from + 1).min(MOVE_BATCH as u64) as usize;
                match self.driver.read_records(&tp, from, span).await {
                    Ok(records) => {
                        let Some(end) = records.last().map(|(o, _)| *o) else {
                            break;
                        };
                        for (o, r) in records {
                            found.insert((p, o), r);
                        }
                        while i < offsets.len() && offsets[i] <= end {
                            i += 1;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%tp, error = %e, "scheduler: reading due messages failed; retrying");
                        failed.insert(p);
                        break;
                    }
                }
            }
        }
        (found, failed)
    }

    async fn check(&self, id: &str, r: &Record, checks: u32) -> TxnDecision {
        let checker = self.sched.checker.read().clone();
        let Some(checker) = checker else {
            tracing::debug!(id, "no transaction checker registered: unknown");
            return TxnDecision::Unknown;
        };
        let half = HalfMessage {
            id: id.to_string(),
            topic: r.topic.clone(),
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
            timestamp: r.timestamp,
            checks,
        };
        match tokio::time::timeout(CHECK_TIMEOUT, checker.check(&half)).await {
            Ok(d) => d,
            Err(_) => {
                tracing::warn!(id, "transaction check-back timed out: unknown");
                TxnDecision::Unknown
            }
        }
    }
}

/// The delivery as a record addressed to its target.
fn target_of(d: Delivery) -> Option<Record> {
    wire::unwrap(Record {
        topic: d.topic.to_string(),
        partition: Some(d.partition),
        id: d.id,
        key: d.key,
        value: d.value,
        headers: d.headers,
        timestamp: d.timestamp,
    })
}

/// The tokio instant of epoch time `ms` (now when past).
fn instant_of(ms: i64) -> Instant {
    let wait = ms.saturating_sub(now_millis());
    let wait = Duration::from_millis(wait.clamp(0, 365 * 24 * 3600 * 1000) as u64);
    Instant::now() + wait
}

/// Pulls deliveries off the subscription until told to close, then closes it (which
/// commits what the engine acknowledged).
async fn read(
    mut sub: Box<dyn Subscription>,
    tx: mpsc::UnboundedSender<Vec<Delivery>>,
    mut close: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut close => break,
            batch = sub.next_batch(1024) => match batch {
                Ok(Some(b)) => {
                    if tx.send(b).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler: reading the schedule log failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    }
    drop(tx);
    if let Err(e) = sub.close().await {
        tracing::warn!(error = %e, "scheduler: closing the schedule log subscription failed");
    }
}
