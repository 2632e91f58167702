//! The scheduler member's loop: ingest schedule-log deliveries into an index ordered
//! by due time, move what is due, check back halves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use courier_core::{
    now_millis, partition_for_key, AckHandle, AckToken, Acker, Delivery, Driver, Record, Result,
    Subscription, TopicPartition,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::wheel::{Timed, Wheel};
use super::wire::{self, Kind};
use super::{ScheduleOptions, Scheduler};
use crate::txn::{HalfMessage, TxnDecision};

/// Most entries moved per publish.
const MOVE_BATCH: usize = 4096;
/// Wait before retrying a failed move.
const RETRY_AFTER_MS: i64 = 1000;
/// Longest a check-back may take before it counts as Unknown.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Most target records scanned per target partition when recovering an interrupted
/// move (the interrupted batch landed right after the recorded end offset).
const VERIFY_SCAN_MAX: usize = 1_000_000;
/// Longest the member waits at start for its subscription to report an assignment
/// before it writes its first start markers.
const FIRST_ASSIGNMENT_WAIT: Duration = Duration::from_secs(1);
/// Due offsets of one partition this close together are read with one range read
/// (reading a few unwanted records beats a round trip per record).
const READ_GAP: u64 = 64;

/// A pending delayed message on a backend that reads by position: 24 bytes, all the
/// index keeps; the payload is read back from the schedule log when due.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    due: i64,
    partition: u32,
    /// The lane generation it was indexed under: a slot of an older generation was
    /// overtaken by a rewind or rebalance and is dropped when it surfaces.
    gen: u32,
    offset: u64,
}

impl Timed for Slot {
    fn due(&self) -> i64 {
        self.due
    }
}

/// How the slots of one schedule-log partition are settled: one acker and token
/// template per partition instead of an ack handle per pending message.
struct Lane {
    acker: Arc<dyn Acker>,
    topic: Arc<str>,
    epoch: u64,
    gen: u32,
}

impl Lane {
    fn token(&self, partition: u32, offset: u64) -> AckToken {
        AckToken {
            topic: self.topic.clone(),
            partition,
            offset,
            epoch: self.epoch,
            extra: None,
        }
    }

    fn ack(&self, partition: u32, offset: u64) {
        self.acker.ack(self.token(partition, offset));
    }

    /// Whether the unsettled delivery at `offset` was overtaken by a hand-over.
    /// Asked about a pending slot's offset, not the last one indexed: a driver may
    /// track staleness per outstanding delivery (Redis), and the last one may be
    /// settled already.
    fn is_stale(&self, partition: u32, offset: u64) -> bool {
        self.acker.is_stale(&self.token(partition, offset))
    }
}

/// An announced, unconfirmed move: target topic, target partition, its end offset
/// before the publish, message id.
type Pending = (String, u32, u64, String);

/// How a moved message is settled.
enum Settle {
    Slot(Slot),
    Entry((u32, u64), AckHandle),
}

