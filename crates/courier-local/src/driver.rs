//! [`LogDriver`]: a Courier driver over any [`LogStore`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use courier_core::{
    partition_for_key, Capabilities, Driver, Error, GroupInfo, GroupOffset, PartitionInfo, Receipt,
    Record, ResetTo, Result, SubscribeSpec, Subscription, TopicInfo, TopicPartition, TopicSpec,
};
use futures::future::try_join_all;

use crate::group::Group;
use crate::store::{LogStore, PartitionLog, Topic};
use crate::subscription::LocalSubscription;

pub(crate) struct Shared<S> {
    pub(crate) store: Arc<S>,
    default_partitions: u32,
    sticky: AtomicU32,
}

impl<S: LogStore> Shared<S> {
    pub(crate) fn rebalance(&self, group: &Group) {
        group.rebalance(|t| {
            self.store
                .topic(t)
                .map_or(0, |topic| topic.partitions.len() as u32)
        });
    }

    async fn topic_or_create(&self, name: &str) -> Result<Arc<Topic<S::Partition>>> {
        if let Some(t) = self.store.topic(name) {
            return Ok(t);
        }
        match self
            .store
            .create_topic(&TopicSpec::new(name, self.default_partitions))
            .await
        {
            Ok(()) | Err(Error::TopicExists(_)) => {}
            Err(e) => return Err(e),
        }
        self.store
            .topic(name)
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))
    }
}

/// A Courier driver over a partitioned log: `memory://` and `file://` both use it.
/// Topics are created on first use with the configured default partition count.
pub struct LogDriver<S: LogStore> {
    shared: Arc<Shared<S>>,
}

impl<S: LogStore> LogDriver<S> {
    /// A driver over `store`; implicitly created topics get `default_partitions`.
    pub fn new(store: Arc<S>, default_partitions: u32) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                default_partitions: default_partitions.max(1),
                sticky: AtomicU32::new(0),
            }),
        }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<S> {
        &self.shared.store
    }

    fn unknown_topic(name: &str) -> Error {
        Error::TopicNotFound(name.to_string())
    }
}

