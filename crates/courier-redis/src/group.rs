//! Group membership and partition ownership by leases.
//!
//! Every member heartbeats into the group's member set (expiry on the server's clock)
//! and computes the same assignment from the same live-member list: partitions in
//! (topic, number) order go to the least-loaded live member subscribing the topic,
//! ties by member id. A member owns a partition only while it holds the partition's
//! lease (`SET NX PX`, renewed by heartbeats, released on hand-over), so one member
//! reads a partition at a time; a crashed member's leases and membership expire after
//! the session timeout and the others take its partitions over. On takeover the new
//! owner claims the partition's whole pending list (`XAUTOCLAIM`) and re-reads it in
//! order before new entries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_core::{Error, Result};
use redis::aio::ConnectionManager;
use redis::Value;

use crate::admin::{self, Admin};
use crate::codec;
use crate::keys::Keys;
use crate::state::{Event, Part, Shared, Tp};
use crate::{redis_error, resp};

/// Heartbeat: drops expired members, refreshes (or removes, when leaving) this one,
/// returns the live members with their topics (flat `member, topics, …`).
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, m in ipairs(dead) do redis.call('HDEL', KEYS[2], m) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
return redis.call('HGETALL', KEYS[2])
";

/// Renews a lease this member holds; 0 when it is lost.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Releases a lease this member holds.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// How often membership and assignment are checked.
const TICK: Duration = Duration::from_millis(200);
/// Pending entries claimed per `XAUTOCLAIM` call on takeover.
const CLAIM_PAGE: usize = 1000;

/// The partitions `me` should own: (topic, number) in order, each to the
/// least-loaded live member subscribing its topic (ties by member id).
pub(crate) fn assign(
    me: &str,
    members: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
) -> BTreeSet<(String, u32)> {
    let mut load: BTreeMap<&str, usize> = members.keys().map(|m| (m.as_str(), 0)).collect();
    let mut mine = BTreeSet::new();
    for (topic, n) in partitions {
        let candidates: Vec<&str> = members
            .iter()
            .filter(|(_, ts)| ts.contains(topic))
            .map(|(m, _)| m.as_str())
            .collect();
        for p in 0..*n {
            let Some(owner) = candidates
                .iter()
                .min_by_key(|m| (load.get(*m).copied().unwrap_or(0), **m))
                .copied()
            else {
                break;
            };
            *load.entry(owner).or_default() += 1;
            if owner == me {
                mine.insert((topic.clone(), p));
            }
        }
    }
    mine
}

/// Runs one member's membership: heartbeats, lease renewal, hand-over and takeover.
pub(crate) struct Coordinator {
    pub shared: Arc<Shared>,
    pub conn: ConnectionManager,
    pub admin: Arc<Admin>,
    pub group: String,
    pub member: String,
    pub topics: Vec<String>,
    pub session: Duration,
    pub revoke_timeout: Duration,
}

impl Coordinator {
    fn keys(&self) -> &Keys {
        self.admin.keys()
    }

