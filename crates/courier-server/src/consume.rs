//! HTTP consumer-group members (for services that cannot link Courier).
//!
//! Each `(group, consumerId)` is one real group member on the backend (a driver
//! subscription), so HTTP consumers split partitions with each other and with native
//! consumers exactly as on any backend. A fetch hands out deliveries and keeps their
//! settle handles; a commit acks them (the backend commits the contiguous acked
//! prefix in the background and on leave). A delivery not committed within its
//! visibility timeout is nacked and comes back; a member that stops fetching leaves
//! the group after `memberTimeoutMs`, and whatever it held comes back too.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::TopicPartition;
use courier::{Client, Delivery, OffsetReset};
use courier_core::{AckHandle, SubscribeSpec, Subscription};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::envelope::ApiError;

/// Identifies one held delivery.
type Key = (Arc<str>, u32, u64);

struct Held {
    ack: AckHandle,
    deadline: Instant,
}

/// Deliveries a member's pump keeps ready ahead of fetches.
const BUFFER: usize = 1000;

/// One HTTP consumer instance in one group.
///
/// A background pump owns the backend subscription and keeps calling it, as the
/// native consumer runtime does: that is what commits acknowledged positions on the
/// backend's timer and follows rebalances, even while the HTTP client is busy.
/// Fetches take from the pump's buffer.
pub struct Member {
    /// Group id.
    pub group: String,
    /// Consumer instance id.
    pub id: String,
    /// Token name that created it; only that token may use it.
    pub owner: String,
    /// Subscribed topics.
    pub topics: Vec<String>,
    buffer: Mutex<VecDeque<Delivery>>,
    ready: Notify,
    space: Notify,
    assigned: Mutex<Vec<TopicPartition>>,
    failed: Mutex<Option<String>>,
    fetching: tokio::sync::Mutex<()>,
    held: Mutex<HashMap<Key, Held>>,
    last_seen: Mutex<Instant>,
    stop: CancellationToken,
    pump: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Member {
    /// Deliveries handed out and not yet committed.
    pub fn in_flight(&self) -> usize {
        self.held.lock().len()
    }

    /// Time since the last fetch or commit.
    pub fn idle(&self) -> Duration {
        self.last_seen.lock().elapsed()
    }

    fn touch(&self) {
        *self.last_seen.lock() = Instant::now();
    }

    /// Partitions the member owns now.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.assigned.lock().clone()
    }

