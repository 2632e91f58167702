//! A [`DedupStore`] in Redis, shared by every process of a group: a claim is
//! `SET key 1 NX PX window`, so exactly one of concurrent claimants wins and the key
//! expires with the window.

use std::time::Duration;

use async_trait::async_trait;
use courier_core::{Error, Result};
use redis::aio::ConnectionManager;

use super::dedup::DedupStore;

/// Dedup ids in Redis under `prefix` (keys `{prefix}{group}\x1f{id}`).
#[derive(Clone)]
pub struct RedisDedupStore {
    conn: ConnectionManager,
    prefix: String,
}

fn err(e: redis::RedisError) -> Error {
    Error::backend("redis", e)
}

impl RedisDedupStore {
    /// Connects to `url` (`redis://host:6379/0`); the connection reconnects by itself.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| Error::InvalidUrl {
            url: courier_core::config::redact_url(url),
            reason: e.to_string(),
        })?;
        let conn = ConnectionManager::new(client)
            .await
            .map_err(|e| Error::connection("redis", e))?;
        Ok(Self {
            conn,
            prefix: prefix.into(),
        })
    }
}

#[async_trait]
impl DedupStore for RedisDedupStore {
    async fn claim(&self, key: &str, window: Duration) -> Result<bool> {
        let mut c = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("{}{key}", self.prefix))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(window.as_millis().max(1) as u64)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(set.is_some())
    }

    async fn release(&self, key: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("DEL")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(())
    }
}