    pub(crate) async fn run(mut self) {
        let mut last_renew = Instant::now();
        let renew_every = (self.session / 3).max(Duration::from_millis(50));
        while !self.shared.is_leaving() {
            let shared = self.shared.clone();
            let wake = shared.flow.wake_coordinator.notified();
            if last_renew.elapsed() >= renew_every {
                match self.renew().await {
                    Ok(()) => last_renew = Instant::now(),
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                }
            }
            if self.shared.is_closed() {
                // Stopping: keep the leases alive until the reader is done.
            } else if let Err(e) = self.rebalance().await {
                tracing::warn!(error = %e, group = %self.group, "rebalance failed; retrying");
            }
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        self.leave().await;
    }

    async fn heartbeat(&mut self, leaving: bool) -> Result<BTreeMap<String, BTreeSet<String>>> {
        let reply: Value = redis::cmd("EVAL")
            .arg(HEARTBEAT)
            .arg(2)
            .arg(self.keys().members(&self.group))
            .arg(self.keys().member_topics(&self.group))
            .arg(&self.member)
            .arg(self.session.as_millis() as u64)
            .arg(self.topics.join(","))
            .arg(if leaving { "1" } else { "0" })
            .query_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        Ok(resp::pairs(&reply)
            .into_iter()
            .filter_map(|(m, t)| {
                let m = String::from_utf8_lossy(resp::bytes(m)?).into_owned();
                let t = String::from_utf8_lossy(resp::bytes(t)?).into_owned();
                Some((m, admin::split_topics(&t).into_iter().collect()))
            })
            .collect())
    }

    /// Renews every held lease; partitions whose lease was lost are dropped at once
    /// (their deliveries become stale; another member owns them now).
    async fn renew(&mut self) -> Result<()> {
        let held: Vec<(Tp, String)> = self
            .shared
            .parts()
            .keys()
            .map(|tp| (tp.clone(), self.keys().lease(&self.group, &tp.0, tp.1)))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (_, lease) in &held {
            pipe.cmd("EVAL")
                .arg(RENEW)
                .arg(1)
                .arg(lease)
                .arg(&self.member)
                .arg(self.session.as_millis() as u64);
        }
        let renewed: Vec<i64> = pipe
            .query_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        let mut lost = false;
        let mut parts = self.shared.parts();
        for ((tp, _), ok) in held.iter().zip(renewed) {
            if ok == 0 {
                if let Some(p) = parts.remove(tp) {
                    tracing::warn!(topic = %tp.0, partition = tp.1, "lease lost");
                    self.shared.drop_outstanding(&p);
                    lost = true;
                }
            }
        }
        drop(parts);
        if lost {
            self.assignment_changed();
        }
        Ok(())
    }

    fn assignment_changed(&self) {
        let _ = self.shared.events.try_send(Event::Assigned);
        self.shared.flow.wake_reader.notify_one();
    }

    async fn rebalance(&mut self) -> Result<()> {
        let members = self.heartbeat(false).await?;
        let all_topics: BTreeSet<String> = members.values().flatten().cloned().collect();
        let names: Vec<String> = all_topics.into_iter().collect();
        let specs = self.admin.specs(&names).await?;
        let partitions: BTreeMap<String, u32> = names
            .into_iter()
            .zip(specs)
            .filter_map(|(t, s)| s.map(|s| (t, s.partitions)))
            .collect();
        let target = assign(&self.member, &members, &partitions);

        // Hand over what is no longer ours once it is settled (or at the deadline).
        let now = Instant::now();
        let mut release = Vec::new();
        let mut changed = false;
        {
            let mut parts = self.shared.parts();
            for (tp, p) in parts.iter_mut() {
                let wanted = target.contains(&(tp.0.to_string(), tp.1));
                let unsettled = !p.book().outstanding.is_empty();
                match p.revoking {
                    None if !wanted => {
                        p.set_revoking(now + self.revoke_timeout);
                        changed = true;
                    }
                    Some(deadline) if !p.in_read && (!unsettled || now >= deadline) => {
                        if unsettled {
                            tracing::warn!(topic = %tp.0, partition = tp.1,
                                "revoke timeout: unsettled messages will be redelivered");
                        }
                        release.push(tp.clone());
                    }
                    _ => {}
                }
            }
        }
        for tp in release {
            let part = self.shared.parts().remove(&tp);
            if let Some(p) = part {
                self.shared.drop_outstanding(&p);
                self.release(&tp, &p).await;
                changed = true;
            }
        }

        // Take over what is ours and free.
        let owned: BTreeSet<(String, u32)> = self
            .shared
            .parts()
            .keys()
            .map(|(t, p)| (t.to_string(), *p))
            .collect();
        for (topic, p) in target.difference(&owned) {
            match self.acquire(topic, *p).await {
                Ok(true) => changed = true,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, %topic, partition = p, "takeover failed"),
            }
        }
        if changed {
            self.assignment_changed();
        }
        Ok(())
    }

    /// Sends the partition's last acks and gives its lease up.
    async fn release(&mut self, tp: &Tp, part: &Part) {
        let mut pipe = redis::pipe();
        let acked = std::mem::take(&mut part.book().acked);
        if !acked.is_empty() {
            crate::reader::push_xack(&mut pipe, &part.key, &self.group, &acked);
        }
        pipe.cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(self.keys().lease(&self.group, &tp.0, tp.1))
            .arg(&self.member)
            .ignore();
        if let Err(e) = pipe.query_async::<()>(&mut self.conn).await {
            tracing::warn!(error = %e, topic = %tp.0, partition = tp.1,
                "release failed; the lease expires after the session timeout");
        }
    }

