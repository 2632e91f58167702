//! Courier's `redis://` driver over Redis Streams (Redis ≥ 7.0).
//!
//! A topic is N streams `{prefix}{topic}:{partition}` (prefix `courier:` unless the
//! URL says `?prefix=…`); its spec lives in the `{prefix}topics` hash. Keys pick
//! partitions by Courier's murmur2, so per-key order holds. Offsets are dense: entries
//! get the ids `0-1`, `0-2` … (see [`codec`](crate)), so offset = sequence − 1 and
//! lag = end − committed. A consumer group is a Redis consumer group on every
//! partition stream; members own partitions by leases. See `docs/backends/redis.md`.

mod admin;
mod codec;
mod group;
mod keys;
mod lane;
mod publish;
mod reader;
mod resp;
mod state;
mod subscription;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use courier_core::{
    Capabilities, Config, Driver, Error, GroupInfo, OffsetReset, Receipt, Record, ResetTo, Result,
    SubscribeSpec, Subscription, TopicInfo, TopicPartition, TopicSpec,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

pub use admin::RETENTION_MESSAGES;

use crate::admin::Admin;
use crate::group::Coordinator;
use crate::keys::Keys;
use crate::lane::Lane;
use crate::publish::Publisher;
use crate::reader::Reader;
use crate::state::Shared;
use crate::subscription::RedisSubscription;

pub(crate) const BACKEND: &str = "redis";

/// Key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "courier:";

/// How long a reply may take (reads block for [`reader::BLOCK`] on top of this).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn redis_error(e: redis::RedisError) -> Error {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        Error::connection(BACKEND, e)
    } else {
        Error::backend(BACKEND, e)
    }
}

/// The Redis Streams backend. Cheap to share: one multiplexed connection (with
/// reconnect) for admin, one for publishing (owned by the ordered publish lane), plus
/// one per subscription for blocking reads.
pub struct RedisDriver {
    client: redis::Client,
    admin: Arc<Admin>,
    publisher: Publisher,
    default_partitions: u32,
}

/// Splits Courier's own `prefix` query parameter off a `redis://` URL.
fn split_prefix(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut prefix = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("prefix=") {
            Some(p) => {
                prefix = Some(p.to_string());
                false
            }
            None => !kv.is_empty(),
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, prefix)
}

/// Backend setting: a PEM file of the CA(s) that signed the server's certificate, for
/// `rediss://` servers whose certificate the system's roots do not vouch for.
pub const TLS_CA_FILE: &str = "redis.tls_ca_file";

/// The client for `url`; `rediss://` connects over TLS (rustls), verifying the server
/// against the system's roots or the CA file of [`TLS_CA_FILE`].
fn open_client(url: &str, config: &Config) -> Result<redis::Client> {
    let invalid = |reason: String| Error::InvalidUrl {
        url: courier_core::config::redact_url(url),
        reason,
    };
    let ca_file = config.backend.get(TLS_CA_FILE);
    if !url.starts_with("rediss://") {
        if ca_file.is_some() {
            return Err(invalid(format!(
                "{TLS_CA_FILE} is set but the URL is not rediss://"
            )));
        }
        return redis::Client::open(url).map_err(|e| invalid(e.to_string()));
    }
    // Several crates in one process may enable different rustls providers; pick ring
    // explicitly (an error only means a provider is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root_cert = match ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            Error::InvalidArgument(format!("{TLS_CA_FILE} {path:?} cannot be read: {e}"))
        })?),
        None => None,
    };
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert,
        },
    )
    .map_err(|e| invalid(e.to_string()))
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT + reader::BLOCK))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2))
}

