//! Seed 002's RabbitMQ settings, read from `Config::backend`, and the AMQP URI.

use courier_core::{Acks, Config, Error, Result};

/// How a topic's exchange routes to its partition streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Routing key = partition number (the default).
    Direct,
    /// Routing key = partition number; other clients may bind patterns such as `#`.
    Topic,
    /// Header `x-partition` = partition number (`x-match: all` bindings).
    Headers,
    /// Every bound queue gets every message: only for one-partition topics.
    Fanout,
}

impl ExchangeKind {
    /// Parses seed 002's `exchangeType`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "direct" => Ok(Self::Direct),
            "topic" => Ok(Self::Topic),
            "headers" => Ok(Self::Headers),
            "fanout" => Ok(Self::Fanout),
            other => Err(Error::Config(format!(
                "exchangeType must be direct, fanout, topic or headers, not {other:?}"
            ))),
        }
    }

    /// The AMQP exchange kind.
    pub fn lapin(self) -> lapin::ExchangeKind {
        match self {
            Self::Direct => lapin::ExchangeKind::Direct,
            Self::Topic => lapin::ExchangeKind::Topic,
            Self::Headers => lapin::ExchangeKind::Headers,
            Self::Fanout => lapin::ExchangeKind::Fanout,
        }
    }

    /// The name RabbitMQ uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Topic => "topic",
            Self::Headers => "headers",
            Self::Fanout => "fanout",
        }
    }
}

/// The driver's settings.
#[derive(Clone, Debug)]
pub struct AmqpSettings {
    /// The AMQP URI (`amqp://user:pass@host:5672/vhost`).
    pub uri: String,
    /// Exchange type of topics created by this driver (`exchangeType`).
    pub exchange_kind: ExchangeKind,
    /// Consumer prefetch (QoS) per partition stream (`prefetchCount`).
    pub prefetch: u16,
    /// Publisher confirms (`confirm`, and off when `acks = 0`).
    pub confirm: bool,
    /// Publish retries after a connection failure (`producerConfig.retryMax`).
    pub retry_max: u32,
    /// Partitions of topics created implicitly.
    pub default_partitions: u32,
    /// Prefix of the names of this driver's connections (`connectionName`), as shown
    /// by `rabbitmqctl list_connections`.
    pub connection_name: String,
}

fn flag(config: &Config, key: &str, default: bool) -> Result<bool> {
    match config.backend.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| Error::Config(format!("backend.{key} must be true or false, not {v:?}"))),
    }
}

impl AmqpSettings {
    /// Reads `config`: the URL (`amqp://` or `amqps://`) and the `backend` keys
    /// `exchangeType`, `prefetchCount`, `confirm`, `durable`, `autoAck`.
    pub fn from_config(config: &Config) -> Result<Self> {
        let uri = config.url_or_default().to_string();
        if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
            return Err(Error::InvalidUrl {
                url: courier_core::config::redact_url(&uri),
                reason: "expected amqp://user:pass@host:5672/vhost or amqps://…".into(),
            });
        }
        let exchange_kind = match config.backend.get("exchangeType") {
            Some(s) => ExchangeKind::parse(s)?,
            None => ExchangeKind::Direct,
        };
        let prefetch = match config.backend.get("prefetchCount") {
            Some(v) => v.parse::<u16>().ok().filter(|n| *n > 0).ok_or_else(|| {
                Error::Config(format!("backend.prefetchCount must be 1–65535, not {v:?}"))
            })?,
            None => 1000,
        };
        if !flag(config, "durable", true)? {
            return Err(Error::Config(
                "backend.durable=false is not supported: Courier keeps partitions in RabbitMQ streams, which are always durable".into(),
            ));
        }
        if flag(config, "autoAck", false)? {
            return Err(Error::Config(
                "backend.autoAck=true is not supported: Courier commits only handled messages (at-least-once)".into(),
            ));
        }
        let confirm = flag(config, "confirm", true)? && config.producer.acks != Acks::None;
        Ok(Self {
            uri,
            exchange_kind,
            prefetch,
            confirm,
            retry_max: config.producer.retry_max,
            default_partitions: config.default_partitions.max(1),
            connection_name: config
                .backend
                .get("connectionName")
                .cloned()
                .unwrap_or_else(|| "courier".to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_settings_map() {
        let mut c = Config::with_url("amqp://guest:guest@127.0.0.1:5672/%2f");
        let s = AmqpSettings::from_config(&c).unwrap();
        assert_eq!(
            (s.exchange_kind, s.prefetch, s.confirm),
            (ExchangeKind::Direct, 1000, true)
        );
        c.backend.insert("exchangeType".into(), "topic".into());
        c.backend.insert("prefetchCount".into(), "10".into());
        c.backend.insert("confirm".into(), "false".into());
        let s = AmqpSettings::from_config(&c).unwrap();
        assert_eq!(
            (s.exchange_kind, s.prefetch, s.confirm),
            (ExchangeKind::Topic, 10, false)
        );
        c.backend.insert("confirm".into(), "true".into());
        c.producer.acks = Acks::None;
        assert!(!AmqpSettings::from_config(&c).unwrap().confirm);
        c.backend.insert("autoAck".into(), "true".into());
        assert!(matches!(
            AmqpSettings::from_config(&c),
            Err(Error::Config(_))
        ));
        c.backend.remove("autoAck");
        c.backend.insert("exchangeType".into(), "x".into());
        assert!(matches!(
            AmqpSettings::from_config(&c),
            Err(Error::Config(_))
        ));
        assert!(AmqpSettings::from_config(&Config::with_url("kafka://h")).is_err());
    }
}
