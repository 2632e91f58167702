//! One group member: a coordinator task keeps the member's heartbeat and partition
//! leases in the group's KV bucket, and one reader task per owned partition pulls
//! from that partition's durable consumer.
//!
//! Ownership protocol: every member writes `m.<topic>.<member>` each tick; the
//! bucket's `max_age` (the session timeout) expires the keys of silent members.
//! Members sort the live ids, and partition `p` belongs to member `p mod n`. A member
//! reads a partition only while it holds `l.<topic>.<p>`: taken with a KV create
//! (fails while held), refreshed with a revision-checked update, released after the
//! partition's in-flight work settled. A crashed member's leases expire with its
//! heartbeat, so its partitions move after one session timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use async_nats::jetstream::Context;
use async_trait::async_trait;
use bytes::Bytes;
use courier_core::{
    AckHandle, AckToken, Acker, Delivery, Error, OffsetReset, Result, SubscribeSpec, Subscription,
    TopicPartition, TopicSpec,
};
use futures::{FutureExt, StreamExt, TryStreamExt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::acks::{nak_payload, settler, Book, Settle, Tp, Verdict};
use crate::{codec, groups, names, topics, BACKEND};

/// Deliveries per chunk handed to the consumer runtime.
const CHUNK: usize = 512;
/// How long one pull request stays open; bounds how long a released partition takes
/// to drain.
const PULL_EXPIRES: Duration = Duration::from_millis(500);
/// How long after its expiry a pull request is given up on. nats-server 2.9 sometimes
/// neither fills an expired request nor answers it with its 408, and the client's own
/// timer gives up only 5 s later: a stalled partition for 5 s a pull under load. A
/// request is dropped only once it is past expiry and nothing arrived for this long
/// (the server delivers nothing to an expired request; a message still on the wire
/// would arrive well within it).
const PULL_GIVE_UP: Duration = Duration::from_millis(500);
/// How long a given-up pull request is still listened to for late messages.
const LATE_QUIET: Duration = Duration::from_secs(5);
/// Events buffered between readers and the consumer runtime.
const EVENTS: usize = 64;

/// Driver settings a subscription needs.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub pull_batch: usize,
    pub default_partitions: u32,
}

enum Event {
    Batch(Vec<Delivery>),
    Assigned,
}

/// A live group membership on JetStream.
pub(crate) struct NatsSubscription {
    events: mpsc::Receiver<Event>,
    assignment: Arc<Mutex<Vec<TopicPartition>>>,
    stop: watch::Sender<bool>,
    coordinator: Option<JoinHandle<()>>,
    book: Arc<Book>,
    client: async_nats::Client,
    settler: JoinHandle<()>,
    keep_alive: JoinHandle<()>,
}

impl NatsSubscription {
    pub(crate) async fn start(
        client: async_nats::Client,
        js: Context,
        spec: SubscribeSpec,
        settings: Settings,
    ) -> Result<Self> {
        let kv = group_bucket(&js, &spec).await?;
        let ttl = match kv.status().await {
            Ok(s) if !s.max_age().is_zero() => s.max_age(),
            _ => spec.session_timeout,
        };
        let tick = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let settler = tokio::spawn(settler(client.clone(), settle_rx));
        let book = Arc::new(Book::new(settle_tx));
        let keep_alive = tokio::spawn(keep_alive(Arc::downgrade(&book), settings.ack_wait));
        let (events_tx, events) = mpsc::channel(EVENTS);
        let (stop, stop_rx) = watch::channel(false);
        let assignment = Arc::new(Mutex::new(Vec::new()));
        let member = ulid::Ulid::new().to_string().to_lowercase();
        tracing::info!(group = %spec.group, %member, ?ttl, "joining group");
        let mut coordinator = Coordinator {
            js,
            kv,
            member,
            spec,
            settings,
            book: book.clone(),
            events: events_tx,
            assignment: assignment.clone(),
            owned: HashMap::new(),
            releasing: HashMap::new(),
            tick,
            revoke_timeout: (ttl / 2).min(Duration::from_secs(10)),
        };
        // The first round runs before `subscribe` returns, so a member that joins
        // alone owns its partitions at once.
        if let Err(e) = coordinator.round().await {
            tracing::warn!(error = %e, "first group round failed; retrying");
        }
        let task = tokio::spawn(coordinator.run(stop_rx));
        Ok(Self {
            events,
            assignment,
            stop,
            coordinator: Some(task),
            book,
            client,
            settler,
            keep_alive,
        })
    }
}

