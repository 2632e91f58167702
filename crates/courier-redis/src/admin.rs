//! Topic and group administration. A topic's spec (partitions, retention, config) is
//! one field of the `{prefix}topics` hash; its data is one stream per partition.

use std::collections::BTreeMap;

use courier_core::{
    Error, GroupInfo, GroupOffset, MemberInfo, PartitionInfo, Record, ResetTo, Result, TopicInfo,
    TopicPartition, TopicSpec,
};
use redis::aio::ConnectionManager;
use redis::{RedisResult, Value};

use crate::codec::{self, FIELD_META};
use crate::keys::Keys;
use crate::{redis_error, resp};

/// Topic config key: keep about this many entries per partition (`XADD MAXLEN ~`).
pub const RETENTION_MESSAGES: &str = "retention.messages";

/// What producers and consumers need to know about a topic.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TopicMeta {
    pub partitions: u32,
    /// `MAXLEN ~` bound applied on every add.
    pub max_len: Option<u64>,
    /// Entries older than this (by their stored timestamp) are trimmed.
    pub retention_ms: Option<i64>,
}

impl TopicMeta {
    fn of(spec: &TopicSpec) -> Self {
        Self {
            partitions: spec.partitions.max(1),
            max_len: spec
                .config
                .get(RETENTION_MESSAGES)
                .and_then(|v| v.parse().ok()),
            retention_ms: spec.retention_ms.filter(|ms| *ms > 0),
        }
    }
}

/// Admin operations over one connection.
pub(crate) struct Admin {
    conn: ConnectionManager,
    keys: Keys,
}

impl Admin {
    pub(crate) fn new(conn: ConnectionManager, keys: Keys) -> Self {
        Self { conn, keys }
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let mut c = self.conn.clone();
        cmd.query_async(&mut c).await.map_err(redis_error)
    }

    async fn pipeline(&self, pipe: &redis::Pipeline) -> Result<Vec<RedisResult<Value>>> {
        let mut c = self.conn.clone();
        pipe.query_async(&mut c).await.map_err(redis_error)
    }

    /// The stored spec of `topic`.
    pub(crate) async fn spec(&self, topic: &str) -> Result<Option<TopicSpec>> {
        let raw: Option<Vec<u8>> = self
            .query(redis::cmd("HGET").arg(self.keys.topics()).arg(topic))
            .await?;
        raw.map(|r| serde_json::from_slice(&r).map_err(Error::from))
            .transpose()
    }

    /// Specs of several topics at once (missing ones are `None`).
    pub(crate) async fn specs(&self, topics: &[String]) -> Result<Vec<Option<TopicSpec>>> {
        if topics.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<Vec<u8>>> = self
            .query(redis::cmd("HMGET").arg(self.keys.topics()).arg(topics))
            .await?;
        Ok(raw
            .into_iter()
            .map(|r| r.and_then(|r| serde_json::from_slice(&r).ok()))
            .collect())
    }

    /// The topic's meta, creating the topic with `partitions` when it does not exist.
    pub(crate) async fn meta_or_create(&self, topic: &str, partitions: u32) -> Result<TopicMeta> {
        if let Some(spec) = self.spec(topic).await? {
            return Ok(TopicMeta::of(&spec));
        }
        match self.create_topic(TopicSpec::new(topic, partitions)).await {
            Ok(()) | Err(Error::TopicExists(_)) => {}
            Err(e) => return Err(e),
        }
        self.spec(topic)
            .await?
            .map(|s| TopicMeta::of(&s))
            .ok_or_else(|| Error::TopicNotFound(topic.to_string()))
    }

