//! Courier's `nats://host:4222` driver over NATS JetStream (async-nats).
//!
//! A topic is a stream `COURIER_<token>` with one subject per partition
//! (`courier.<token>.<p>`); keys pick the partition with Courier's murmur2. A group is
//! one durable pull consumer per partition (explicit ack), and group members own
//! partitions by leases in a JetStream KV bucket, so one member reads a partition at a
//! time and per-key order holds. Offsets are stream sequences: increasing within a
//! partition, not dense. Works with nats-server 2.9 (no 2.10+ API is used). See
//! `docs/backends/nats.md`.

mod acks;
mod codec;
mod groups;
mod names;
mod producer;
mod subscription;
mod topics;

use std::time::Duration;

use async_nats::jetstream::{self, Context};
use async_trait::async_trait;
use courier_core::{
    Capabilities, Config, Driver, Error, GroupInfo, Receipt, Record, ResetTo, Result,
    SubscribeSpec, Subscription, TopicInfo, TopicPartition, TopicSpec,
};

use crate::producer::Publisher;
use crate::subscription::{NatsSubscription, Settings};

pub(crate) const BACKEND: &str = "nats";

/// Publish calls a Courier producer may have in flight: one connection writes them
/// in call order, so per-key order holds across them.
const MAX_IN_FLIGHT_PUBLISHES: usize = 64;
/// Courier's prefetch default, for consumers created by an offset reset.
const RESET_PREFETCH: usize = 4096;

/// The NATS JetStream backend. Cheap to share: one connection per driver, shared by
/// producing, consuming and admin; it reconnects by itself after a server restart.
pub struct NatsDriver {
    client: async_nats::Client,
    js: Context,
    publisher: Publisher,
    settings: Settings,
}

fn backend_setting<T: std::str::FromStr>(config: &Config, key: &str) -> Result<Option<T>> {
    match config.backend.get(key) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| Error::Config(format!("{key}: cannot parse {v:?}"))),
    }
}

impl NatsDriver {
    /// Connects to the servers of the URL (`nats://[user:pass@]host:port,host:port`)
    /// and checks that JetStream answers. Backend settings: `nats.ack_wait_ms`
    /// (default 30000), `nats.max_deliver` (default unlimited), `nats.pull_batch`
    /// (default 1000).
    pub async fn connect(config: Config) -> Result<Self> {
        config.validate()?;
        let url = config.url_or_default();
        let rest = url.strip_prefix("nats://").unwrap_or(url);
        let servers: Vec<String> = rest
            .trim_end_matches('/')
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| format!("nats://{s}"))
            .collect();
        if servers.is_empty() {
            return Err(Error::InvalidUrl {
                url: url.to_string(),
                reason: "expected nats://host:port".into(),
            });
        }
        let addrs: Vec<async_nats::ServerAddr> = servers
            .iter()
            .map(|s| {
                s.parse().map_err(|e| Error::InvalidUrl {
                    url: url.to_string(),
                    reason: format!("{e}"),
                })
            })
            .collect::<Result<_>>()?;
        let mut options = async_nats::ConnectOptions::new()
            .name("courier")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None);
        if let (Some(u), Some(p)) = (&config.sasl_username, &config.sasl_password) {
            options = options.user_and_password(u.clone(), p.clone());
        }
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| Error::connection(BACKEND, e))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .ack_timeout(Duration::from_secs(10))
            .max_ack_inflight(producer::MAX_ACKS_IN_FLIGHT)
            .build(client.clone());
        let settings = Settings {
            ack_wait: Duration::from_millis(
                backend_setting(&config, "nats.ack_wait_ms")?.unwrap_or(30_000),
            ),
            max_deliver: backend_setting(&config, "nats.max_deliver")?.unwrap_or(-1),
            pull_batch: backend_setting(&config, "nats.pull_batch")?
                .unwrap_or(1000usize)
                .max(1),
            default_partitions: config.default_partitions.max(1),
        };
        let driver = Self {
            publisher: Publisher::new(js.clone(), settings.default_partitions),
            client,
            js,
            settings,
        };
        driver.health().await?;
        tracing::info!(config = ?config.redacted(), "nats driver connected");
        Ok(driver)
    }
}

#[async_trait]
impl Driver for NatsDriver {
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
            dense_offsets: false,
            max_in_flight_publishes: MAX_IN_FLIGHT_PUBLISHES,
            // `read_records` is an ephemeral consumer per read; the scheduler's
            // catch-up reads in log order because its subscription asks for
            // `replay_after_takeover` (the consumer restarts at its ack floor).
            read_by_position: true,
            index_by_position: false,
            // JetStream drops a publish whose `Nats-Msg-Id` the stream stored within
            // its duplicate window (2 min unless the stream says otherwise).
            store_once: true,
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
        let sub = NatsSubscription::start(
            self.client.clone(),
            self.js.clone(),
            spec,
            self.settings.clone(),
        )
        .await?;
        Ok(Box::new(sub))
    }

    async fn health(&self) -> Result<()> {
        // A raw `$JS.API.INFO` round trip: async-nats' typed account info expects
        // fields 2.9 servers do not send.
        let reply = self
            .client
            .request("$JS.API.INFO", bytes::Bytes::new())
            .await
            .map_err(|e| Error::connection(BACKEND, e))?;
        let v: serde_json::Value =
            serde_json::from_slice(&reply.payload).map_err(|e| Error::connection(BACKEND, e))?;
        match v.get("error") {
            None => Ok(()),
            Some(e) => Err(Error::connection(
                BACKEND,
                format!("JetStream unavailable: {e}"),
            )),
        }
    }

    async fn close(&self) -> Result<()> {
        self.client
            .flush()
            .await
            .map_err(|e| Error::connection(BACKEND, e))
    }

    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        Ok(topics::get(&self.js, topic)
            .await?
            .map(|s| topics::partition_count(s.cached_info())))
    }

    async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        topics::create(&self.js, &spec, true).await?;
        self.publisher.forget(&spec.name);
        Ok(())
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        topics::delete(&self.js, name).await?;
        self.publisher.forget(name);
        Ok(())
    }

    async fn list_topics(&self) -> Result<Vec<String>> {
        topics::list(&self.js).await
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        topics::describe(&self.js, name).await
    }

    async fn read_records(
        &self,
        tp: &TopicPartition,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        topics::read_records(&self.js, &tp.topic, tp.partition, from, max).await
    }

    async fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        topics::add_partitions(&self.js, name, total).await?;
        self.publisher.forget(name);
        Ok(())
    }

    async fn list_groups(&self) -> Result<Vec<String>> {
        groups::list(&self.js).await
    }

    async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        groups::describe(&self.js, group).await
    }

    async fn reset_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<()> {
        groups::reset(&self.js, group, topic, to, &self.settings, RESET_PREFETCH).await
    }
}