/// Refreshes the `ack_wait` timer of held deliveries every third of it, until the
/// subscription's book is gone.
async fn keep_alive(book: std::sync::Weak<Book>, ack_wait: Duration) {
    let every = (ack_wait / 3).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(book) = book.upgrade() else { break };
        let refreshed = book.keep_alive(every);
        if refreshed > 0 {
            tracing::trace!(refreshed, "progress acks sent for held deliveries");
        }
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.keep_alive.abort();
        if self.coordinator.is_none() {
            self.settler.abort();
        }
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next_batch(&mut self, _max: usize) -> Result<Option<Vec<Delivery>>> {
        match self.events.recv().await {
            Some(Event::Batch(b)) => Ok(Some(b)),
            Some(Event::Assigned) => Ok(Some(Vec::new())),
            None => Ok(None),
        }
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.assignment.lock().clone()
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn close(&mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.coordinator.take() {
            // Deliveries still queued here were never handed out: dropping them naks
            // them, which lets the partitions' releases finish.
            loop {
                tokio::select! {
                    _ = &mut task => break,
                    e = self.events.recv() => if e.is_none() { (&mut task).await.ok(); break },
                }
            }
        }
        while self.events.try_recv().is_ok() {}
        self.book.flush().await;
        self.assignment.lock().clear();
        Ok(())
    }
}

/// The group's coordination bucket, created by the first member with its session
/// timeout as the key lifetime.
async fn group_bucket(js: &Context, spec: &SubscribeSpec) -> Result<kv::Store> {
    let name = names::bucket(&spec.group);
    if let Ok(kv) = js.get_key_value(&name).await {
        return Ok(kv);
    }
    // The bucket's stream is created directly: async-nats' `create_key_value` first
    // reads account info in a shape nats-server 2.9 does not send. This is the KV
    // layout every NATS client reads (history 1, rollups, direct get).
    let config = stream::Config {
        name: format!("KV_{name}"),
        description: Some(format!("{}{}", names::GROUP_DESCRIPTION, spec.group)),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_messages: -1,
        max_message_size: -1,
        max_age: spec.session_timeout.max(Duration::from_secs(1)),
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    if let Err(e) = js.create_stream(config).await {
        // Another member may have created it first with its own session timeout;
        // that one is then the group's.
        tracing::debug!(error = %e, "group bucket not created");
    }
    js.get_key_value(&name)
        .await
        .map_err(|e| Error::backend(BACKEND, e))
}

struct Owned {
    rev: u64,
    stop: watch::Sender<bool>,
    reader: JoinHandle<()>,
}

struct Releasing {
    rev: u64,
    task: JoinHandle<()>,
}

struct Coordinator {
    js: Context,
    kv: kv::Store,
    member: String,
    spec: SubscribeSpec,
    settings: Settings,
    book: Arc<Book>,
    events: mpsc::Sender<Event>,
    assignment: Arc<Mutex<Vec<TopicPartition>>>,
    owned: HashMap<Tp, Owned>,
    releasing: HashMap<Tp, Releasing>,
    tick: Duration,
    revoke_timeout: Duration,
}

impl Coordinator {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(self.tick) => {}
            }
            if let Err(e) = self.round().await {
                tracing::warn!(group = %self.spec.group, error = %e, "group round failed");
            }
        }
        self.leave().await;
    }

    /// One heartbeat: refresh membership, then take, keep or give up partitions.
    async fn round(&mut self) -> Result<()> {
        for t in &self.spec.topics {
            self.kv
                .put(names::member_key(t, &self.member), Bytes::new())
                .await
                .map_err(|e| Error::connection(BACKEND, e))?;
        }
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| Error::connection(BACKEND, e))?
            .try_collect()
            .await
            .map_err(|e| Error::connection(BACKEND, e))?;
        self.finish_releases().await;
        for t in self.spec.topics.clone() {
            let n = self.partitions(&t).await?;
            let prefix = names::member_prefix(&t);
            let mut members: Vec<&str> = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&prefix))
                .collect();
            if !members.contains(&self.member.as_str()) {
                members.push(&self.member);
            }
            members.sort_unstable();
            let me = members.iter().position(|m| *m == self.member).unwrap_or(0);
            let count = members.len();
            for p in 0..n {
                let tp: Tp = (Arc::from(t.as_str()), p);
                let desired = (p as usize) % count == me;
                self.settle_partition(&t, tp, desired).await;
            }
        }
        self.publish_assignment();
        Ok(())
    }

    async fn settle_partition(&mut self, topic: &str, tp: Tp, desired: bool) {
        let lease = names::lease_key(topic, tp.1);
        if let Some(o) = self.owned.get_mut(&tp) {
            match self
                .kv
                .update(&lease, Bytes::from(self.member.clone()), o.rev)
                .await
            {
                Ok(rev) => o.rev = rev,
                Err(e) if matches!(e.kind(), UpdateErrorKind::WrongLastRevision) => {
                    // The lease expired (we were cut off longer than the session
                    // timeout) and may be someone else's now: stop at once.
                    tracing::warn!(partition = %tp.1, topic, "lease lost");
                    if let Some(o) = self.owned.remove(&tp) {
                        let _ = o.stop.send(true);
                        o.reader.abort();
                    }
                    self.book.remove(&tp);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "lease refresh failed"),
            }
            if !desired {
                if let Some(o) = self.owned.remove(&tp) {
                    let task = tokio::spawn(release(
                        tp.clone(),
                        o.stop,
                        o.reader,
                        self.book.clone(),
                        self.revoke_timeout,
                    ));
                    self.releasing.insert(tp, Releasing { rev: o.rev, task });
                }
            }
            return;
        }
        if let Some(r) = self.releasing.get_mut(&tp) {
            if let Ok(rev) = self
                .kv
                .update(&lease, Bytes::from(self.member.clone()), r.rev)
                .await
            {
                r.rev = rev;
            }
            return;
        }
        if !desired {
            return;
        }
        let rev = match self
            .kv
            .create(&lease, Bytes::from(self.member.clone()))
            .await
        {
            Ok(rev) => rev,
            Err(e) if matches!(e.kind(), CreateErrorKind::AlreadyExists) => return,
            Err(e) => {
                tracing::warn!(error = %e, "lease acquire failed");
                return;
            }
        };
        match self.start_reader(topic, &tp).await {
            Ok((stop, reader)) => {
                tracing::debug!(topic, partition = tp.1, member = %self.member, "partition acquired");
                self.owned.insert(tp, Owned { rev, stop, reader });
            }
            Err(e) => {
                tracing::warn!(error = %e, "partition consumer unavailable");
                let _ = self.kv.delete_expect_revision(&lease, Some(rev)).await;
            }
        }
    }

    async fn partitions(&self, topic: &str) -> Result<u32> {
        if let Some(s) = topics::get(&self.js, topic).await? {
            return Ok(topics::partition_count(s.cached_info()));
        }
        let spec = TopicSpec::new(topic, self.settings.default_partitions.max(1));
        topics::create(&self.js, &spec, false).await?;
        Ok(spec.partitions)
    }

    async fn start_reader(
        &self,
        topic: &str,
        tp: &Tp,
    ) -> Result<(watch::Sender<bool>, JoinHandle<()>)> {
        let stream = topics::get(&self.js, topic)
            .await?
            .ok_or_else(|| Error::TopicNotFound(topic.to_string()))?;
        let name = names::consumer(&self.spec.group, tp.1);
        let deliver = match self.spec.auto_offset_reset {
            OffsetReset::Earliest => DeliverPolicy::All,
            OffsetReset::Latest => DeliverPolicy::New,
        };
        let config = groups::consumer_config(
            &self.spec.group,
            topic,
            tp.1,
            deliver,
            &self.settings,
            self.spec.prefetch,
        );
        let mut consumer = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| Error::backend(BACKEND, e))?;
        let unsettled = consumer.cached_info().num_ack_pending;
        if self.spec.replay_after_takeover && unsettled > 0 {
            // The last owner left deliveries unsettled (a crash, or naks on release):
            // JetStream would redeliver only those, after `ack_wait`, behind newer
            // ones. Read the partition again in log order from its ack floor instead.
            let from = consumer.cached_info().ack_floor.stream_sequence + 1;
            tracing::info!(group = %self.spec.group, topic, partition = tp.1, from, unsettled,
                "partition taken over with unsettled deliveries: reading it again from its ack floor");
            stream
                .delete_consumer(&name)
                .await
                .map_err(|e| Error::backend(BACKEND, e))?;
            let mut again = config;
            again.deliver_policy = DeliverPolicy::ByStartSequence {
                start_sequence: from,
            };
            consumer = stream
                .create_consumer(again)
                .await
                .map_err(|e| Error::backend(BACKEND, e))?;
        }
        self.book.add(tp.clone());
        let (stop, stop_rx) = watch::channel(false);
        let reader = Reader {
            tp: tp.clone(),
            consumer,
            book: self.book.clone(),
            events: self.events.clone(),
            batch: self.settings.pull_batch,
        };
        Ok((stop, tokio::spawn(reader.run(stop_rx))))
    }

    async fn finish_releases(&mut self) {
        let done: Vec<Tp> = self
            .releasing
            .iter()
            .filter(|(_, r)| r.task.is_finished())
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in done {
            if let Some(r) = self.releasing.remove(&tp) {
                let lease = names::lease_key(&tp.0, tp.1);
                if let Err(e) = self.kv.delete_expect_revision(&lease, Some(r.rev)).await {
                    tracing::debug!(error = %e, "lease release failed; it expires instead");
                }
            }
        }
    }

    fn publish_assignment(&self) {
        let mut now: Vec<TopicPartition> = self
            .owned
            .keys()
            .map(|(t, p)| TopicPartition::new(t.to_string(), *p))
            .collect();
        now.sort();
        let changed = {
            let mut a = self.assignment.lock();
            let changed = *a != now;
            *a = now;
            changed
        };
        if changed {
            let _ = self.events.try_send(Event::Assigned);
        }
    }

    /// Leaves the group: releases every partition once its work settled, then
    /// removes the member's keys so the others rebalance at once.
    async fn leave(mut self) {
        let owned: Vec<Tp> = self.owned.keys().cloned().collect();
        for tp in owned {
            if let Some(o) = self.owned.remove(&tp) {
                let task = tokio::spawn(release(
                    tp.clone(),
                    o.stop,
                    o.reader,
                    self.book.clone(),
                    self.revoke_timeout,
                ));
                self.releasing.insert(tp, Releasing { rev: o.rev, task });
            }
        }
        self.publish_assignment();
        for r in self.releasing.values_mut() {
            let _ = (&mut r.task).await;
        }
        // Naks of the released partitions reach the server before their leases go.
        self.book.flush().await;
        self.finish_releases().await;
        for t in &self.spec.topics {
            let _ = self.kv.delete(names::member_key(t, &self.member)).await;
        }
        tracing::info!(group = %self.spec.group, member = %self.member, "left group");
    }
}