impl RedisDriver {
    /// Connects to the server of `config`'s URL (`redis://[user:pass@]host:port[/db]
    /// [?prefix=…]`, or `rediss://…` for TLS) and checks that it answers.
    pub async fn connect(config: Config) -> Result<Self> {
        config.validate()?;
        let (url, prefix) = split_prefix(config.url_or_default());
        let prefix = prefix
            .or_else(|| config.backend.get("redis.prefix").cloned())
            .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        let client = open_client(&url, &config)?;
        let mut conn = ConnectionManager::new_with_config(client.clone(), manager_config())
            .await
            .map_err(|e| Error::connection(BACKEND, e))?;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let replicas = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let admin = Arc::new(Admin::new(conn, Keys::new(prefix)));
        let lane = Lane::start(
            client.clone(),
            redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(Duration::from_secs(5))),
            config.producer.retry_max,
        );
        let publisher = Publisher::new(lane, admin.clone(), &config, replicas);
        tracing::info!(config = ?config.redacted(), replicas, "redis driver connected");
        Ok(Self {
            client,
            admin,
            publisher,
            default_partitions: config.default_partitions.max(1),
        })
    }
}

#[async_trait]
impl Driver for RedisDriver {
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
            dense_offsets: true,
            // The lane keeps calls in order (see `lane`); each call is up to 9
            // pipelines, so a few calls fill the lane's window.
            max_in_flight_publishes: 4,
            read_by_position: true,
            index_by_position: true,
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
        let keys = self.admin.keys();
        let start = match spec.auto_offset_reset {
            OffsetReset::Earliest => "0",
            OffsetReset::Latest => "$",
        };
        // The group's position is fixed when it first subscribes, so `latest` means
        // "after joining" even for partitions this member gets later.
        let conn = self.admin.conn();
        for topic in &spec.topics {
            let meta = self
                .admin
                .meta_or_create(topic, self.default_partitions)
                .await?;
            for p in 0..meta.partitions {
                admin::ensure_group(&conn, &keys.stream(topic, p), &spec.group, start).await?;
            }
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SADD")
            .arg(keys.groups())
            .arg(&spec.group)
            .ignore();
        pipe.cmd("SADD")
            .arg(keys.group_topics(&spec.group))
            .arg(&spec.topics)
            .ignore();
        let mut c = conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(redis_error)?;

        let read_conn = ConnectionManager::new_with_config(self.client.clone(), manager_config())
            .await
            .map_err(|e| Error::connection(BACKEND, e))?;
        let member = ulid::Ulid::new().to_string().to_lowercase();
        let (tx, rx) = mpsc::channel((spec.prefetch / 1000).clamp(2, 16));
        let shared = Arc::new(Shared::new(tx));
        let coordinator = Coordinator {
            shared: shared.clone(),
            conn,
            admin: self.admin.clone(),
            group: spec.group.clone(),
            member: member.clone(),
            topics: spec.topics.clone(),
            session: spec.session_timeout.max(Duration::from_millis(500)),
            revoke_timeout: spec.session_timeout.max(Duration::from_secs(5)),
        };
        let reader = Reader {
            shared: shared.clone(),
            conn: read_conn,
            group: spec.group.clone(),
            member,
            prefetch: spec.prefetch.max(1),
        };
        Ok(Box::new(RedisSubscription {
            shared,
            events: rx,
            coordinator: Some(tokio::spawn(coordinator.run())),
            reader: Some(tokio::spawn(reader.run())),
            reported: Vec::new(),
        }))
    }

    async fn health(&self) -> Result<()> {
        let mut c = self.admin.conn();
        let _: String = redis::cmd("PING")
            .query_async(&mut c)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        // Publishes complete before `publish` returns; nothing is buffered here.
        Ok(())
    }

    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        Ok(self.admin.spec(topic).await?.map(|s| s.partitions))
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
        self.admin.update_topic_config(name, config).await?;
        self.publisher.forget(name);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_taken_off_the_url() {
        assert_eq!(
            split_prefix("redis://h:1/2?prefix=x:&protocol=resp3"),
            (
                "redis://h:1/2?protocol=resp3".to_string(),
                Some("x:".into())
            )
        );
        assert_eq!(split_prefix("redis://h"), ("redis://h".to_string(), None));
    }
}
