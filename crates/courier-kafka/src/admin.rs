//! Topic and group administration over librdkafka's `AdminClient` and group APIs.

use std::collections::BTreeMap;
use std::time::Duration;

use courier_core::{
    Error, GroupInfo, GroupOffset, Headers, MemberInfo, PartitionInfo, Record, ResetTo, Result,
    TopicInfo, TopicPartition, TopicSpec, HEADER_MESSAGE_ID,
};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

use crate::offsets;
use crate::BACKEND;

const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read by position waits for more after an end-of-partition event.
const EOF_QUIET: Duration = Duration::from_millis(200);

/// Admin operations; blocking librdkafka calls run on the blocking pool.
pub(crate) struct Admin {
    client: AdminClient<DefaultClientContext>,
    config: ClientConfig,
}

fn opts() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(TIMEOUT))
}

fn backend(e: impl std::fmt::Display) -> Error {
    Error::backend(BACKEND, e)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(backend)?
}

impl Admin {
    pub(crate) fn new(config: ClientConfig) -> Result<Self> {
        let client = config.create().map_err(|e| Error::connection(BACKEND, e))?;
        Ok(Self { client, config })
    }

    /// Partition ids of `topic` (`None` if the broker does not know it).
    pub(crate) async fn partition_ids(&self, topic: &str) -> Result<Option<Vec<i32>>> {
        let config = self.config.clone();
        let topic = topic.to_string();
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(backend)?;
            let md = c
                .fetch_metadata(Some(&topic), TIMEOUT)
                .map_err(|e| Error::connection(BACKEND, e))?;
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .and_then(|t| {
                    (t.error().is_none() && !t.partitions().is_empty())
                        .then(|| t.partitions().iter().map(|p| p.id()).collect())
                }))
        })
        .await
    }

    pub(crate) async fn health(&self) -> Result<()> {
        let config = self.config.clone();
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(backend)?;
            c.fetch_metadata(None, Duration::from_secs(5))
                .map(|_| ())
                .map_err(|e| Error::connection(BACKEND, e))
        })
        .await
    }

    pub(crate) async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        let mut settings: Vec<(String, String)> = Vec::new();
        if let Some(ms) = spec.retention_ms {
            settings.push(("retention.ms".into(), ms.to_string()));
        }
        if let Some(b) = spec.retention_bytes {
            settings.push(("retention.bytes".into(), b.to_string()));
        }
        if let Some(m) = spec.max_message_size {
            settings.push(("max.message.bytes".into(), m.to_string()));
        }
        for (k, v) in &spec.config {
            settings.push((k.clone(), v.clone()));
        }
        let mut topic = NewTopic::new(
            &spec.name,
            spec.partitions.max(1) as i32,
            TopicReplication::Fixed(i32::from(spec.replication_factor.max(1))),
        );
        for (k, v) in &settings {
            topic = topic.set(k, v);
        }
        let results = self
            .client
            .create_topics([&topic], &opts())
            .await
            .map_err(backend)?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    return Err(Error::TopicExists(name))
                }
                Err((name, code)) => return Err(backend(format!("create {name}: {code}"))),
            }
        }
        // Creation is asynchronous on the broker: wait until metadata shows it.
        for _ in 0..100 {
            if self.partition_ids(&spec.name).await?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub(crate) async fn delete_topic(&self, name: &str) -> Result<()> {
        let results = self
            .client
            .delete_topics(&[name], &opts())
            .await
            .map_err(backend)?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((n, RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                    return Err(Error::TopicNotFound(n))
                }
                Err((n, code)) => return Err(backend(format!("delete {n}: {code}"))),
            }
        }
        for _ in 0..100 {
            if self.partition_ids(name).await?.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub(crate) async fn list_topics(&self) -> Result<Vec<String>> {
        let config = self.config.clone();
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(backend)?;
            let md = c
                .fetch_metadata(None, TIMEOUT)
                .map_err(|e| Error::connection(BACKEND, e))?;
            let mut names: Vec<String> = md
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.name().starts_with("__"))
                .map(|t| t.name().to_string())
                .collect();
            names.sort();
            Ok(names)
        })
        .await
    }

    /// Up to `max` records of `topic`/`partition` from `from` on (from the low
    /// watermark when `from` was deleted): a consumer without a group, assigned at
    /// the offset, polled until `max` records or the high watermark.
    pub(crate) async fn read_records(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        let mut config = self.config.clone();
        config
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        // librdkafka's consumer wants a group id even when it only `assign`s; this one
        // never joins (no subscribe) and never commits.
        config.set("group.id", "__courier.read-by-position");
        let topic = topic.to_string();
        let max = max.max(1);
        blocking(move || {
            use rdkafka::message::{Headers as _, Message as _};
            let c: BaseConsumer = config.create().map_err(backend)?;
            let (lo, hi) = c
                .fetch_watermarks(&topic, partition as i32, TIMEOUT)
                .map_err(|e| Error::connection(BACKEND, e))?;
            let start = (from.min(i64::MAX as u64) as i64).max(lo);
            let mut out = Vec::new();
            if start >= hi {
                return Ok(out);
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition as i32, Offset::Offset(start))
                .map_err(backend)?;
            c.assign(&tpl).map_err(backend)?;
            let deadline = std::time::Instant::now() + TIMEOUT;
            // The read ends after an end-of-partition event followed by a quiet poll
            // or another such event, not at the watermark above: tansu reports a watermark inside a freshly
            // written multi-record batch, and raises end-of-partition mid-way too.
            let mut eof = false;
            while out.len() < max {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(Error::backend(BACKEND, "read by position timed out"));
                }
                let wait = if eof {
                    EOF_QUIET
                } else {
                    left.min(Duration::from_millis(500))
                };
                let m = match c.poll(wait) {
                    None if eof => break,
                    None => continue,
                    // Two in a row with no record between: the end.
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) if eof => break,
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                        eof = true;
                        continue;
                    }
                    Some(Err(e)) => return Err(backend(e)),
                    Some(Ok(m)) => m,
                };
                let offset = m.offset();
                let mut headers = Headers::new();
                let mut id = String::new();
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        let value = h
                            .value
                            .map(bytes::Bytes::copy_from_slice)
                            .unwrap_or_default();
                        if h.key == HEADER_MESSAGE_ID {
                            id = String::from_utf8_lossy(&value).into_owned();
                        } else {
                            headers.insert(h.key, value);
                        }
                    }
                }
                out.push((
                    offset.max(0) as u64,
                    Record {
                        topic: topic.clone(),
                        partition: Some(partition),
                        id,
                        key: m.key().map(bytes::Bytes::copy_from_slice),
                        value: m
                            .payload()
                            .map(bytes::Bytes::copy_from_slice)
                            .unwrap_or_default(),
                        headers,
                        timestamp: m.timestamp().to_millis().unwrap_or(0),
                    },
                ));
                eof = false;
            }
            Ok(out)
        })
        .await
    }

    pub(crate) async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let config = self.config.clone();
        let topic = name.to_string();
        let (partitions, replication) = blocking(move || {
            let c: BaseConsumer = config.create().map_err(backend)?;
            let md = c
                .fetch_metadata(Some(&topic), TIMEOUT)
                .map_err(|e| Error::connection(BACKEND, e))?;
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
                .ok_or_else(|| Error::TopicNotFound(topic.clone()))?;
            let ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
            let replication = t.partitions()[0].replicas().len().max(1) as u16;
            let ext = offsets::extents(&config, &topic, &ids).map_err(backend)?;
            let parts = ids
                .iter()
                .zip(ext)
                .map(|(id, (lo, hi))| PartitionInfo {
                    partition: *id as u32,
                    start_offset: lo.max(0) as u64,
                    end_offset: hi.max(0) as u64,
                })
                .collect::<Vec<_>>();
            Ok((parts, replication))
        })
        .await?;
        let mut partitions = partitions;
        partitions.sort_by_key(|p| p.partition);
        // Not every broker answers DescribeConfigs; the extents above are what matter.
        let mut config = BTreeMap::new();
        if let Ok(results) = self
            .client
            .describe_configs([&ResourceSpecifier::Topic(name)], &opts())
            .await
        {
            for r in results.into_iter().flatten() {
                for e in r.entries {
                    if let Some(v) = e.value {
                        config.insert(e.name, v);
                    }
                }
            }
        }
        Ok(TopicInfo {
            name: name.to_string(),
            partitions,
            replication_factor: replication,
            config,
        })
    }

    pub(crate) async fn update_topic_config(
        &self,
        name: &str,
        config: BTreeMap<String, String>,
    ) -> Result<()> {
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(name));
        for (k, v) in &config {
            alter = alter.set(k, v);
        }
        let results = self
            .client
            .alter_configs([&alter], &opts())
            .await
            .map_err(backend)?;
        for r in results {
            if let Err((_, code)) = r {
                return Err(match code {
                    RDKafkaErrorCode::UnknownTopicOrPartition => Error::TopicNotFound(name.into()),
                    c => backend(format!("alter config of {name}: {c}")),
                });
            }
        }
        Ok(())
    }

    pub(crate) async fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        let np = NewPartitions::new(name, total as usize);
        let results = self
            .client
            .create_partitions([&np], &opts())
            .await
            .map_err(backend)?;
        for r in results {
            if let Err((_, code)) = r {
                return Err(match code {
                    RDKafkaErrorCode::UnknownTopicOrPartition => Error::TopicNotFound(name.into()),
                    c => backend(format!("add partitions to {name}: {c}")),
                });
            }
        }
        Ok(())
    }

    pub(crate) async fn list_groups(&self) -> Result<Vec<String>> {
        let config = self.config.clone();
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(backend)?;
            let groups = c
                .fetch_group_list(None, TIMEOUT)
                .map_err(|e| Error::connection(BACKEND, e))?;
            let mut names: Vec<String> = groups
                .groups()
                .iter()
                .filter(|g| g.state() != "Dead")
                .map(|g| g.name().to_string())
                .collect();
            names.sort();
            names.dedup();
            Ok(names)
        })
        .await
    }

    /// Members from DescribeGroups; committed offsets for every partition of every
    /// topic (OffsetFetch per topic, since librdkafka has no "all topics" form here),
    /// with lag against the exact end.
    pub(crate) async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        let config = self.config.clone();
        let group = group.to_string();
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(backend)?;
            let list = c
                .fetch_group_list(Some(&group), TIMEOUT)
                .map_err(|e| Error::connection(BACKEND, e))?;
            let info = list.groups().iter().find(|g| g.name() == group);
            let members: Vec<MemberInfo> = info
                .map(|g| {
                    g.members()
                        .iter()
                        .map(|m| MemberInfo {
                            member_id: m.id().to_string(),
                            assignment: m.assignment().map(parse_assignment).unwrap_or_default(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let md = c
                .fetch_metadata(None, TIMEOUT)
                .map_err(|e| Error::connection(BACKEND, e))?;
            let mut tpl = TopicPartitionList::new();
            for t in md.topics() {
                if t.name().starts_with("__") || t.error().is_some() {
                    continue;
                }
                for p in t.partitions() {
                    tpl.add_partition(t.name(), p.id());
                }
            }
            let mut gc = config.clone();
            gc.set("group.id", &group)
                .set("enable.auto.commit", "false");
            let gconsumer: BaseConsumer = gc.create().map_err(backend)?;
            let committed = gconsumer
                .committed_offsets(tpl, TIMEOUT)
                .map_err(|e| Error::connection(BACKEND, e))?;
            let mut by_topic: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
            for e in committed.elements() {
                if let Offset::Offset(o) = e.offset() {
                    by_topic
                        .entry(e.topic().to_string())
                        .or_default()
                        .push((e.partition(), o));
                }
            }
            let known = info.is_some_and(|g| g.state() != "Dead");
            if !known && by_topic.is_empty() {
                return Err(Error::GroupNotFound(group.clone()));
            }
            let mut offsets = Vec::new();
            for (topic, parts) in by_topic {
                let ids: Vec<i32> = parts.iter().map(|(p, _)| *p).collect();
                let ext = offsets::extents(&config, &topic, &ids).map_err(backend)?;
                for ((p, o), (_, end)) in parts.into_iter().zip(ext) {
                    offsets.push(GroupOffset {
                        topic: topic.clone(),
                        partition: p as u32,
                        committed: Some(o.max(0) as u64),
                        end_offset: end.max(0) as u64,
                        lag: (end - o).max(0) as u64,
                        pending: None,
                    });
                }
            }
            Ok(GroupInfo {
                group: group.clone(),
                members,
                offsets,
            })
        })
        .await
    }

    /// Commits the new position for the group (the group must have no live members,
    /// as with Kafka's own tool).
    pub(crate) async fn reset_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<()> {
        let ids = self
            .partition_ids(topic)
            .await?
            .ok_or_else(|| Error::TopicNotFound(topic.to_string()))?;
        let config = self.config.clone();
        let group = group.to_string();
        let topic = topic.to_string();
        blocking(move || {
            let mut gc = config.clone();
            gc.set("group.id", &group)
                .set("enable.auto.commit", "false");
            let c: BaseConsumer = gc.create().map_err(backend)?;
            let mut tpl = TopicPartitionList::new();
            match to {
                ResetTo::Offset(o) => {
                    for p in &ids {
                        tpl.add_partition_offset(&topic, *p, Offset::Offset(o as i64))
                            .map_err(backend)?;
                    }
                }
                ResetTo::Earliest | ResetTo::Latest => {
                    let ext = offsets::extents(&config, &topic, &ids).map_err(backend)?;
                    for (p, (lo, hi)) in ids.iter().zip(ext) {
                        let o = if to == ResetTo::Earliest { lo } else { hi };
                        tpl.add_partition_offset(&topic, *p, Offset::Offset(o))
                            .map_err(backend)?;
                    }
                }
                ResetTo::Timestamp(ts) => {
                    let mut q = TopicPartitionList::new();
                    for p in &ids {
                        q.add_partition_offset(&topic, *p, Offset::Offset(ts))
                            .map_err(backend)?;
                    }
                    let found = c.offsets_for_times(q, TIMEOUT).map_err(backend)?;
                    let ext = offsets::extents(&config, &topic, &ids).map_err(backend)?;
                    for (e, (_, hi)) in found.elements().iter().zip(ext) {
                        let o = match e.offset() {
                            Offset::Offset(o) => o,
                            _ => hi,
                        };
                        tpl.add_partition_offset(&topic, e.partition(), Offset::Offset(o))
                            .map_err(backend)?;
                    }
                }
            }
            c.commit(&tpl, CommitMode::Sync).map_err(backend)
        })
        .await
    }
}

/// Decodes a consumer-protocol member assignment (version, [topic, [partition]]).
fn parse_assignment(bytes: &[u8]) -> Vec<TopicPartition> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    fn i16_(b: &mut &[u8]) -> Option<i16> {
        take(b, 2).map(|x| i16::from_be_bytes([x[0], x[1]]))
    }
    fn i32_(b: &mut &[u8]) -> Option<i32> {
        take(b, 4).map(|x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    }
    let mut out = Vec::new();
    let mut b = bytes;
    let parse = |b: &mut &[u8], out: &mut Vec<TopicPartition>| -> Option<()> {
        i16_(b)?;
        let topics = i32_(b)?;
        for _ in 0..topics.max(0) {
            let len = i16_(b)?;
            let name = String::from_utf8_lossy(take(b, len.max(0) as usize)?).into_owned();
            let n = i32_(b)?;
            for _ in 0..n.max(0) {
                out.push(TopicPartition::new(&name, i32_(b)?.max(0) as u32));
            }
        }
        Some(())
    };
    let _ = parse(&mut b, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_consumer_protocol_assignment() {
        let mut b = vec![
            0u8, 0, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3,
        ];
        b.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            parse_assignment(&b),
            vec![TopicPartition::new("t", 0), TopicPartition::new("t", 3)]
        );
        assert!(parse_assignment(&[0]).is_empty());
    }
}