/// Stops a partition's reader, waits (bounded) for its deliveries to be settled and
/// naks whatever is left, so the next owner starts exactly after the handled prefix.
async fn release(
    tp: Tp,
    stop: watch::Sender<bool>,
    reader: JoinHandle<()>,
    book: Arc<Book>,
    timeout: Duration,
) {
    let _ = stop.send(true);
    let _ = reader.await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let settled = book.settled.notified();
        if book.outstanding(&tp) == 0 {
            break;
        }
        if tokio::time::timeout_at(deadline, settled).await.is_err() {
            tracing::warn!(topic = %tp.0, partition = tp.1, "in-flight messages not settled in time; naking them");
            break;
        }
    }
    book.remove(&tp);
}

/// Naks what a given-up pull request still brings. On a loaded machine the server
/// can deliver to a request after the reader stopped listening; dropped unread, those
/// messages would come back only after `ack_wait` (30 s by default) and stall their
/// partition meanwhile. Naked, they come again with the next pulls.
async fn give_back_late(mut batch: pull::Batch, book: Arc<Book>) {
    while let Ok(Some(item)) = tokio::time::timeout(LATE_QUIET, batch.next()).await {
        let Ok(m) = item else { break };
        if let Some(reply) = m.message.reply.clone() {
            tracing::debug!("late message of a given-up pull request; naking it");
            book.nak_now(reply);
        }
    }
}