    /// Releases every partition that has an overdue delivery. A backend rewinds a
    /// partition to the nacked offset (later deliveries of it turn stale), so the
    /// whole partition's held set goes back, rewound to its lowest held offset;
    /// nacking a higher offset first would strand the lower ones.
    fn expire(&self, now: Instant) -> usize {
        let mut held = self.held.lock();
        let mut due: Vec<(Arc<str>, u32)> = held
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(k, _)| (k.0.clone(), k.1))
            .collect();
        due.sort();
        due.dedup();
        let mut released = 0;
        for (topic, partition) in due {
            let mut keys: Vec<Key> = held
                .keys()
                .filter(|k| k.0 == topic && k.1 == partition)
                .cloned()
                .collect();
            keys.sort_by_key(|k| k.2);
            for (i, k) in keys.iter().enumerate() {
                if let Some(h) = held.remove(k) {
                    released += 1;
                    if i == 0 {
                        h.ack.nack(Duration::ZERO);
                    } else {
                        h.ack.discard();
                    }
                }
            }
        }
        released
    }

    async fn pump(self: Arc<Self>, mut sub: Box<dyn Subscription>, commit_interval: Duration) {
        let mut failures = 0u32;
        loop {
            let full = self.buffer.lock().len() >= BUFFER;
            let want = if full {
                // Keep committing and following rebalances while nobody fetches:
                // wait for room, but call the backend at least once per interval.
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    _ = self.space.notified() => continue,
                    _ = tokio::time::sleep(commit_interval) => 1,
                }
            } else {
                BUFFER - self.buffer.lock().len()
            };
            let got = tokio::select! {
                _ = self.stop.cancelled() => break,
                b = sub.next_batch(want) => b,
            };
            *self.assigned.lock() = sub.assignment();
            match got {
                Ok(Some(batch)) => {
                    failures = 0;
                    if !batch.is_empty() {
                        self.buffer.lock().extend(batch);
                        self.ready.notify_waiters();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(group = %self.group, member = %self.id, error = %e, "HTTP member fetch failed; retrying");
                    *self.failed.lock() = Some(e.to_string());
                    let wait = Duration::from_millis(100 * u64::from(failures.min(50)));
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        // Everything not committed goes back before the final commit and leave.
        self.buffer.lock().clear();
        for (_, h) in self.held.lock().drain() {
            h.ack.nack(Duration::ZERO);
        }
        if let Err(e) = sub.close().await {
            tracing::warn!(group = %self.group, member = %self.id, error = %e, "leaving group failed");
        }
        self.assigned.lock().clear();
        self.ready.notify_waiters();
    }

    async fn close(&self) {
        self.stop.cancel();
        let task = self.pump.lock().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Takes up to `max` fresh deliveries from the buffer, waiting until `deadline`.
    async fn take(
        &self,
        max: usize,
        deadline: tokio::time::Instant,
        visibility: Duration,
    ) -> Vec<Delivery> {
        let _one_fetch_at_a_time = self.fetching.lock().await;
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut out = Vec::new();
            {
                let mut buf = self.buffer.lock();
                while out.len() < max {
                    let Some(mut d) = buf.pop_front() else { break };
                    match d.take_ack() {
                        Some(ack) if ack.is_stale() => ack.discard(),
                        Some(ack) => {
                            out.push((d, ack));
                        }
                        None => {}
                    }
                }
            }
            if !out.is_empty() {
                self.space.notify_one();
                return out
                    .into_iter()
                    .map(|(d, ack)| {
                        self.stash(&d, ack, Instant::now() + visibility);
                        d
                    })
                    .collect();
            }
            if self.stop.is_cancelled() || tokio::time::Instant::now() >= deadline {
                return Vec::new();
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.stop.cancelled() => {}
            }
        }
    }

    fn stash(&self, d: &Delivery, ack: AckHandle, deadline: Instant) {
        let key = (d.topic.clone(), d.partition, d.offset);
        let held = Held { ack, deadline };
        if let Some(old) = self.held.lock().insert(key, held) {
            // Delivered again before it expired here (rewind): the new handle wins.
            old.ack.discard();
        }
    }
}

/// What a fetch asks for.
pub struct FetchRequest {
    /// Topics (must match the member's on later fetches).
    pub topics: Vec<String>,
    /// Most records to return.
    pub max_records: usize,
    /// Longest wait for the first record.
    pub wait: Duration,
    /// How long returned records stay reserved for this consumer.
    pub visibility: Duration,
    /// Start position for a group without commits.
    pub reset: OffsetReset,
}

/// A delivery handed out over HTTP.
pub struct Fetched {
    /// The message (its settle handle is kept by the member).
    pub delivery: Delivery,
}

/// All HTTP members of this server.
pub struct Members {
    client: Client,
    members: Mutex<HashMap<(String, String), Arc<Member>>>,
    member_timeout: Duration,
}

/// Most members one server keeps (each holds a backend subscription).
const MAX_MEMBERS: usize = 1024;

impl Members {
    /// An empty registry over `client`.
    pub fn new(client: Client, member_timeout: Duration) -> Self {
        Self {
            client,
            members: Mutex::new(HashMap::new()),
            member_timeout,
        }
    }

    /// Every live member.
    pub fn list(&self) -> Vec<Arc<Member>> {
        self.members.lock().values().cloned().collect()
    }

    async fn member(
        &self,
        group: &str,
        id: &str,
        owner: &str,
        req: &FetchRequest,
    ) -> Result<Arc<Member>, ApiError> {
        let key = (group.to_string(), id.to_string());
        if let Some(m) = self.members.lock().get(&key).cloned() {
            if m.owner != owner {
                return Err(ApiError::forbidden(
                    "this consumer belongs to another token",
                ));
            }
            let mut want = req.topics.clone();
            want.sort();
            if want != m.topics {
                return Err(ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    format!("consumer {id:?} is subscribed to {:?}; use a new consumerId for other topics", m.topics),
                ));
            }
            return Ok(m);
        }
        if self.members.lock().len() >= MAX_MEMBERS {
            return Err(ApiError::too_many(
                "too many HTTP consumers on this server",
                5,
            ));
        }
        let mut spec = SubscribeSpec::new(group, req.topics.clone());
        spec.auto_offset_reset = req.reset;
        spec.commit_interval = Duration::from_millis(200);
        spec.prefetch = 2048;
        let commit_interval = spec.commit_interval;
        let sub = self.client.driver().subscribe(spec).await?;
        let mut topics = req.topics.clone();
        topics.sort();
        let m = Arc::new(Member {
            group: group.to_string(),
            id: id.to_string(),
            owner: owner.to_string(),
            topics,
            buffer: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            space: Notify::new(),
            assigned: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            held: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(Instant::now()),
            stop: CancellationToken::new(),
            pump: Mutex::new(None),
        });
        let task = tokio::spawn(m.clone().pump(sub, commit_interval));
        *m.pump.lock() = Some(task);
        let raced = {
            let mut all = self.members.lock();
            match all.get(&key) {
                Some(existing) => Some(existing.clone()),
                None => {
                    all.insert(key, m.clone());
                    None
                }
            }
        };
        if let Some(existing) = raced {
            m.close().await;
            return Ok(existing);
        }
        Ok(m)
    }

    /// Long-polls up to `req.wait` for records of `group` as consumer `id`.
    pub async fn fetch(
        &self,
        group: &str,
        id: &str,
        owner: &str,
        req: FetchRequest,
    ) -> Result<Vec<Fetched>, ApiError> {
        let m = self.member(group, id, owner, &req).await?;
        m.touch();
        let deadline = tokio::time::Instant::now() + req.wait;
        let got = m.take(req.max_records, deadline, req.visibility).await;
        m.touch();
        if got.is_empty() {
            if let Some(e) = m.failed.lock().take() {
                return Err(ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    format!("backend fetch failed: {e}"),
                ));
            }
        }
        Ok(got
            .into_iter()
            .map(|delivery| Fetched { delivery })
            .collect())
    }

    /// Acks the listed records held by consumer `id`; returns those it did not hold
    /// (never fetched, already committed, or expired and handed out again).
    pub fn commit(
        &self,
        group: &str,
        id: &str,
        owner: &str,
        records: &[(String, u32, u64)],
    ) -> Result<Vec<(String, u32, u64)>, ApiError> {
        let m = self.get(group, id, owner)?;
        m.touch();
        let mut missing = Vec::new();
        let mut held = m.held.lock();
        for (t, p, o) in records {
            let key: Key = (Arc::from(t.as_str()), *p, *o);
            match held.remove(&key) {
                Some(h) => h.ack.ack(),
                None => missing.push((t.clone(), *p, *o)),
            }
        }
        Ok(missing)
    }

    fn get(&self, group: &str, id: &str, owner: &str) -> Result<Arc<Member>, ApiError> {
        let m = self
            .members
            .lock()
            .get(&(group.to_string(), id.to_string()))
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "consumer {id:?} of group {group:?} not found (it may have timed out)"
                ))
            })?;
        if m.owner != owner {
            return Err(ApiError::forbidden(
                "this consumer belongs to another token",
            ));
        }
        Ok(m)
    }

    /// Removes consumer `id`: uncommitted records come back to the group.
    pub async fn leave(&self, group: &str, id: &str, owner: &str) -> Result<(), ApiError> {
        let m = self.get(group, id, owner)?;
        self.members
            .lock()
            .remove(&(group.to_string(), id.to_string()));
        m.close().await;
        Ok(())
    }

    /// One sweep: expires overdue records and removes idle members.
    pub async fn sweep(&self) {
        let now = Instant::now();
        let all = self.list();
        for m in all {
            let n = m.expire(now);
            if n > 0 {
                tracing::debug!(group = %m.group, member = %m.id, n, "visibility timeout: redelivering");
                metrics::counter!("courier_http_redelivered_total").increment(n as u64);
            }
            if m.idle() > self.member_timeout {
                let key = (m.group.clone(), m.id.clone());
                self.members.lock().remove(&key);
                tracing::info!(group = %m.group, member = %m.id, "HTTP consumer timed out; leaving group");
                m.close().await;
            }
        }
    }

    /// Every member leaves (server shutdown).
    pub async fn close_all(&self) {
        let all: Vec<_> = self.members.lock().drain().map(|(_, m)| m).collect();
        for m in all {
            m.close().await;
        }
    }
}