#[async_trait]
impl<S: LogStore> Driver for LogDriver<S> {
    fn name(&self) -> &'static str {
        self.shared.store.name()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable: self.shared.store.durable(),
            max_in_flight_publishes: 1,
            read_by_position: true,
            index_by_position: true,
            store_once: false,
            ..Capabilities::default()
        }
    }

    async fn publish(&self, batch: Vec<Record>) -> Result<Vec<Receipt>> {
        let total = batch.len();
        // Keyless records of one batch stick to one partition (Kafka's sticky
        // partitioner): bigger appends, still spread across batches.
        let sticky = self.shared.sticky.fetch_add(1, Ordering::Relaxed);
        // Batches almost always name one topic: a linear scan beats hashing strings.
        let mut topics: Vec<Arc<Topic<S::Partition>>> = Vec::new();
        let mut groups: BTreeMap<(usize, u32), Vec<(usize, Record)>> = BTreeMap::new();
        for (i, r) in batch.into_iter().enumerate() {
            let t = match topics.iter().position(|t| t.spec.name == r.topic) {
                Some(t) => t,
                None => {
                    topics.push(self.shared.topic_or_create(&r.topic).await?);
                    topics.len() - 1
                }
            };
            let n = topics[t].partitions.len() as u32;
            let p = match (r.partition, &r.key) {
                (Some(p), _) if p < n => p,
                (Some(p), _) => {
                    return Err(Error::InvalidArgument(format!(
                        "partition {p} out of range: topic {:?} has {n}",
                        r.topic
                    )))
                }
                (None, Some(k)) => partition_for_key(k, n),
                (None, None) => sticky % n,
            };
            groups.entry((t, p)).or_default().push((i, r));
        }
        let appends = groups.into_iter().map(|((t, p), items)| {
            let log = topics[t].partitions[p as usize].clone();
            let topic = topics[t].spec.name.clone();
            async move {
                let (idx, records): (Vec<usize>, Vec<Record>) = items.into_iter().unzip();
                let meta: Vec<(String, i64)> = records
                    .iter()
                    .map(|r| (r.id.clone(), r.timestamp))
                    .collect();
                let base = log.append(records).await?;
                Ok::<_, Error>(
                    idx.into_iter()
                        .zip(meta)
                        .enumerate()
                        .map(|(k, (i, (id, timestamp)))| {
                            (
                                i,
                                Receipt {
                                    topic: topic.clone(),
                                    partition: p,
                                    offset: base + k as u64,
                                    id,
                                    timestamp,
                                },
                            )
                        })
                        .collect::<Vec<_>>(),
                )
            }
        });
        let parts = try_join_all(appends)
            .await
            .map_err(|e| Error::BatchSendFailed {
                failed: total,
                total,
                source: Box::new(e),
            })?;
        let mut receipts: Vec<Option<Receipt>> = vec![None; total];
        for (i, r) in parts.into_iter().flatten() {
            receipts[i] = Some(r);
        }
        Ok(receipts.into_iter().flatten().collect())
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        for t in &spec.topics {
            self.shared.topic_or_create(t).await?;
        }
        let group = self.shared.store.coordinator().get_or_create(&spec.group);
        let (member, assignment) = group.join(spec.topics.clone());
        self.shared.rebalance(&group);
        Ok(Box::new(LocalSubscription::new(
            self.shared.clone(),
            group,
            member,
            assignment,
            spec,
        )))
    }

    async fn health(&self) -> Result<()> {
        let _ = self.shared.store.list_topics();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.shared.store.close().await
    }

    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        Ok(self
            .shared
            .store
            .topic(topic)
            .map(|t| t.partitions.len() as u32))
    }

    async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        if spec.partitions == 0 {
            return Err(Error::InvalidArgument(
                "partitions must be at least 1".into(),
            ));
        }
        self.shared.store.create_topic(&spec).await
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.shared.store.delete_topic(name).await?;
        for g in self.shared.store.coordinator().all() {
            self.shared.rebalance(&g);
        }
        Ok(())
    }

    async fn list_topics(&self) -> Result<Vec<String>> {
        Ok(self.shared.store.list_topics())
    }

    async fn read_records(
        &self,
        tp: &TopicPartition,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        let Some(t) = self.shared.store.topic(&tp.topic) else {
            return Err(Self::unknown_topic(&tp.topic));
        };
        let Some(log) = t.partitions.get(tp.partition as usize) else {
            return Ok(Vec::new());
        };
        Ok(log
            .read(from, max.max(1))
            .await?
            .into_iter()
            .map(|r| {
                (
                    r.offset,
                    Record {
                        topic: tp.topic.clone(),
                        partition: Some(tp.partition),
                        id: r.id.to_string(),
                        key: r.key,
                        value: r.value,
                        headers: r.headers,
                        timestamp: r.timestamp,
                    },
                )
            })
            .collect())
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let t = self
            .shared
            .store
            .topic(name)
            .ok_or_else(|| Self::unknown_topic(name))?;
        let mut config = t.spec.config.clone();
        if let Some(ms) = t.spec.retention_ms {
            config.insert("retention.ms".into(), ms.to_string());
        }
        if let Some(b) = t.spec.retention_bytes {
            config.insert("retention.bytes".into(), b.to_string());
        }
        if let Some(m) = t.spec.max_message_size {
            config.insert("max.message.bytes".into(), m.to_string());
        }
        Ok(TopicInfo {
            name: name.to_string(),
            partitions: t
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| PartitionInfo {
                    partition: i as u32,
                    start_offset: p.start_offset(),
                    end_offset: p.end_offset(),
                })
                .collect(),
            replication_factor: 1,
            config,
        })
    }

    async fn update_topic_config(
        &self,
        name: &str,
        config: BTreeMap<String, String>,
    ) -> Result<()> {
        let t = self
            .shared
            .store
            .topic(name)
            .ok_or_else(|| Self::unknown_topic(name))?;
        let mut spec = t.spec.clone();
        for (k, v) in config {
            let bad = |e: std::num::ParseIntError| {
                Error::InvalidArgument(format!("{k} must be a number: {e}"))
            };
            match k.as_str() {
                "retention.ms" => spec.retention_ms = Some(v.parse().map_err(bad)?),
                "retention.bytes" => spec.retention_bytes = Some(v.parse().map_err(bad)?),
                "max.message.bytes" => spec.max_message_size = Some(v.parse().map_err(bad)?),
                _ => {
                    spec.config.insert(k, v);
                }
            }
        }
        self.shared.store.update_topic(&spec).await
    }

    async fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        let current = self
            .partitions(name)
            .await?
            .ok_or_else(|| Self::unknown_topic(name))?;
        if total <= current {
            return Err(Error::InvalidArgument(format!(
                "topic {name:?} has {current} partitions; the new total must be larger"
            )));
        }
        self.shared.store.add_partitions(name, total).await?;
        for g in self.shared.store.coordinator().all() {
            self.shared.rebalance(&g);
        }
        Ok(())
    }

    async fn list_groups(&self) -> Result<Vec<String>> {
        let mut groups = self.shared.store.groups().await?;
        for g in self.shared.store.coordinator().all() {
            if !g.is_empty() && !groups.contains(&g.name) {
                groups.push(g.name.clone());
            }
        }
        groups.sort();
        Ok(groups)
    }

    async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        let members = self
            .shared
            .store
            .coordinator()
            .get(group)
            .map(|g| g.members())
            .unwrap_or_default();
        let known = self.shared.store.groups().await?.iter().any(|g| g == group);
        if members.is_empty() && !known {
            return Err(Error::GroupNotFound(group.to_string()));
        }
        let mut offsets = Vec::new();
        for topic in self.shared.store.list_topics() {
            let Some(t) = self.shared.store.topic(&topic) else {
                continue;
            };
            let subscribed = members
                .iter()
                .any(|m| m.assignment.iter().any(|tp| tp.topic == topic));
            for (p, log) in t.partitions.iter().enumerate() {
                let tp = TopicPartition::new(&topic, p as u32);
                let committed = self.shared.store.committed(group, &tp).await?;
                if committed.is_none() && !subscribed {
                    continue;
                }
                let end = log.end_offset();
                let from = committed.unwrap_or(log.start_offset());
                offsets.push(GroupOffset {
                    topic: topic.clone(),
                    partition: p as u32,
                    committed,
                    end_offset: end,
                    lag: end.saturating_sub(from),
                    pending: None,
                });
            }
        }
        Ok(GroupInfo {
            group: group.to_string(),
            members,
            offsets,
        })
    }

    async fn reset_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<()> {
        if self
            .shared
            .store
            .coordinator()
            .get(group)
            .is_some_and(|g| !g.is_empty())
        {
            return Err(Error::InvalidArgument(format!(
                "group {group:?} has live members; stop them before resetting offsets"
            )));
        }
        let t = self
            .shared
            .store
            .topic(topic)
            .ok_or_else(|| Self::unknown_topic(topic))?;
        let mut updates = Vec::new();
        for (p, log) in t.partitions.iter().enumerate() {
            let offset = match to {
                ResetTo::Earliest => log.start_offset(),
                ResetTo::Latest => log.end_offset(),
                ResetTo::Offset(o) => o.clamp(log.start_offset(), log.end_offset()),
                ResetTo::Timestamp(ts) => log
                    .offset_for_timestamp(ts)
                    .await?
                    .unwrap_or_else(|| log.end_offset()),
            };
            updates.push((TopicPartition::new(topic, p as u32), offset));
        }
        self.shared.store.commit_offsets(group, &updates).await
    }
}
