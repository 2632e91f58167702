//! Courier's `amqp://` (and `amqps://`) driver for RabbitMQ, over lapin.
//!
//! A topic is a direct exchange named after it; each partition is a RabbitMQ stream
//! (`topic:N`) bound with routing key `N`, and Courier picks `N` with murmur2 like
//! every backend. Streams keep messages after they are read, so every group reads
//! every message from its own position, `earliest` means the first retained message,
//! and offsets are real stream offsets. Group positions, membership and partition
//! leases are built from plain AMQP objects (see [`member`]). See
//! `docs/backends/amqp.md`.

mod catalog;
mod codec;
pub mod config;
mod conn;
mod extents;
pub mod member;
mod names;
mod offsets;
mod part;
mod publish;
mod read;
mod subscription;
mod topics;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use courier_core::{
    Capabilities, Config, Driver, Error, GroupInfo, GroupOffset, MemberInfo, PartitionInfo,
    Receipt, Record, ResetTo, Result, SubscribeSpec, Subscription, TopicInfo, TopicPartition,
    TopicSpec,
};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;

use crate::catalog::Entry;
use crate::config::AmqpSettings;
use crate::conn::{err, is_reply, Shared};
use crate::member::{Beat, MemberConfig};
use crate::publish::Publisher;
use crate::subscription::AmqpSubscription;
use crate::topics::Topics;

pub(crate) const BACKEND: &str = "amqp";

/// Publishes a producer may keep in flight: the driver hands messages to its channel in
/// call order, and a channel keeps order.
const MAX_IN_FLIGHT_PUBLISHES: usize = 16;

/// How long `describe_group` listens for members answering its probe.
const PROBE_WINDOW: Duration = Duration::from_millis(500);

/// The RabbitMQ backend. One shared connection (publishing, admin) per driver and one
/// connection per subscription (its leases live and die with it).
pub struct AmqpDriver {
    settings: AmqpSettings,
    shared: Arc<Shared>,
    topics: Arc<Topics>,
    publisher: Publisher,
}

impl AmqpDriver {
    /// Connects to the broker of `config.url` and declares Courier's catalog stream.
    pub async fn connect(config: Config) -> Result<Self> {
        config.validate()?;
        let settings = AmqpSettings::from_config(&config)?;
        let shared =
            Arc::new(Shared::connect(&settings.uri, "courier driver", settings.confirm).await?);
        let ch = shared.channel().await?;
        catalog::declare(&ch).await?;
        let _ = ch.close(200, "done".into()).await;
        let topics = Arc::new(Topics::new(
            shared.clone(),
            settings.exchange_kind,
            settings.default_partitions,
        ));
        let publisher = Publisher::new(
            shared.clone(),
            topics.clone(),
            settings.confirm,
            settings.retry_max,
        );
        tracing::info!(uri = %courier_core::config::redact_url(&settings.uri), "amqp driver connected");
        Ok(Self {
            settings,
            shared,
            topics,
            publisher,
        })
    }

    async fn topic_info(&self, name: &str) -> Result<TopicInfo> {
        let meta = self
            .topics
            .meta(name)
            .await?
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))?;
        let conn = self.shared.connection().await?;
        let probes = (0..meta.spec.partitions).map(|p| {
            let conn = conn.clone();
            let s = names::stream(name, p);
            async move { extents::extent(&conn, &s).await }
        });
        let ext = futures::future::try_join_all(probes).await?;
        let mut config = meta.spec.config.clone();
        config.insert("exchangeType".into(), meta.exchange.as_str().into());
        if let Some(ms) = meta.spec.retention_ms {
            config.insert("retention.ms".into(), ms.to_string());
        }
        if let Some(b) = meta.spec.retention_bytes {
            config.insert("retention.bytes".into(), b.to_string());
        }
        Ok(TopicInfo {
            name: name.to_string(),
            partitions: ext
                .into_iter()
                .enumerate()
                .map(|(p, (start_offset, end_offset))| PartitionInfo {
                    partition: p as u32,
                    start_offset,
                    end_offset,
                })
                .collect(),
            replication_factor: 1,
            config,
        })
    }

    /// Asks the group's live members to announce themselves.
    async fn probe_members(&self, group: &str) -> Result<Vec<MemberInfo>> {
        let ch = self.shared.channel().await?;
        let exchange = names::members(group);
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(err)?;
        match ch
            .queue_bind(
                q.name().clone(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {}
            // No member ever joined: no exchange.
            Err(e) if is_reply(&e, 404) => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        }
        let mut consumer = ch
            .basic_consume(
                q.name().clone(),
                "courier-probe".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(err)?;
        let me = format!("courier-admin-{}", ulid::Ulid::new());
        let probe = Beat {
            member: me.clone(),
            state: "probe".into(),
            assignment: Vec::new(),
        };
        ch.basic_publish(
            exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&probe)?,
            BasicProperties::default(),
        )
        .await
        .map_err(err)?;
        let mut members: std::collections::BTreeMap<String, Vec<TopicPartition>> =
            Default::default();
        let deadline = tokio::time::Instant::now() + PROBE_WINDOW;
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, consumer.next()).await {
            if let Ok(b) = serde_json::from_slice::<Beat>(&d.data) {
                match b.state.as_str() {
                    "alive" => {
                        members.insert(b.member, b.assignment);
                    }
                    "leave" => {
                        members.remove(&b.member);
                    }
                    _ => {}
                }
            }
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(members
            .into_iter()
            .map(|(member_id, assignment)| MemberInfo {
                member_id,
                assignment,
            })
            .collect())
    }
}

