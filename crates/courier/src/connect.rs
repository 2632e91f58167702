//! URL → driver. Each backend is compiled in by its cargo feature.

use std::sync::Arc;

use courier_core::{Config, Driver, Error, Result};
use courier_local::{MemoryDriver, MemoryStore};

/// URL schemes this build can connect to.
pub fn supported_schemes() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut s = vec!["file", "memory"];
    #[cfg(feature = "kafka")]
    s.push("kafka");
    #[cfg(feature = "redis")]
    s.extend(["redis", "rediss"]);
    #[cfg(feature = "nats")]
    s.push("nats");
    #[cfg(feature = "amqp")]
    s.extend(["amqp", "amqps"]);
    s
}

/// Splits `scheme://rest`.
pub(crate) fn split_url(url: &str) -> Result<(&str, &str)> {
    url.split_once("://").ok_or_else(|| Error::InvalidUrl {
        url: url.to_string(),
        reason: "expected scheme://… (e.g. file://./data, memory://, kafka://host:9092)".into(),
    })
}

/// Builds the driver for `config`'s URL.
pub(crate) async fn connect_driver(config: &Config) -> Result<Arc<dyn Driver>> {
    let url = config.url_or_default();
    let (scheme, rest) = split_url(url)?;
    match scheme {
        "file" => courier_file::connect(rest, config).await,
        "memory" => {
            let name = rest.trim_end_matches('/');
            let name = if name.is_empty() { "default" } else { name };
            Ok(Arc::new(MemoryDriver::new(
                MemoryStore::named(name),
                config.default_partitions,
            )))
        }
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(
            courier_kafka::KafkaDriver::connect(config.clone()).await?,
        )),
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Arc::new(
            courier_redis::RedisDriver::connect(config.clone()).await?,
        )),
        #[cfg(feature = "nats")]
        "nats" => Ok(Arc::new(
            courier_nats::NatsDriver::connect(config.clone()).await?,
        )),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => Ok(Arc::new(
            courier_amqp::AmqpDriver::connect(config.clone()).await?,
        )),
        other => Err(Error::UnsupportedBackend {
            scheme: other.to_string(),
            supported: supported_schemes(),
        }),
    }
}