impl Settle {
    fn pos(&self) -> (u32, u64) {
        match self {
            Settle::Slot(s) => (s.partition, s.offset),
            Settle::Entry(pos, _) => *pos,
        }
    }
}

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
    /// Pending delayed messages are 24-byte slots read back when due
    /// (`Capabilities::index_by_position`); otherwise entries hold the record.
    by_position: bool,
    /// Each due batch is announced by an intent record, and an interrupted one is
    /// looked up in its targets on recovery (`Capabilities::read_by_position`).
    intents_on: bool,
    /// Moves ask the backend to store each message once (`Capabilities::store_once`),
    /// on top of intents where those are on.
    store_once: bool,
    /// `(due ms, arrival)` → entry; arrival keeps equal due times in log order.
    /// Halves, and delayed messages on backends that cannot read by position.
    index: BTreeMap<(i64, u64), Entry>,
    /// Delayed messages on backends that read by position, earliest due first (equal
    /// due times in `Slot` order, as a min-heap would pop them).
    wheel: Wheel<Slot>,
    lanes: HashMap<u32, Lane>,
    /// Last lane generation per partition (kept when a lane goes).
    gens: HashMap<u32, u32>,
    /// Slots of partitions not caught up yet.
    parked_slots: HashMap<u32, Vec<Slot>>,
    /// Per partition not caught up yet: moves an earlier incarnation announced and
    /// did not mark done, by schedule-log offset → (target topic, partition, end
    /// offset before the publish, message id).
    intents: HashMap<u32, HashMap<u64, Pending>>,
    /// Caught-up partitions whose unfinished moves must be looked up in the targets.
    to_verify: Vec<u32>,
    /// Last offset read per partition (a lower one again is a replay).
    last_seen: HashMap<u32, u64>,
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
    /// Who hands out each partition's deliveries now: acker and epoch. Drivers bump
    /// the epoch when they (re)gain, rewind or re-deliver a partition.
    owners: HashMap<u32, (Arc<dyn Acker>, u64)>,
    /// Per partition, when (ms, this member's clock) its current ownership began at
    /// the latest. A start marker written before it may sit in a part of the log that
    /// the new owner reads before what another member moved since, so it does not
    /// count: the member waits for a newer one.
    owned_since: HashMap<u32, i64>,
    /// Schedule-log partitions assigned to this member, as of the last batch read.
    assigned: Arc<parking_lot::Mutex<HashSet<u32>>>,
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
        let caps = driver.capabilities();
        // Split because a positional read may be fine for the rare crash lookup but
        // too slow for every due message (a Kafka consumer per read).
        let intents_on = caps.read_by_position;
        let by_position = caps.read_by_position && caps.index_by_position;
        Self {
            sched,
            driver,
            log,
            opts,
            by_position,
            intents_on,
            store_once: caps.store_once,
            index: BTreeMap::new(),
            wheel: Wheel::new(now_millis()),
            lanes: HashMap::new(),
            gens: HashMap::new(),
            parked_slots: HashMap::new(),
            intents: HashMap::new(),
            to_verify: Vec::new(),
            last_seen: HashMap::new(),
            halves: HashMap::new(),
            seq: 0,
            hello: format!("__hello.{}", ulid::Ulid::new()),
            greeted: HashSet::new(),
            parked: HashMap::new(),
            moved: HashMap::new(),
            last_greet: Instant::now(),
            owners: HashMap::new(),
            owned_since: HashMap::new(),
            assigned: Arc::default(),
            partitions,
            ready,
        }
    }

    pub(crate) async fn run(mut self, sub: Box<dyn Subscription>, stop: CancellationToken) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (close_tx, close_rx) = oneshot::channel();
        *self.assigned.lock() = log_partitions(sub.as_ref(), &self.log);
        let reader = tokio::spawn(read(
            sub,
            self.log.clone(),
            self.assigned.clone(),
            tx,
            close_rx,
        ));
        // The first markers count only for partitions owned when they are written, so
        // give the subscription a moment to report its assignment first (some report
        // it with their first, possibly empty, batch).
        let mut early = Vec::new();
        let wait_until = Instant::now() + FIRST_ASSIGNMENT_WAIT;
        while self.assigned.lock().is_empty() {
            match tokio::time::timeout_at(wait_until, rx.recv()).await {
                Ok(Some(batch)) => early.push(batch),
                _ => break,
            }
        }
        let started = now_millis();
        for p in self.assigned.lock().iter() {
            self.owned_since.insert(*p, started);
        }
        self.greet(None).await;
        for d in early.into_iter().flatten() {
            self.ingest(d);
        }
        if !self.to_verify.is_empty() {
            self.verify_intents().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            self.sched.pending.store(
                self.index.len() + self.wheel.len(),
                std::sync::atomic::Ordering::Relaxed,
            );
            let next = self.next_due();
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
                        if !self.to_verify.is_empty() {
                            self.verify_intents().await;
                        }
                    }
                    None => break,
                },
            }
        }
        // Unsettled entries are dropped (nacked) before the subscription closes and
        // commits, so they come back to the next member.
        self.index.clear();
        self.wheel.clear();
        {
            let mut book = self.sched.book.lock();
            book.halves.clear();
            book.caught_up.clear();
        }
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
            .chain(
                self.parked_slots
                    .iter()
                    .filter(|(p, v)| !v.is_empty() && !self.greeted.contains(p))
                    .map(|(p, _)| *p),
            )
            // Owned partitions whose start marker did not count (written before the
            // ownership began), even with nothing parked yet.
            .chain(
                self.assigned
                    .lock()
                    .iter()
                    .filter(|p| !self.greeted.contains(p))
                    .copied()
                    .collect::<Vec<u32>>(),
            )
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
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
        if self.greeted.contains(&p) {
            return;
        }
        if self.intents.get(&p).is_some_and(|m| !m.is_empty()) {
            if !self.to_verify.contains(&p) {
                self.to_verify.push(p);
            }
            return;
        }
        self.release(p);
    }

    /// Looks up, in their targets, the messages of moves an earlier incarnation
    /// announced but did not mark done (it crashed in between): those found count as
    /// moved, the rest are moved again. So a crash neither loses nor repeats them.
    async fn verify_intents(&mut self) {
        for p in std::mem::take(&mut self.to_verify) {
            let intents = self.intents.remove(&p).unwrap_or_default();
            let mut parked: HashSet<u64> = self
                .parked_slots
                .get(&p)
                .map(|v| v.iter().map(|s| s.offset).collect())
                .unwrap_or_default();
            if let Some(v) = self.parked.get(&p) {
                parked.extend(v.iter().map(|(_, e)| e.pos.1));
            }
            let mut by_target: HashMap<(String, u32), (u64, HashMap<String, u64>)> = HashMap::new();
            for (off, (topic, tp, from, id)) in intents {
                if parked.contains(&off) {
                    let t = by_target
                        .entry((topic, tp))
                        .or_insert_with(|| (from, HashMap::new()));
                    t.0 = t.0.min(from);
                    t.1.insert(id, off);
                }
            }
            let mut found = Vec::new();
            let mut again = 0;
            for ((topic, partition), (from, mut ids)) in by_target {
                let tp = TopicPartition::new(&topic, partition);
                let (mut at, mut scanned) = (from, 0);
                while !ids.is_empty() && scanned < VERIFY_SCAN_MAX {
                    match self.driver.read_records(&tp, at, 1024).await {
                        Ok(records) => {
                            let Some(last) = records.last().map(|(o, _)| *o) else {
                                break;
                            };
                            scanned += records.len();
                            for (_, r) in &records {
                                if let Some(off) = ids.remove(&r.id) {
                                    found.push(off);
                                }
                            }
                            at = last + 1;
                        }
                        Err(e) => {
                            tracing::warn!(%tp, error = %e, "scheduler: cannot look up an interrupted move; moving it again (may repeat it)");
                            break;
                        }
                    }
                }
                again += ids.len();
            }
            tracing::info!(
                partition = p,
                arrived = found.len(),
                again,
                "scheduler: recovered moves interrupted by a crash"
            );
            self.moved.entry(p).or_default().extend(found);
            self.release(p);
        }
    }

    /// Partition `p` caught up (and its interrupted moves resolved): index its
    /// parked entries, except those already moved.
    fn release(&mut self, p: u32) {
        if !self.greeted.insert(p) {
            return;
        }
        self.sched.book.lock().caught_up.insert(p);
        let moved = self.moved.remove(&p).unwrap_or_default();
        for (due, e) in self.parked.remove(&p).unwrap_or_default() {
            if moved.contains(&e.pos.1) {
                e.ack.ack();
            } else {
                self.insert(due, e);
            }
        }
        let slots = self.parked_slots.remove(&p).unwrap_or_default();
        if let Some(lane) = self.lanes.get(&p) {
            for s in slots.into_iter().filter(|s| s.gen == lane.gen) {
                if moved.contains(&s.offset) {
                    lane.ack(p, s.offset);
                } else {
                    self.wheel.push(s);
                }
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
            self.sched.book.lock().halves.insert(e.id.clone());
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
        let Some((acker, token)) = ack.parts() else {
            return;
        };
        self.track_owner(d.partition, acker, token);
        if self.by_position {
            if let Some(last) = self.last_seen.insert(d.partition, d.offset) {
                if d.offset <= last {
                    self.rewound(d.partition, d.offset);
                }
            }
        }
        match wire::kind(&d.headers) {
            Kind::Delay { due } => {
                let pos = (d.partition, d.offset);
                let body = if self.by_position {
                    match ack.into_parts() {
                        Some((acker, token)) if token.extra.is_none() => {
                            let gen = self.lane_for(d.partition, acker, &token);
                            self.admit_slot(Slot {
                                due,
                                partition: d.partition,
                                gen,
                                offset: d.offset,
                            });
                            return;
                        }
                        Some((acker, token)) => {
                            // A driver that needs more than the position to settle
                            // keeps its handle per entry.
                            let ack = AckHandle::new(acker, token);
                            return self.admit(
                                due,
                                Entry {
                                    pos,
                                    id: String::new(),
                                    what: What::Delay,
                                    body: Body::At(d.partition, d.offset),
                                    ack,
                                },
                            );
                        }
                        None => return,
                    }
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
                    let offsets = wire::moved_offsets(&d.value);
                    if let Some(intents) = self.intents.get_mut(&d.partition) {
                        for o in &offsets {
                            intents.remove(o);
                        }
                    }
                    self.moved.entry(d.partition).or_default().extend(offsets);
                }
                ack.ack();
            }
            Kind::Intent => {
                if !self.greeted.contains(&d.partition) {
                    match wire::parse_intent(&d.value) {
                        Some(i) => {
                            let map = self.intents.entry(d.partition).or_default();
                            for (off, t, id) in i.entries {
                                if let Some((topic, tp, from)) = i.targets.get(t as usize) {
                                    map.insert(off, (topic.clone(), *tp, *from, id));
                                }
                            }
                        }
                        None => {
                            tracing::warn!(id = %d.id, "scheduler: unreadable move intent skipped")
                        }
                    }
                }
                ack.ack();
            }
            Kind::Half { check_at } => {
                let id = d.id.to_string();
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
                    // Only a marker written while this ownership lasted proves that
                    // everything before it was read.
                    if self
                        .owned_since
                        .get(&p)
                        .is_some_and(|since| d.timestamp >= *since)
                    {
                        self.caught_up(p);
                    }
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
                    self.sched.book.lock().halves.remove(&id);
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

    /// Notes who hands out partition `p` now. A different acker or epoch than before
    /// means `p` was handed over, rewound or re-delivered: what this member parked or
    /// learned of it is dropped and it is caught up with again, from a start marker
    /// written after this point.
    fn track_owner(&mut self, p: u32, acker: &Arc<dyn Acker>, token: &AckToken) {
        let same = self
            .owners
            .get(&p)
            .is_some_and(|(a, e)| Arc::ptr_eq(a, acker) && *e == token.epoch);
        if !same {
            let first = self
                .owners
                .insert(p, (acker.clone(), token.epoch))
                .is_none();
            if first {
                // Owned since the first markers, if it was owned then (see `run`).
                self.owned_since.entry(p).or_insert_with(now_millis);
            } else {
                self.owned_since.insert(p, now_millis());
                tracing::info!(
                    partition = p,
                    offset = token.offset,
                    "scheduler: schedule-log partition handed over; re-indexing it"
                );
                self.forget(p);
            }
        }
    }

    /// Partition `p` changed hands, or is read again from an earlier offset: what was
    /// parked or indexed from it comes again, so drop it and catch up anew.
    fn forget(&mut self, p: u32) {
        self.ungreet(p);
        self.parked_slots.remove(&p);
        if let Some(v) = self.parked.remove(&p) {
            // Delivered again with fresh handles; settling these old ones would nack.
            v.into_iter().for_each(|(_, e)| e.ack.discard());
        }
        self.moved.remove(&p);
        self.intents.remove(&p);
        self.to_verify.retain(|q| *q != p);
        // Its slots die with the lane; the next lane takes a new generation.
        self.lanes.remove(&p);
    }

    /// The lane generation for a delivery settled by `acker`/`token`: the current
    /// lane's, or a new one's. A hand-over or rewind has already dropped the lane
    /// (`track_owner`, `rewound` via `forget`), so a new lane starts a new generation
    /// and the slots of the older one are dead.
    fn lane_for(&mut self, p: u32, acker: Arc<dyn Acker>, token: &AckToken) -> u32 {
        if let Some(l) = self.lanes.get(&p) {
            return l.gen;
        }
        let gen = self.gens.entry(p).or_default();
        *gen = gen.wrapping_add(1);
        let gen = *gen;
        self.lanes.insert(
            p,
            Lane {
                acker,
                topic: token.topic.clone(),
                epoch: token.epoch,
                gen,
            },
        );
        gen
    }

    /// Partition `p` is read again from an earlier offset (rewind, or handed back):
    /// what was parked or indexed from it comes again, so drop it and catch up anew.
    fn rewound(&mut self, p: u32, offset: u64) {
        tracing::info!(
            partition = p,
            offset,
            "scheduler: schedule-log partition read again from an earlier offset; re-indexing it"
        );
        self.forget(p);
        self.last_seen.insert(p, offset);
    }

    /// Partition `p` must be caught up with again before its entries are released
    /// (and before decisions for its halves can be checked here).
    fn ungreet(&mut self, p: u32) {
        self.greeted.remove(&p);
        self.sched.book.lock().caught_up.remove(&p);
    }

    fn admit_slot(&mut self, s: Slot) {
        if self.greeted.contains(&s.partition) {
            self.wheel.push(s);
        } else {
            self.parked_slots.entry(s.partition).or_default().push(s);
        }
    }

    fn slot_live(&self, s: &Slot) -> bool {
        self.lanes.get(&s.partition).is_some_and(|l| l.gen == s.gen)
    }

    /// Earliest due time in either index.
    fn next_due(&self) -> Option<i64> {
        let h = self.wheel.next_due();
        let i = self.index.first_key_value().map(|((due, _), _)| *due);
        match (h, i) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
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

    /// Moves (or checks back) everything due now, in due order, up to
    /// [`MOVE_BATCH`] per call: one range read per run of due offsets, one publish to
    /// the targets, one marker per schedule-log partition.
    async fn fire(&mut self) {
        let now = now_millis();
        let mut slots = Vec::new();
        let mut due = Vec::new();
        while slots.len() + due.len() < MOVE_BATCH {
            let h = self.wheel.next_due().filter(|d| *d <= now);
            let i = self
                .index
                .first_key_value()
                .map(|((d, _), _)| *d)
                .filter(|d| *d <= now);
            match (h, i) {
                (Some(a), Some(b)) if b < a => due.extend(self.index.pop_first().map(|(_, e)| e)),
                (Some(_), _) => match self.wheel.pop_due(now) {
                    Some(s) => slots.push(s),
                    None => break,
                },
                (None, Some(_)) => due.extend(self.index.pop_first().map(|(_, e)| e)),
                (None, None) => break,
            }
        }
        // A partition handed to another member: its slots are that member's now.
        let mut touched: HashMap<u32, u64> = HashMap::new();
        for s in slots.iter().filter(|s| self.slot_live(s)) {
            touched.entry(s.partition).or_insert(s.offset);
        }
        for (p, offset) in touched {
            if self.lanes.get(&p).is_some_and(|l| l.is_stale(p, offset)) {
                self.lanes.remove(&p);
                self.ungreet(p);
            }
        }
        slots.retain(|s| self.slot_live(s));
        let mut wanted: Vec<(u32, u64)> = slots.iter().map(|s| (s.partition, s.offset)).collect();
        for e in &due {
            if let (What::Delay, Body::At(p, o)) = (&e.what, &e.body) {
                wanted.push((*p, *o));
            }
        }
        let (mut found, failed) = self.read_positions(wanted).await;
        let mut moves: Vec<(Settle, Record)> = Vec::with_capacity(slots.len() + due.len());
        for s in slots {
            match found.remove(&(s.partition, s.offset)) {
                Some(r) => match wire::unwrap(r) {
                    Some(r) => moves.push((Settle::Slot(s), r)),
                    None => self.settle(Settle::Slot(s)),
                },
                None if failed.contains(&s.partition) => {
                    self.wheel.push(Slot {
                        due: now + RETRY_AFTER_MS,
                        ..s
                    });
                }
                None => {
                    tracing::error!(
                        partition = s.partition,
                        offset = s.offset,
                        "scheduler: delayed message no longer in the schedule log"
                    );
                    self.settle(Settle::Slot(s));
                }
            }
        }
        for e in due {
            if e.ack.is_stale() {
                // The partition moved to another member, which has it again.
                if matches!(e.what, What::Half { .. }) {
                    self.halves.remove(&e.id);
                    self.sched.book.lock().halves.remove(&e.id);
                }
                e.ack.discard();
                continue;
            }
            match e.what {
                What::Delay => match e.body {
                    Body::Target(r) => moves.push((Settle::Entry(e.pos, e.ack), r)),
                    Body::At(p, offset) => match found.remove(&(p, offset)) {
                        Some(r) => match wire::unwrap(r) {
                            Some(r) => moves.push((Settle::Entry(e.pos, e.ack), r)),
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
                    let decision = self.check(&e.id, &r, checks).await;
                    if decision != TxnDecision::Unknown || checks + 1 >= self.opts.max_checks {
                        // Decided here: a later commit or rollback finds nothing.
                        self.sched.book.lock().halves.remove(&e.id);
                    }
                    match decision {
                        TxnDecision::Commit => moves.push((Settle::Entry(e.pos, e.ack), r)),
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
        let (settles, mut records): (Vec<Settle>, Vec<Record>) = moves.into_iter().unzip();
        // Entries held in memory are kept for a retry; slots are read again.
        let backup: Vec<Option<Record>> = settles
            .iter()
            .zip(&records)
            .map(|(s, r)| matches!(s, Settle::Entry(..)).then(|| r.clone()))
            .collect();
        if self.store_once {
            // The backend's own de-duplication also covers what intents cannot see
            // (a partition handed over between a move and its marker).
            for r in &mut records {
                r.headers.insert(courier_core::HEADER_STORE_ONCE, "1");
            }
        }
        let res = match self.write_intents(&settles, &mut records).await {
            Ok(()) => self.driver.publish(records).await.map(|_| ()),
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => {
                let mut done: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
                for s in &settles {
                    let (p, o) = s.pos();
                    done.entry(p).or_default().push(o);
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
                for s in settles {
                    self.settle(s);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, count = settles.len(), "scheduler: moving due messages failed; retrying");
                for (s, r) in settles.into_iter().zip(backup) {
                    match (s, r) {
                        (Settle::Slot(s), _) => self.wheel.push(Slot {
                            due: now + RETRY_AFTER_MS,
                            ..s
                        }),
                        (Settle::Entry(pos, ack), Some(r)) => {
                            self.insert_delay(now + RETRY_AFTER_MS, pos, Body::Target(r), ack)
                        }
                        (Settle::Entry(_, ack), None) => drop(ack),
                    }
                }
            }
        }
    }

    /// On backends that read by position, records where each due message goes (its
    /// target partition fixed now) and how far each target partition reached, before
    /// the publish: see [`Engine::verify_intents`].
    async fn write_intents(&self, settles: &[Settle], records: &mut [Record]) -> Result<()> {
        if !self.intents_on {
            return Ok(());
        }
        let mut ends: HashMap<String, Vec<u64>> = HashMap::new();
        for r in records.iter() {
            if !ends.contains_key(&r.topic) {
                let info = self.driver.describe_topic(&r.topic).await?;
                let mut v = vec![0; info.partitions.len()];
                for p in &info.partitions {
                    if let Some(slot) = v.get_mut(p.partition as usize) {
                        *slot = p.end_offset;
                    }
                }
                ends.insert(r.topic.clone(), v);
            }
        }
        let mut per: BTreeMap<u32, wire::Intent> = BTreeMap::new();
        for (s, r) in settles.iter().zip(records.iter_mut()) {
            let Some(e) = ends.get(&r.topic).filter(|e| !e.is_empty()) else {
                continue;
            };
            let part = *r.partition.get_or_insert_with(|| {
                let key = r.key.as_deref().unwrap_or(r.id.as_bytes());
                partition_for_key(key, e.len() as u32)
            });
            let end = e.get(part as usize).copied().unwrap_or(0);
            let (sp, so) = s.pos();
            let intent = per.entry(sp).or_default();
            let t = match intent
                .targets
                .iter()
                .position(|(t, p, _)| *t == r.topic && *p == part)
            {
                Some(t) => t,
                None => {
                    intent.targets.push((r.topic.clone(), part, end));
                    intent.targets.len() - 1
                }
            };
            intent.entries.push((so, t as u32, r.id.clone()));
        }
        let records = per
            .iter()
            .map(|(p, i)| wire::intent(*p, i, &self.log))
            .collect();
        self.driver.publish(records).await?;
        Ok(())
    }

    /// Acknowledges a moved (or dropped) entry.
    fn settle(&self, s: Settle) {
        match s {
            Settle::Slot(s) => {
                if let Some(l) = self.lanes.get(&s.partition).filter(|l| l.gen == s.gen) {
                    l.ack(s.partition, s.offset);
                }
            }
            Settle::Entry(_, ack) => ack.ack(),
        }
    }

    /// Reads schedule-log records by position: one range read per run of nearby
    /// offsets per partition. Returns what was found and the partitions whose read
    /// failed (their entries are retried).
    async fn read_positions(
        &self,
        wanted: Vec<(u32, u64)>,
    ) -> (HashMap<(u32, u64), Record>, HashSet<u32>) {
        let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (p, o) in wanted {
            by_partition.entry(p).or_default().push(o);
        }
        let mut found = HashMap::new();
        let mut failed = HashSet::new();
        for (p, mut offsets) in by_partition {
            offsets.sort_unstable();
            offsets.dedup();
            let tp = TopicPartition::new(&self.log, p);
            let mut i = 0;
            while i < offsets.len() {
                let from = offsets[i];
                let mut j = i;
                while j + 1 < offsets.len()
                    && offsets[j + 1] - offsets[j] <= READ_GAP
                    && offsets[j + 1] - from < MOVE_BATCH as u64
                {
                    j += 1;
                }
                let span = (offsets[j] - from + 1) as usize;
                match self.driver.read_records(&tp, from, span).await {
                    Ok(records) => {
                        let end = records.last().map(|(o, _)| *o);
                        for (o, r) in records {
                            if offsets[i..=j].binary_search(&o).is_ok() {
                                found.insert((p, o), r);
                            }
                        }
                        // A short read (records deleted) moves on past what it saw.
                        i = match end {
                            Some(end) if end < offsets[j] => {
                                i + offsets[i..=j].partition_point(|o| *o <= end).max(1)
                            }
                            _ => j + 1,
                        };
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
        id: d.id.to_string(),
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

/// The partitions of `log` that `sub` owns now.
fn log_partitions(sub: &dyn Subscription, log: &str) -> HashSet<u32> {
    sub.assignment()
        .into_iter()
        .filter(|tp| tp.topic == log)
        .map(|tp| tp.partition)
        .collect()
}

/// Pulls deliveries off the subscription until told to close, then closes it (which
/// commits what the engine acknowledged).
async fn read(
    mut sub: Box<dyn Subscription>,
    log: String,
    assigned: Arc<parking_lot::Mutex<HashSet<u32>>>,
    tx: mpsc::UnboundedSender<Vec<Delivery>>,
    mut close: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut close => break,
            batch = sub.next_batch(1024) => match batch {
                Ok(Some(b)) => {
                    *assigned.lock() = log_partitions(sub.as_ref(), &log);
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