    /// Takes the lease of a partition, claims its pending list and starts reading it.
    async fn acquire(&mut self, topic: &str, partition: u32) -> Result<bool> {
        let lease = self.keys().lease(&self.group, topic, partition);
        let got: Option<String> = redis::cmd("SET")
            .arg(&lease)
            .arg(&self.member)
            .arg("NX")
            .arg("PX")
            .arg(self.session.as_millis() as u64)
            .query_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        if got.is_none() {
            return Ok(false);
        }
        let key = self.keys().stream(topic, partition);
        // Partitions added after the member joined start at their beginning.
        admin::ensure_group(&self.conn, &key, &self.group, "0").await?;
        let claimed = self.claim_all(&key).await?;
        self.forget_idle_consumers(&key).await;
        let part = Part::new(key, self.shared.new_epoch(), &self.shared);
        part.book()
            .attempts
            .extend(claimed.into_iter().map(|o| (o, 2)));
        tracing::debug!(%topic, partition, member = %self.member, "partition acquired");
        self.shared
            .parts()
            .insert((Arc::from(topic), partition), part);
        Ok(true)
    }

    /// Moves every pending entry of the stream to this member (the previous owner is
    /// gone or handed over); returns their offsets.
    async fn claim_all(&mut self, key: &str) -> Result<Vec<u64>> {
        let mut cursor = "0-0".to_string();
        let mut claimed = Vec::new();
        loop {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(key)
                .arg(&self.group)
                .arg(&self.member)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(CLAIM_PAGE)
                .arg("JUSTID")
                .query_async(&mut self.conn)
                .await
                .map_err(redis_error)?;
            let parts = resp::items(&reply);
            let next = parts
                .first()
                .and_then(resp::bytes)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .ok_or_else(|| Error::backend(crate::BACKEND, "unexpected XAUTOCLAIM reply"))?;
            if let Some(ids) = parts.get(1) {
                claimed.extend(
                    resp::items(ids)
                        .iter()
                        .filter_map(|i| resp::bytes(i).and_then(codec::offset_of)),
                );
            }
            if next == "0-0" {
                return Ok(claimed);
            }
            cursor = next;
        }
    }

    /// Deletes consumers of the stream's group that have nothing pending (previous
    /// owners), so the group does not accumulate one consumer per member ever started.
    async fn forget_idle_consumers(&mut self, key: &str) {
        let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(key)
            .arg(&self.group)
            .query_async(&mut self.conn)
            .await;
        let Ok(reply) = reply else { return };
        let mut pipe = redis::pipe();
        let mut any = false;
        for c in resp::items(&reply) {
            let name = resp::field(c, "name").and_then(resp::bytes);
            let pending = resp::field(c, "pending").and_then(resp::int).unwrap_or(1);
            if let Some(name) = name {
                if pending == 0 && name != self.member.as_bytes() {
                    pipe.cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(key)
                        .arg(&self.group)
                        .arg(name)
                        .ignore();
                    any = true;
                }
            }
        }
        if any {
            let _ = pipe.query_async::<()>(&mut self.conn).await;
        }
    }

    /// Leaves the group: last acks, leases released, membership removed.
    async fn leave(&mut self) {
        let parts: Vec<(Tp, Part)> = self.shared.parts().drain().collect();
        for (tp, p) in &parts {
            self.release(tp, p).await;
        }
        if let Err(e) = self.heartbeat(true).await {
            tracing::warn!(error = %e, "leaving the group failed; membership expires after the session timeout");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(list: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        list.iter()
            .map(|(m, ts)| (m.to_string(), ts.iter().map(|t| t.to_string()).collect()))
            .collect()
    }

    #[test]
    fn partitions_spread_evenly_and_disjointly() {
        let m = members(&[("a", &["t", "u"]), ("b", &["t", "u"]), ("c", &["t", "u"])]);
        let parts: BTreeMap<String, u32> = [("t".to_string(), 4), ("u".to_string(), 3)].into();
        let all: Vec<BTreeSet<(String, u32)>> = ["a", "b", "c"]
            .iter()
            .map(|me| assign(me, &m, &parts))
            .collect();
        let sizes: Vec<usize> = all.iter().map(|s| s.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 7);
        assert!(sizes.iter().all(|s| (2..=3).contains(s)), "{sizes:?}");
        for i in 0..3 {
            for j in (i + 1)..3 {
                assert!(all[i].is_disjoint(&all[j]));
            }
        }
    }

    #[test]
    fn only_subscribers_of_a_topic_get_its_partitions() {
        let m = members(&[("a", &["t"]), ("b", &["u"])]);
        let parts: BTreeMap<String, u32> = [("t".to_string(), 2), ("u".to_string(), 2)].into();
        assert_eq!(
            assign("a", &m, &parts),
            [("t".to_string(), 0), ("t".to_string(), 1)].into()
        );
        assert_eq!(assign("b", &m, &parts).len(), 2);
        assert!(assign("c", &m, &parts).is_empty());
    }
}