#[async_trait]
impl Driver for AmqpDriver {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            partitions: true,
            per_key_order: true,
            group_rebalance: true,
            durable: true,
            idempotent_produce: false,
            delayed_delivery: false,
            native_compression: false,
            // Stream offsets are dense, but receipts carry a publish sequence (see
            // the backend page) and ends are read, not reported.
            dense_offsets: false,
            max_in_flight_publishes: MAX_IN_FLIGHT_PUBLISHES,
            // A read attaches a stream consumer (a few round trips): fine for the
            // scheduler's rare crash lookup, too slow for every due message.
            read_by_position: true,
            index_by_position: false,
            store_once: false,
        }
    }

    async fn publish(&self, batch: Vec<Record>) -> Result<Vec<Receipt>> {
        self.publisher.publish(batch).await
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        let mut topics = Vec::with_capacity(spec.topics.len());
        for t in &spec.topics {
            let route = self.topics.route_or_create(t).await?;
            topics.push((t.clone(), route.partitions));
        }
        catalog::append(
            &self.shared,
            &Entry::Group {
                group: spec.group.clone(),
                topics: spec.topics.clone(),
            },
        )
        .await?;
        let prefetch = u16::try_from(spec.prefetch.max(1))
            .unwrap_or(u16::MAX)
            .min(self.settings.prefetch);
        Ok(Box::new(AmqpSubscription::start(MemberConfig {
            uri: self.settings.uri.clone(),
            group: spec.group,
            topics,
            reset: spec.auto_offset_reset,
            session_timeout: spec.session_timeout,
            commit_interval: spec.commit_interval,
            prefetch,
            connection_name: self.settings.connection_name.clone(),
        })))
    }

    async fn health(&self) -> Result<()> {
        let ch = self.shared.channel().await?;
        ch.queue_declare(
            names::CATALOG.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(err)?;
        let _ = ch.close(200, "done".into()).await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.shared.close().await;
        Ok(())
    }

    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        self.topics.invalidate(topic);
        Ok(self.topics.route(topic).await?.map(|r| r.partitions))
    }

    async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        self.topics.create(spec).await
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.topics.delete(name).await
    }

    async fn list_topics(&self) -> Result<Vec<String>> {
        Ok(catalog::read(&self.shared)
            .await?
            .topics
            .into_keys()
            .collect())
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        self.topic_info(name).await
    }

    async fn list_groups(&self) -> Result<Vec<String>> {
        Ok(catalog::read(&self.shared)
            .await?
            .groups
            .into_keys()
            .collect())
    }

    /// Rewrites the group's offset queue of every partition of `topic`. Refused while
    /// the group has live members: they would overwrite it with their next commit.
    async fn reset_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<()> {
        let live = self.probe_members(group).await?;
        if !live.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "group {group:?} has {} live member(s); stop them before resetting its offsets",
                live.len()
            )));
        }
        let info = self.topic_info(topic).await?;
        let ch = self.shared.channel().await?;
        ch.confirm_select(Default::default()).await.map_err(err)?;
        for p in &info.partitions {
            let offset = match to {
                ResetTo::Earliest => p.start_offset,
                ResetTo::Latest => p.end_offset,
                ResetTo::Offset(o) => o.clamp(p.start_offset, p.end_offset),
                // Streams do answer `x-stream-offset` with a timestamp, but a consumer
                // started there reports no offset until a message arrives.
                ResetTo::Timestamp(_) => {
                    return Err(Error::Unsupported {
                        feature: "reset offsets to a timestamp",
                        backend: BACKEND,
                    })
                }
            };
            let tp = TopicPartition::new(topic, p.partition);
            // Publishing to a queue that does not exist would drop the offset.
            offsets::declare(&ch, group, &tp).await?;
            offsets::write(&ch, group, &tp, offset).await?;
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(())
    }

    /// Attaches a stream consumer at `from` and reads until `max` records or the
    /// stream goes quiet.
    async fn read_records(
        &self,
        tp: &TopicPartition,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        let conn = self.shared.connection().await?;
        read::read_records(&conn, tp, from, max).await
    }

    async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        let state = catalog::read(&self.shared).await?;
        let Some(topics) = state.groups.get(group) else {
            return Err(Error::GroupNotFound(group.to_string()));
        };
        let members = self.probe_members(group).await?;
        let mut offsets = Vec::new();
        let ch = self.shared.channel().await?;
        for t in topics {
            let Some(meta) = state.topics.get(t) else {
                continue;
            };
            let info = self.topic_info(t).await?;
            for p in 0..meta.spec.partitions {
                let tp = TopicPartition::new(t.clone(), p);
                let committed = offsets::read(&ch, group, &tp).await?;
                let ext = &info.partitions[p as usize];
                let lag = ext
                    .end_offset
                    .saturating_sub(committed.unwrap_or(ext.start_offset).max(ext.start_offset));
                offsets.push(GroupOffset {
                    topic: t.clone(),
                    partition: p,
                    committed,
                    end_offset: ext.end_offset,
                    lag,
                    pending: None,
                });
            }
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(GroupInfo {
            group: group.to_string(),
            members,
            offsets,
        })
    }
}