    pub(crate) async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        if spec.partitions == 0 {
            return Err(Error::InvalidArgument(
                "partitions must be at least 1".into(),
            ));
        }
        if let Some(v) = spec.config.get(RETENTION_MESSAGES) {
            v.parse::<u64>().map_err(|_| {
                Error::InvalidArgument(format!("{RETENTION_MESSAGES} must be a number, not {v:?}"))
            })?;
        }
        let json = serde_json::to_vec(&spec)?;
        let created: bool = self
            .query(
                redis::cmd("HSETNX")
                    .arg(self.keys.topics())
                    .arg(&spec.name)
                    .arg(json),
            )
            .await?;
        if created {
            Ok(())
        } else {
            Err(Error::TopicExists(spec.name))
        }
    }

    pub(crate) async fn delete_topic(&self, name: &str) -> Result<()> {
        let spec = self
            .spec(name)
            .await?
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(self.keys.topics()).arg(name).ignore();
        for p in 0..spec.partitions {
            pipe.cmd("DEL").arg(self.keys.stream(name, p)).ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(redis_error)
    }

    pub(crate) async fn list_topics(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .query(redis::cmd("HKEYS").arg(self.keys.topics()))
            .await?;
        names.sort();
        Ok(names)
    }

    /// `(start, end)` offsets of each partition; a partition never written is (0, 0).
    async fn extents(&self, topic: &str, partitions: u32) -> Result<Vec<(u64, u64)>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for p in 0..partitions {
            pipe.cmd("XINFO")
                .arg("STREAM")
                .arg(self.keys.stream(topic, p));
        }
        let replies = self.pipeline(&pipe).await?;
        Ok(replies
            .into_iter()
            .map(|r| match r {
                Ok(info) => extent_of(&info),
                Err(_) => (0, 0),
            })
            .collect())
    }

    /// Up to `max` records of `topic`/`partition` from `offset` on (`XRANGE`, one
    /// round trip); from the first kept entry when `offset` was trimmed.
    pub(crate) async fn read_records(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        let reply: Value = self
            .query(
                redis::cmd("XRANGE")
                    .arg(self.keys.stream(topic, partition))
                    .arg(codec::id_of(offset))
                    .arg("+")
                    .arg("COUNT")
                    .arg(max.max(1)),
            )
            .await?;
        let Value::Array(entries) = reply else {
            return Ok(Vec::new());
        };
        Ok(entries
            .iter()
            .filter_map(crate::reader::entry_view)
            .filter_map(|(offset, fields)| {
                let r = crate::reader::record_of(topic, partition, fields?);
                if r.is_none() {
                    tracing::warn!(
                        topic,
                        partition,
                        offset,
                        "skipping a stream entry not in Courier's format"
                    );
                }
                Some((offset, r?))
            })
            .collect())
    }

    pub(crate) async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let spec = self
            .spec(name)
            .await?
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))?;
        let extents = self.extents(name, spec.partitions).await?;
        let mut config = spec.config.clone();
        if let Some(ms) = spec.retention_ms {
            config.insert("retention.ms".into(), ms.to_string());
        }
        Ok(TopicInfo {
            name: name.to_string(),
            partitions: extents
                .into_iter()
                .enumerate()
                .map(|(p, (start, end))| PartitionInfo {
                    partition: p as u32,
                    start_offset: start,
                    end_offset: end,
                })
                .collect(),
            replication_factor: spec.replication_factor,
            config,
        })
    }

    async fn update_spec(
        &self,
        name: &str,
        f: impl FnOnce(&mut TopicSpec) -> Result<()>,
    ) -> Result<()> {
        let mut spec = self
            .spec(name)
            .await?
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))?;
        f(&mut spec)?;
        let json = serde_json::to_vec(&spec)?;
        let _: i64 = self
            .query(
                redis::cmd("HSET")
                    .arg(self.keys.topics())
                    .arg(name)
                    .arg(json),
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn update_topic_config(
        &self,
        name: &str,
        config: BTreeMap<String, String>,
    ) -> Result<()> {
        if let Some(v) = config.get(RETENTION_MESSAGES) {
            v.parse::<u64>().map_err(|_| {
                Error::InvalidArgument(format!("{RETENTION_MESSAGES} must be a number, not {v:?}"))
            })?;
        }
        self.update_spec(name, |s| {
            s.config.extend(config);
            Ok(())
        })
        .await
    }

    pub(crate) async fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        self.update_spec(name, |s| {
            if total <= s.partitions {
                return Err(Error::InvalidArgument(format!(
                    "topic {name:?} has {} partitions; it can only grow",
                    s.partitions
                )));
            }
            s.partitions = total;
            Ok(())
        })
        .await
    }

    pub(crate) async fn list_groups(&self) -> Result<Vec<String>> {
        let mut groups: Vec<String> = self
            .query(redis::cmd("SMEMBERS").arg(self.keys.groups()))
            .await?;
        groups.sort();
        Ok(groups)
    }

    /// Live members of `group` with the topics each subscribes.
    pub(crate) async fn live_members(&self, group: &str) -> Result<Vec<(String, Vec<String>)>> {
        let (now, _): (u64, u64) = self.query(&redis::cmd("TIME")).await?;
        let now_ms = now * 1000;
        let live: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys.members(group))
                    .arg(now_ms)
                    .arg("+inf"),
            )
            .await?;
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let topics: Vec<Option<String>> = self
            .query(
                redis::cmd("HMGET")
                    .arg(self.keys.member_topics(group))
                    .arg(&live),
            )
            .await?;
        Ok(live
            .into_iter()
            .zip(topics)
            .map(|(m, t)| (m, split_topics(t.as_deref().unwrap_or(""))))
            .collect())
    }

    pub(crate) async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        let known: bool = self
            .query(redis::cmd("SISMEMBER").arg(self.keys.groups()).arg(group))
            .await?;
        if !known {
            return Err(Error::GroupNotFound(group.to_string()));
        }
        let mut topics: Vec<String> = self
            .query(redis::cmd("SMEMBERS").arg(self.keys.group_topics(group)))
            .await?;
        topics.sort();
        let specs = self.specs(&topics).await?;
        let mut offsets = Vec::new();
        let mut owners: BTreeMap<String, Vec<TopicPartition>> = BTreeMap::new();
        for (topic, spec) in topics.iter().zip(specs) {
            let Some(spec) = spec else { continue };
            let extents = self.extents(topic, spec.partitions).await?;
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for p in 0..spec.partitions {
                let key = self.keys.stream(topic, p);
                pipe.cmd("XINFO").arg("GROUPS").arg(&key);
                pipe.cmd("XPENDING").arg(&key).arg(group);
                pipe.cmd("GET").arg(self.keys.lease(group, topic, p));
            }
            let replies = self.pipeline(&pipe).await?;
            for (p, chunk) in replies.chunks(3).enumerate() {
                let p = p as u32;
                let end = extents.get(p as usize).map_or(0, |e| e.1);
                let position = match (&chunk[0], &chunk[1]) {
                    (Ok(groups), Ok(pending)) => group_position(groups, pending, group),
                    _ => None,
                };
                if let Ok(owner) = &chunk[2] {
                    if let Some(m) = resp::bytes(owner) {
                        owners
                            .entry(String::from_utf8_lossy(m).into_owned())
                            .or_default()
                            .push(TopicPartition::new(topic.as_str(), p));
                    }
                }
                let (committed, pending) = match position {
                    Some((c, n)) => (Some(c), Some(n)),
                    None => (None, None),
                };
                offsets.push(GroupOffset {
                    topic: topic.clone(),
                    partition: p,
                    committed,
                    end_offset: end,
                    lag: end.saturating_sub(committed.unwrap_or(0)),
                    pending,
                });
            }
        }
        let members = self
            .live_members(group)
            .await?
            .into_iter()
            .map(|(m, _)| MemberInfo {
                assignment: owners.remove(&m).unwrap_or_default(),
                member_id: m,
            })
            .collect();
        Ok(GroupInfo {
            group: group.to_string(),
            members,
            offsets,
        })
    }

    /// Moves the group's position on every partition of `topic`; refused while the
    /// group has live members (they would race the move). Pending entries are
    /// acknowledged, so the group reads exactly from the new position.
    pub(crate) async fn reset_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<()> {
        let spec = self
            .spec(topic)
            .await?
            .ok_or_else(|| Error::TopicNotFound(topic.to_string()))?;
        if !self.live_members(group).await?.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "group {group:?} has live members; stop them before resetting offsets"
            )));
        }
        let extents = self.extents(topic, spec.partitions).await?;
        for (p, (start, end)) in extents.into_iter().enumerate() {
            let p = p as u32;
            let key = self.keys.stream(topic, p);
            let target = match to {
                ResetTo::Earliest => start,
                ResetTo::Latest => end,
                ResetTo::Offset(o) => o.clamp(start, end),
                ResetTo::Timestamp(ts) => self.offset_for_time(&key, start, end, ts).await?,
            };
            ensure_group(&self.conn, &key, group, "0").await?;
            self.ack_all_pending(&key, group).await?;
            let _: () = self
                .query(
                    redis::cmd("XGROUP")
                        .arg("SETID")
                        .arg(&key)
                        .arg(group)
                        .arg(codec::id_before(target)),
                )
                .await?;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SADD").arg(self.keys.groups()).arg(group).ignore();
        pipe.cmd("SADD")
            .arg(self.keys.group_topics(group))
            .arg(topic)
            .ignore();
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(redis_error)
    }

    async fn ack_all_pending(&self, key: &str, group: &str) -> Result<()> {
        loop {
            let pending: Value = self
                .query(
                    redis::cmd("XPENDING")
                        .arg(key)
                        .arg(group)
                        .arg("-")
                        .arg("+")
                        .arg(1000),
                )
                .await?;
            let ids: Vec<Vec<u8>> = resp::items(&pending)
                .iter()
                .filter_map(|e| {
                    resp::items(e)
                        .first()
                        .and_then(resp::bytes)
                        .map(<[u8]>::to_vec)
                })
                .collect();
            if ids.is_empty() {
                return Ok(());
            }
            let _: i64 = self
                .query(redis::cmd("XACK").arg(key).arg(group).arg(&ids))
                .await?;
        }
    }

    /// First offset in `[start, end)` whose timestamp is ≥ `ts` (binary search; assumes
    /// timestamps grow with offsets, as they do for messages stamped on send).
    async fn offset_for_time(&self, key: &str, start: u64, end: u64, ts: i64) -> Result<u64> {
        let (mut lo, mut hi) = (start, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let entry: Value = self
                .query(
                    redis::cmd("XRANGE")
                        .arg(key)
                        .arg(codec::id_of(mid))
                        .arg("+")
                        .arg("COUNT")
                        .arg(1),
                )
                .await?;
            let Some((off, t)) = first_entry_time(&entry) else {
                hi = mid;
                continue;
            };
            if t >= ts {
                hi = mid;
            } else {
                lo = off + 1;
            }
        }
        Ok(lo)
    }
}