struct Reader {
    tp: Tp,
    consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
    book: Arc<Book>,
    events: mpsc::Sender<Event>,
    batch: usize,
}

impl Reader {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut failures = 0u32;
        while !*stop.borrow() {
            let batch = tokio::select! {
                _ = stop.changed() => break,
                b = self.consumer.batch().max_messages(self.batch).expires(PULL_EXPIRES).messages() => b,
            };
            let mut batch = match batch {
                Ok(b) => {
                    failures = 0;
                    b
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_millis(100 * u64::from(failures.min(20)));
                    tracing::warn!(topic = %self.tp.0, partition = self.tp.1, error = %e, "pull failed; retrying");
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            let mut chunk = Vec::new();
            let give_up = tokio::time::Instant::now() + PULL_EXPIRES + PULL_GIVE_UP;
            loop {
                let item = match batch.next().now_or_never() {
                    Some(item) => item,
                    None => {
                        if !chunk.is_empty()
                            && !self.hand_out(std::mem::take(&mut chunk), &mut stop).await
                        {
                            // Stopping: what is left of this pull is naked below.
                        }
                        let quiet = tokio::time::Instant::now() + PULL_GIVE_UP;
                        match tokio::time::timeout_at(give_up.max(quiet), batch.next()).await {
                            Ok(item) => item,
                            Err(_) => {
                                tracing::debug!(topic = %self.tp.0, partition = self.tp.1, "pull request unanswered after expiry; pulling again");
                                tokio::spawn(give_back_late(batch, self.book.clone()));
                                break;
                            }
                        }
                    }
                };
                let m = match item {
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "pull ended");
                        break;
                    }
                    Some(Ok(m)) => m,
                };
                if *stop.borrow() {
                    // The pull request is still open: give its messages back in order
                    // rather than leaving them to the ack-wait timer.
                    if let Some(reply) = m.message.reply.clone() {
                        self.book.nak_now(reply);
                    }
                    continue;
                }
                if let Some(d) = self.arrive(m) {
                    chunk.push(d);
                    if chunk.len() >= CHUNK {
                        self.hand_out(std::mem::take(&mut chunk), &mut stop).await;
                    }
                }
            }
            if !chunk.is_empty() {
                self.hand_out(chunk, &mut stop).await;
            }
        }
    }

    /// Sends a chunk to the runtime; false (and the chunk dropped, which naks it)
    /// when the reader is stopping.
    async fn hand_out(&self, chunk: Vec<Delivery>, stop: &mut watch::Receiver<bool>) -> bool {
        if *stop.borrow() {
            return false;
        }
        tokio::select! {
            r = self.events.send(Event::Batch(chunk)) => r.is_ok(),
            _ = stop.changed() => false,
        }
    }

    fn arrive(&self, m: async_nats::jetstream::Message) -> Option<Delivery> {
        let (seq, delivered, published) = match m.info() {
            Ok(i) => (
                i.stream_sequence,
                i.delivered,
                (i.published.unix_timestamp_nanos() / 1_000_000) as i64,
            ),
            Err(e) => {
                tracing::warn!(error = %e, "message without JetStream metadata skipped");
                return None;
            }
        };
        let reply = m.message.reply.clone()?;
        let verdict = self
            .book
            .parts()
            .get_mut(&self.tp)
            .map(|p| p.arrive(seq, delivered, reply.clone()));
        let (epoch, attempt) = match verdict {
            Some(Verdict::Deliver { epoch, attempt }) => (epoch, attempt),
            Some(Verdict::Bounce(delay)) => {
                self.book.send(Settle::Reply(reply, nak_payload(delay)));
                return None;
            }
            Some(Verdict::Held) => return None,
            None => {
                self.book.nak_now(reply);
                return None;
            }
        };
        let msg = m.message;
        let d = codec::decode(msg.headers.as_ref(), seq, published);
        let token = AckToken {
            topic: self.tp.0.clone(),
            partition: self.tp.1,
            offset: seq,
            epoch,
            extra: None,
        };
        let acker: Arc<dyn Acker> = self.book.clone();
        Some(Delivery::new(
            self.tp.0.clone(),
            self.tp.1,
            seq,
            d.key,
            msg.payload,
            d.headers,
            d.id,
            d.timestamp,
            attempt,
            Some(AckHandle::new(acker, token)),
        ))
    }
}
