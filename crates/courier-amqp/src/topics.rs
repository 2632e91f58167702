//! Topic administration: exchange + partition streams, recorded in the catalog, with a
//! short-lived cache of partition counts for the publish path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_core::{Error, Result, TopicSpec};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use parking_lot::Mutex;

use crate::catalog::{self, Entry, TopicMeta};
use crate::config::ExchangeKind;
use crate::conn::{
    bind_partition, declare_exchange, declare_stream, err, is_reply, stream_args, Shared,
};
use crate::names;

/// How long a cached partition count is trusted.
const CACHE_TTL: Duration = Duration::from_secs(30);

/// A topic's routing facts.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// Partition count.
    pub partitions: u32,
    /// Exchange type.
    pub exchange: ExchangeKind,
}

/// Topic admin and lookup.
pub struct Topics {
    shared: Arc<Shared>,
    cache: Mutex<HashMap<String, (Route, Instant)>>,
    default_kind: ExchangeKind,
    default_partitions: u32,
}

impl Topics {
    /// Topics on `shared`'s broker.
    pub fn new(shared: Arc<Shared>, default_kind: ExchangeKind, default_partitions: u32) -> Self {
        Self {
            shared,
            cache: Mutex::new(HashMap::new()),
            default_kind,
            default_partitions,
        }
    }

    /// The catalog's view of `name`.
    pub async fn meta(&self, name: &str) -> Result<Option<TopicMeta>> {
        Ok(catalog::read(&self.shared).await?.topics.remove(name))
    }

    /// Routing facts of `name`, from the cache or the catalog.
    pub async fn route(&self, name: &str) -> Result<Option<Route>> {
        if let Some((r, at)) = self.cache.lock().get(name) {
            if at.elapsed() < CACHE_TTL {
                return Ok(Some(*r));
            }
        }
        let Some(m) = self.meta(name).await? else {
            return Ok(None);
        };
        let r = Route {
            partitions: m.spec.partitions,
            exchange: m.exchange,
        };
        self.cache
            .lock()
            .insert(name.to_string(), (r, Instant::now()));
        Ok(Some(r))
    }

    /// Routing facts of `name`, creating it with the default partition count when
    /// missing (a send or subscribe to a new topic creates it, as on every backend).
    pub async fn route_or_create(&self, name: &str) -> Result<Route> {
        if let Some(r) = self.route(name).await? {
            return Ok(r);
        }
        match self
            .create(TopicSpec::new(name, self.default_partitions))
            .await
        {
            Ok(()) | Err(Error::TopicExists(_)) => {}
            Err(e) => return Err(e),
        }
        self.route(name)
            .await?
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))
    }

    /// Creates the exchange and one stream per partition, then records the topic.
    pub async fn create(&self, spec: TopicSpec) -> Result<()> {
        let kind = match spec.config.get("exchangeType") {
            Some(k) => ExchangeKind::parse(k)?,
            None => self.default_kind,
        };
        if kind == ExchangeKind::Fanout && spec.partitions > 1 {
            return Err(Error::InvalidArgument(
                "a fanout exchange copies every message to every partition: use one partition, or direct/topic/headers".into(),
            ));
        }
        if self.meta(&spec.name).await?.is_some() {
            return Err(Error::TopicExists(spec.name));
        }
        let ch = self.shared.channel().await?;
        declare_exchange(&ch, names::exchange(&spec.name), kind).await?;
        for p in 0..spec.partitions {
            let s = names::stream(&spec.name, p);
            declare_stream(
                &ch,
                &s,
                stream_args(spec.retention_ms, spec.retention_bytes),
            )
            .await?;
            bind_partition(&ch, &s, names::exchange(&spec.name), kind, p).await?;
        }
        let _ = ch.close(200, "done".into()).await;
        self.cache.lock().remove(&spec.name);
        catalog::append(
            &self.shared,
            &Entry::Topic {
                spec,
                exchange: kind,
            },
        )
        .await
    }

    /// Deletes streams, exchange and the offsets of groups that subscribed to it.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let state = catalog::read(&self.shared).await?;
        let Some(meta) = state.topics.get(name) else {
            return Err(Error::TopicNotFound(name.to_string()));
        };
        catalog::append(
            &self.shared,
            &Entry::Delete {
                name: name.to_string(),
            },
        )
        .await?;
        self.cache.lock().remove(name);
        let ch = self.shared.channel().await?;
        for p in 0..meta.spec.partitions {
            ch.queue_delete(
                names::stream(name, p).as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await
            .map_err(err)?;
            for (g, topics) in &state.groups {
                if topics.contains(name) {
                    let tp = courier_core::TopicPartition::new(name, p);
                    ch.queue_delete(
                        names::offset(g, &tp).as_str().into(),
                        QueueDeleteOptions::default(),
                    )
                    .await
                    .map_err(err)?;
                }
            }
        }
        match ch
            .exchange_delete(
                names::exchange(name).into(),
                ExchangeDeleteOptions::default(),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if is_reply(&e, 404) => {}
            Err(e) => return Err(err(e)),
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(())
    }

    /// Forgets cached routes (after a create or delete elsewhere).
    pub fn invalidate(&self, name: &str) {
        self.cache.lock().remove(name);
    }
}