/// Offset and timestamp of the first entry of an `XRANGE` reply.
fn first_entry_time(reply: &Value) -> Option<(u64, i64)> {
    let entry = resp::items(reply).first()?;
    let parts = resp::items(entry);
    let off = codec::offset_of(resp::bytes(parts.first()?)?)?;
    let meta = resp::field(parts.get(1)?, FIELD_META).and_then(resp::bytes)?;
    let meta = codec::decode_meta(&bytes::Bytes::copy_from_slice(meta)).ok()?;
    Some((off, meta.timestamp))
}

/// `(start, end)` from an `XINFO STREAM` reply.
fn extent_of(info: &Value) -> (u64, u64) {
    let end = resp::field(info, "last-generated-id")
        .and_then(resp::bytes)
        .and_then(codec::offset_of)
        .map_or(0, |o| o + 1);
    let len = resp::field(info, "length").and_then(resp::int).unwrap_or(0) as u64;
    let start = resp::field(info, "first-entry")
        .map(resp::items)
        .and_then(|e| e.first())
        .and_then(resp::bytes)
        .and_then(codec::offset_of)
        .unwrap_or(end.saturating_sub(len));
    (start, end)
}

/// `(committed, pending)` of `group` from `XINFO GROUPS` and `XPENDING` (summary)
/// replies: the committed position is the oldest unacknowledged entry, or the one
/// after the last delivered when nothing is pending.
fn group_position(groups: &Value, pending: &Value, group: &str) -> Option<(u64, u64)> {
    let info = resp::items(groups)
        .iter()
        .find(|g| resp::field(g, "name").and_then(resp::bytes) == Some(group.as_bytes()))?;
    let last = resp::field(info, "last-delivered-id")
        .and_then(resp::bytes)
        .and_then(codec::offset_of)
        .map_or(0, |o| o + 1);
    let summary = resp::items(pending);
    let count = summary.first().and_then(resp::int).unwrap_or(0).max(0) as u64;
    let oldest = summary
        .get(1)
        .and_then(resp::bytes)
        .and_then(codec::offset_of);
    let committed = match oldest {
        Some(o) if count > 0 => o,
        _ => last,
    };
    Some((committed, count))
}

pub(crate) fn split_topics(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

/// Creates `group` on the stream `key` at `start` (`0` or `$`) unless it exists.
pub(crate) async fn ensure_group(
    conn: &ConnectionManager,
    key: &str,
    group: &str,
    start: &str,
) -> Result<()> {
    let mut c = conn.clone();
    let r: RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await;
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(redis_error(e)),
    }
}
