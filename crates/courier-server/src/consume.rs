//! HTTP consumer-group members (for services that cannot link Courier).
//!
//! Each `(group, consumerId)` is one real group member on the backend (a driver
//! subscription), so HTTP consumers split partitions with each other and with native
//! consumers exactly as on any backend. A fetch hands out deliveries and keeps their
//! settle handles; a commit acks them (the backend commits the contiguous acked
//! prefix in the background and on leave). A delivery not committed within its
//! visibility timeout is nacked and comes back; a member that stops fetching leaves
//! the group after `memberTimeoutMs`, and whatever it held comes back too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{Client, Delivery, OffsetReset};
use courier_core::{AckHandle, SubscribeSpec, Subscription};
use parking_lot::Mutex;

use crate::envelope::ApiError;

/// Identifies one held delivery.
type Key = (Arc<str>, u32, u64);

struct Held {
    ack: AckHandle,
    deadline: Instant,
}

/// One HTTP consumer instance in one group.
pub struct Member {
    /// Group id.
    pub group: String,
    /// Consumer instance id.
    pub id: String,
    /// Token name that created it; only that token may use it.
    pub owner: String,
    /// Subscribed topics.
    pub topics: Vec<String>,
    sub: tokio::sync::Mutex<Option<Box<dyn Subscription>>>,
    held: Mutex<HashMap<Key, Held>>,
    last_seen: Mutex<Instant>,
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
    pub async fn assignment(&self) -> Vec<courier::TopicPartition> {
        match self.sub.try_lock() {
            Ok(g) => g.as_ref().map(|s| s.assignment()).unwrap_or_default(),
            // A fetch is long-polling; report nothing rather than wait for it.
            Err(_) => Vec::new(),
        }
    }

    fn expire(&self, now: Instant) -> usize {
        let mut held = self.held.lock();
        let due: Vec<Key> = held
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            if let Some(h) = held.remove(k) {
                h.ack.nack(Duration::ZERO);
            }
        }
        due.len()
    }

    async fn close(&self) {
        // Held deliveries go back first, so the final commit stops before them.
        for (_, h) in self.held.lock().drain() {
            h.ack.nack(Duration::ZERO);
        }
        if let Some(mut sub) = self.sub.lock().await.take() {
            if let Err(e) = sub.close().await {
                tracing::warn!(group = %self.group, member = %self.id, error = %e, "leaving group failed");
            }
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
                return Err(ApiError::forbidden("this consumer belongs to another token"));
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
            return Err(ApiError::too_many("too many HTTP consumers on this server", 5));
        }
        let mut spec = SubscribeSpec::new(group, req.topics.clone());
        spec.auto_offset_reset = req.reset;
        spec.commit_interval = Duration::from_millis(200);
        spec.prefetch = 2048;
        let sub = self.client.driver().subscribe(spec).await?;
        let mut topics = req.topics.clone();
        topics.sort();
        let m = Arc::new(Member {
            group: group.to_string(),
            id: id.to_string(),
            owner: owner.to_string(),
            topics,
            sub: tokio::sync::Mutex::new(Some(sub)),
            held: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(Instant::now()),
        });
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
        let mut guard = m.sub.lock().await;
        let Some(sub) = guard.as_mut() else {
            return Err(ApiError::new(axum::http::StatusCode::CONFLICT, "consumer has left; fetch again to rejoin"));
        };
        let batch = match tokio::time::timeout(req.wait, sub.next_batch(req.max_records)).await {
            Err(_) => Vec::new(),
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => Vec::new(),
            Ok(Err(e)) => return Err(e.into()),
        };
        drop(guard);
        let deadline = Instant::now() + req.visibility;
        let mut out = Vec::with_capacity(batch.len());
        let mut held = m.held.lock();
        for mut d in batch {
            let Some(ack) = d.take_ack() else { continue };
            if ack.is_stale() {
                ack.discard();
                continue;
            }
            let key = (d.topic.clone(), d.partition, d.offset);
            if let Some(old) = held.insert(key, Held { ack, deadline }) {
                // Delivered again before it expired here (rewind): the new handle wins.
                old.ack.discard();
            }
            out.push(Fetched { delivery: d });
        }
        drop(held);
        m.touch();
        Ok(out)
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
            .ok_or_else(|| ApiError::not_found(format!("consumer {id:?} of group {group:?} not found (it may have timed out)")))?;
        if m.owner != owner {
            return Err(ApiError::forbidden("this consumer belongs to another token"));
        }
        Ok(m)
    }

    /// Removes consumer `id`: uncommitted records come back to the group.
    pub async fn leave(&self, group: &str, id: &str, owner: &str) -> Result<(), ApiError> {
        let m = self.get(group, id, owner)?;
        self.members.lock().remove(&(group.to_string(), id.to_string()));
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
