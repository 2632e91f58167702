//! Courier's `kafka://host:port,host:port` driver over librdkafka (rdkafka).
//!
//! Partitions are chosen by Courier's murmur2 ([`courier_core::partition_for_key`]), so
//! keys land where Java and librdkafka clients put them; the message id travels in the
//! `x-message-id` record header; commits are Courier's (only the handled prefix of a
//! partition is ever committed). See `docs/backends/kafka.md`.

mod admin;
pub mod config;
mod offsets;
mod producer;
mod subscription;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use courier_core::{
    Acks, Capabilities, Config, Driver, Error, GroupInfo, Receipt, Record, ResetTo, Result,
    SubscribeSpec, Subscription, TopicInfo, TopicPartition, TopicSpec,
};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::ClientConfig;

use crate::admin::Admin;
use crate::producer::Publisher;
use crate::subscription::KafkaSubscription;

pub(crate) const BACKEND: &str = "kafka";

/// Batches a Courier producer may have in flight: librdkafka keeps per-partition order
/// across them (idempotence, or at most 5 requests in flight per connection).
const MAX_IN_FLIGHT_PUBLISHES: usize = 64;

/// The Kafka backend. Cheap to share; one librdkafka producer and one admin client per
/// driver, one librdkafka consumer per subscription.
pub struct KafkaDriver {
    config: Config,
    publisher: Publisher,
    admin: Admin,
    admin_config: ClientConfig,
    idempotent: bool,
}

impl KafkaDriver {
    /// Connects to the brokers of `config` (URL hosts, else `config.brokers`) and
    /// checks they answer.
    pub async fn connect(config: Config) -> Result<Self> {
        config.validate()?;
        let producer: FutureProducer = config::producer(&config)?
            .create()
            .map_err(|e| Error::connection(BACKEND, e))?;
        let admin_config = config::admin(&config)?;
        let admin = Admin::new(admin_config.clone())?;
        admin.health().await?;
        let idempotent = config
            .producer
            .enable_idempotence
            .unwrap_or(config.producer.acks == Acks::All)
            || config
                .backend
                .get("enable.idempotence")
                .is_some_and(|v| v == "true");
        tracing::info!(config = ?config.redacted(), "kafka driver connected");
        Ok(Self {
            config,
            publisher: Publisher::new(producer),
            admin,
            admin_config,
            idempotent,
        })
    }
}

#[async_trait]
impl Driver for KafkaDriver {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            partitions: true,
            per_key_order: true,
            group_rebalance: true,
            durable: true,
            idempotent_produce: self.idempotent,
            delayed_delivery: false,
            native_compression: true,
            dense_offsets: true,
            max_in_flight_publishes: MAX_IN_FLIGHT_PUBLISHES,
            read_by_position: true,
            index_by_position: false,
            store_once: false,
        }
    }

    async fn publish(&self, batch: Vec<Record>) -> Result<Vec<Receipt>> {
        self.publisher.publish(batch).await
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        if spec.group.is_empty() {
            return Err(Error::EmptyGroupId);
        }
        if spec.topics.is_empty() {
            return Err(Error::NoTopics);
        }
        let session_ms = spec.session_timeout.as_millis().max(1) as u64;
        let kc = config::consumer(
            &self.config,
            &spec.group,
            spec.auto_offset_reset,
            session_ms,
        )?;
        let sub = KafkaSubscription::start(kc, self.admin_config.clone(), spec)?;
        Ok(Box::new(sub))
    }

    async fn health(&self) -> Result<()> {
        self.admin.health().await
    }

    async fn close(&self) -> Result<()> {
        let producer = self.publisher.producer().clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30)))
            .await
            .map_err(|e| Error::backend(BACKEND, e))?
            .map_err(|e| Error::backend(BACKEND, e))
    }

    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        Ok(self
            .admin
            .partition_ids(topic)
            .await?
            .map(|ids| ids.len() as u32))
    }

    async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        let name = spec.name.clone();
        self.admin.create_topic(spec).await?;
        self.publisher.forget(&name);
        Ok(())
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.admin.delete_topic(name).await?;
        self.publisher.forget(name);
        Ok(())
    }

    async fn list_topics(&self) -> Result<Vec<String>> {
        self.admin.list_topics().await
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        self.admin.describe_topic(name).await
    }

    async fn read_records(
        &self,
        tp: &TopicPartition,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        self.admin
            .read_records(&tp.topic, tp.partition, from, max)
            .await
    }

    async fn update_topic_config(
        &self,
        name: &str,
        config: BTreeMap<String, String>,
    ) -> Result<()> {
        self.admin.update_topic_config(name, config).await
    }

    async fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        self.admin.add_partitions(name, total).await?;
        self.publisher.forget(name);
        Ok(())
    }

    async fn list_groups(&self) -> Result<Vec<String>> {
        self.admin.list_groups().await
    }

    async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        self.admin.describe_group(group).await
    }

    async fn reset_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<()> {
        self.admin.reset_offsets(group, topic, to).await
    }
}
