//! Configuration (SPEC C7). Field names serialize as the seeds' JSON names
//! (`brokers`, `securityProtocol`, `producerConfig.acks` …) so existing files load
//! unchanged; Courier's own additions (`url`, `maxMessageSize`, `defaultPartitions`)
//! sit beside them.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Deployment environment for [`Config::defaults`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Env {
    /// Fewer retries, smaller batches (seed 000 §4.1 "development").
    Development,
    /// More retries, bigger batches, acks=all, SASL_SSL (seed 000 §4.1 "production").
    Production,
}

impl FromStr for Env {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "development" | "dev" => Ok(Env::Development),
            "production" | "prod" => Ok(Env::Production),
            other => Err(Error::Config(format!(
                "unknown environment {other:?} (development | production)"
            ))),
        }
    }
}

/// Transport security towards the brokers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    #[serde(rename = "PLAINTEXT")]
    Plaintext,
    /// SASL without TLS.
    #[serde(rename = "SASL_PLAINTEXT")]
    SaslPlaintext,
    /// SASL over TLS.
    #[serde(rename = "SASL_SSL")]
    SaslSsl,
    /// TLS without SASL.
    #[serde(rename = "SSL")]
    Ssl,
}

impl SecurityProtocol {
    /// The name librdkafka and the seeds use.
    pub fn as_str(&self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
            SecurityProtocol::Ssl => "SSL",
        }
    }
}

/// SASL mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// Username and password in clear (use with TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name librdkafka and the seeds use.
    pub fn as_str(&self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Producer acknowledgement level: `0` none, `1` leader, `-1` all in-sync replicas.
/// Backends without replicas treat `-1` as "durably stored".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "i32", into = "i32")]
pub enum Acks {
    /// Fire and forget.
    None,
    /// The leader stored it.
    Leader,
    /// All in-sync replicas stored it.
    All,
}

impl TryFrom<i32> for Acks {
    type Error = String;
    fn try_from(v: i32) -> std::result::Result<Self, String> {
        match v {
            0 => Ok(Acks::None),
            1 => Ok(Acks::Leader),
            -1 => Ok(Acks::All),
            other => Err(format!("acks must be 0, 1 or -1, not {other}")),
        }
    }
}

impl From<Acks> for i32 {
    fn from(a: Acks) -> i32 {
        match a {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => -1,
        }
    }
}

/// Where a group without a committed position starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// From the oldest stored message.
    Earliest,
    /// Only messages produced after joining.
    #[default]
    Latest,
}

impl FromStr for OffsetReset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "earliest" => Ok(OffsetReset::Earliest),
            "latest" => Ok(OffsetReset::Latest),
            other => Err(Error::Config(format!(
                "autoOffsetReset must be earliest or latest, not {other:?}"
            ))),
        }
    }
}

/// Producer settings (seed 000 `ProducerConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProducerConfig {
    /// Acknowledgement level.
    pub acks: Acks,
    /// Retries of a failed send inside the backend client.
    pub retry_max: u32,
    /// Bytes per batch the backend client accumulates.
    pub batch_size: usize,
    /// How long the backend client waits to fill a batch (ms).
    pub linger_ms: u64,
    /// Idempotent produce where the backend has it (`None` = on when acks = -1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_idempotence: Option<bool>,
    /// Most messages buffered in a producer before `send` returns `QueueFull`.
    pub max_buffered: usize,
    /// Values larger than this many bytes are lz4-compressed on backends without a
    /// native codec (SPEC R6; seed 001: 1 KiB). `0` compresses every value that
    /// shrinks; `usize::MAX` turns compression off.
    pub compression_threshold: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Config::defaults(Env::Development).producer
    }
}

/// Consumer settings (seed 000 `ConsumerConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsumerConfig {
    /// Where a new group starts.
    pub auto_offset_reset: OffsetReset,
    /// Commit handled positions periodically (Courier always commits only handled
    /// messages; `false` commits after every handled batch instead of on a timer).
    pub enable_auto_commit: bool,
    /// Interval of background commits (ms).
    pub auto_commit_interval_ms: u64,
    /// Member liveness timeout (ms).
    pub session_timeout_ms: u64,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Config::defaults(Env::Development).consumer
    }
}

/// Client configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    /// Backend URL (`file://./data`, `memory://`, `kafka://h:9092`, `redis://…`,
    /// `amqp://…`, `nats://…`). Courier's addition; `None` means `file://./data`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Kafka bootstrap brokers (used when the URL names no hosts).
    pub brokers: Vec<String>,
    /// Transport security.
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism when the protocol uses SASL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sasl_username: Option<String>,
    /// SASL password (never logged; see [`Config::redacted`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sasl_password: Option<String>,
    /// Producer settings.
    #[serde(rename = "producerConfig")]
    pub producer: ProducerConfig,
    /// Consumer settings.
    #[serde(rename = "consumerConfig")]
    pub consumer: ConsumerConfig,
    /// Largest accepted message (key + value + headers) in bytes.
    pub max_message_size: usize,
    /// Partitions of a topic created implicitly by a send or subscribe.
    pub default_partitions: u32,
    /// Raw backend settings passed through unchanged (e.g. librdkafka keys).
    pub backend: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Config::defaults(Env::Development)
    }
}

/// Default compression threshold in bytes (seed 001: values over 1 KiB).
pub const DEFAULT_COMPRESSION_THRESHOLD: usize = 1024;

/// Default message size limit: 1 MiB, Kafka's `message.max.bytes` default.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

impl Config {
    /// Exactly the values of seed 000 §4.1 for `env`, plus Courier's own defaults.
    pub fn defaults(env: Env) -> Self {
        let (brokers, protocol, producer, consumer) = match env {
            Env::Development => (
                vec!["localhost:9092".to_string()],
                SecurityProtocol::Plaintext,
                ProducerConfig {
                    acks: Acks::Leader,
                    retry_max: 3,
                    batch_size: 16384,
                    linger_ms: 5,
                    enable_idempotence: None,
                    max_buffered: 1_000_000,
                    compression_threshold: DEFAULT_COMPRESSION_THRESHOLD,
                },
                ConsumerConfig {
                    auto_offset_reset: OffsetReset::Latest,
                    enable_auto_commit: true,
                    auto_commit_interval_ms: 1000,
                    session_timeout_ms: 10000,
                },
            ),
            Env::Production => (
                vec![
                    "kafka1:9092".to_string(),
                    "kafka2:9092".to_string(),
                    "kafka3:9092".to_string(),
                ],
                SecurityProtocol::SaslSsl,
                ProducerConfig {
                    acks: Acks::All,
                    retry_max: 10,
                    batch_size: 65536,
                    linger_ms: 10,
                    enable_idempotence: None,
                    max_buffered: 1_000_000,
                    compression_threshold: DEFAULT_COMPRESSION_THRESHOLD,
                },
                ConsumerConfig {
                    auto_offset_reset: OffsetReset::Earliest,
                    enable_auto_commit: true,
                    auto_commit_interval_ms: 5000,
                    session_timeout_ms: 30000,
                },
            ),
        };
        Config {
            url: None,
            brokers,
            security_protocol: protocol,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            producer,
            consumer,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            default_partitions: 4,
            backend: BTreeMap::new(),
        }
    }

    /// Development defaults with `url` set.
    pub fn with_url(url: impl Into<String>) -> Self {
        Config {
            url: Some(url.into()),
            ..Config::default()
        }
    }

    /// Parses a TOML or JSON document (JSON when it starts with `{`). Missing fields
    /// take development defaults.
    pub fn parse(text: &str) -> Result<Self> {
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))
        } else {
            toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
        }
    }

    /// Reads a TOML or JSON file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Defaults, then `path` if given, then `COURIER_*` environment variables.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let mut config = match path {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        config.apply_env(std::env::vars())?;
        Ok(config)
    }

    /// Applies `COURIER_*` overrides from `vars`: `COURIER_URL`, `COURIER_BROKERS`
    /// (comma-separated), `COURIER_SECURITY_PROTOCOL`, `COURIER_SASL_MECHANISM`,
    /// `COURIER_SASL_USERNAME`, `COURIER_SASL_PASSWORD`, `COURIER_PRODUCER_ACKS`,
    /// `COURIER_PRODUCER_RETRY_MAX`, `COURIER_PRODUCER_BATCH_SIZE`,
    /// `COURIER_PRODUCER_LINGER_MS`, `COURIER_PRODUCER_COMPRESSION_THRESHOLD`,
    /// `COURIER_CONSUMER_AUTO_OFFSET_RESET`,
    /// `COURIER_CONSUMER_ENABLE_AUTO_COMMIT`, `COURIER_CONSUMER_AUTO_COMMIT_INTERVAL_MS`,
    /// `COURIER_CONSUMER_SESSION_TIMEOUT_MS`, `COURIER_MAX_MESSAGE_SIZE`,
    /// `COURIER_DEFAULT_PARTITIONS`. Unknown `COURIER_*` names are ignored (other tools
    /// share the prefix); a malformed value is an error naming the variable.
    pub fn apply_env<I, K, V>(&mut self, vars: I) -> Result<()>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (k, v) in vars {
            let (k, v) = (k.as_ref(), v.as_ref());
            let Some(name) = k.strip_prefix("COURIER_") else {
                continue;
            };
            let bad = |e: String| Error::Config(format!("{k}: {e}"));
            match name {
                "URL" => self.url = Some(v.to_string()),
                "BROKERS" => {
                    self.brokers = v
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                }
                "SECURITY_PROTOCOL" => {
                    self.security_protocol =
                        serde_json::from_value(v.into()).map_err(|e| bad(e.to_string()))?
                }
                "SASL_MECHANISM" => {
                    self.sasl_mechanism =
                        Some(serde_json::from_value(v.into()).map_err(|e| bad(e.to_string()))?)
                }
                "SASL_USERNAME" => self.sasl_username = Some(v.to_string()),
                "SASL_PASSWORD" => self.sasl_password = Some(v.to_string()),
                "PRODUCER_ACKS" => {
                    let n: i32 = v
                        .parse()
                        .map_err(|e: std::num::ParseIntError| bad(e.to_string()))?;
                    self.producer.acks = Acks::try_from(n).map_err(bad)?
                }
                "PRODUCER_RETRY_MAX" => self.producer.retry_max = parse_num(v).map_err(bad)?,
                "PRODUCER_BATCH_SIZE" => self.producer.batch_size = parse_num(v).map_err(bad)?,
                "PRODUCER_LINGER_MS" => self.producer.linger_ms = parse_num(v).map_err(bad)?,
                "PRODUCER_COMPRESSION_THRESHOLD" => {
                    self.producer.compression_threshold = parse_num(v).map_err(bad)?
                }
                "CONSUMER_AUTO_OFFSET_RESET" => {
                    self.consumer.auto_offset_reset =
                        v.parse().map_err(|e: Error| bad(e.to_string()))?
                }
                "CONSUMER_ENABLE_AUTO_COMMIT" => {
                    self.consumer.enable_auto_commit = v
                        .parse()
                        .map_err(|e: std::str::ParseBoolError| bad(e.to_string()))?
                }
                "CONSUMER_AUTO_COMMIT_INTERVAL_MS" => {
                    self.consumer.auto_commit_interval_ms = parse_num(v).map_err(bad)?
                }
                "CONSUMER_SESSION_TIMEOUT_MS" => {
                    self.consumer.session_timeout_ms = parse_num(v).map_err(bad)?
                }
                "MAX_MESSAGE_SIZE" => self.max_message_size = parse_num(v).map_err(bad)?,
                "DEFAULT_PARTITIONS" => self.default_partitions = parse_num(v).map_err(bad)?,
                _ => {}
            }
        }
        self.validate()
    }

    /// Checks values that would otherwise fail later and less clearly.
    pub fn validate(&self) -> Result<()> {
        if self.default_partitions == 0 {
            return Err(Error::Config("defaultPartitions must be at least 1".into()));
        }
        if self.max_message_size == 0 {
            return Err(Error::Config("maxMessageSize must be at least 1".into()));
        }
        if self.security_protocol != SecurityProtocol::Plaintext
            && self.security_protocol != SecurityProtocol::Ssl
            && self.sasl_mechanism.is_none()
        {
            return Err(Error::Config(format!(
                "securityProtocol {} needs saslMechanism",
                self.security_protocol.as_str()
            )));
        }
        Ok(())
    }

    /// A copy safe to log: the SASL password and secret-looking backend keys are
    /// replaced by `***`.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        if c.sasl_password.is_some() {
            c.sasl_password = Some("***".into());
        }
        for (k, v) in c.backend.iter_mut() {
            let k = k.to_ascii_lowercase();
            if k.contains("password") || k.contains("secret") || k.contains("token") {
                *v = "***".into();
            }
        }
        if let Some(url) = &c.url {
            c.url = Some(redact_url(url));
        }
        c
    }

    /// The URL in force: `url`, else `file://./data`.
    pub fn url_or_default(&self) -> &str {
        self.url.as_deref().unwrap_or(DEFAULT_URL)
    }
}

/// The embedded default backend.
pub const DEFAULT_URL: &str = "file://./data";

/// Replaces a URL's password (`scheme://user:secret@host`) with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn parse_num<T: FromStr>(v: &str) -> std::result::Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse().map_err(|e: T::Err| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_seed_000() {
        let d = Config::defaults(Env::Development);
        assert_eq!(d.brokers, vec!["localhost:9092"]);
        assert_eq!(d.security_protocol, SecurityProtocol::Plaintext);
        assert_eq!(
            (
                d.producer.acks,
                d.producer.retry_max,
                d.producer.batch_size,
                d.producer.linger_ms
            ),
            (Acks::Leader, 3, 16384, 5)
        );
        assert_eq!(d.consumer.auto_offset_reset, OffsetReset::Latest);
        assert!(d.consumer.enable_auto_commit);
        assert_eq!(
            (
                d.consumer.auto_commit_interval_ms,
                d.consumer.session_timeout_ms
            ),
            (1000, 10000)
        );
        let p = Config::defaults(Env::Production);
        assert_eq!(p.brokers, vec!["kafka1:9092", "kafka2:9092", "kafka3:9092"]);
        assert_eq!(p.security_protocol, SecurityProtocol::SaslSsl);
        assert_eq!(
            (
                p.producer.acks,
                p.producer.retry_max,
                p.producer.batch_size,
                p.producer.linger_ms
            ),
            (Acks::All, 10, 65536, 10)
        );
        assert_eq!(p.consumer.auto_offset_reset, OffsetReset::Earliest);
        assert_eq!(
            (
                p.consumer.auto_commit_interval_ms,
                p.consumer.session_timeout_ms
            ),
            (5000, 30000)
        );
    }

    #[test]
    fn seed_json_loads_unchanged() {
        let json = r#"{
            "brokers": ["k1:9092", "k2:9092"],
            "securityProtocol": "SASL_PLAINTEXT",
            "saslMechanism": "SCRAM-SHA-512",
            "saslUsername": "u", "saslPassword": "p",
            "producerConfig": {"acks": -1, "retryMax": 5, "batchSize": 1000, "lingerMs": 2},
            "consumerConfig": {"autoOffsetReset": "earliest", "enableAutoCommit": false,
                               "autoCommitIntervalMs": 10, "sessionTimeoutMs": 6000}
        }"#;
        let c = Config::parse(json).unwrap();
        assert_eq!(c.brokers, vec!["k1:9092", "k2:9092"]);
        assert_eq!(c.sasl_mechanism, Some(SaslMechanism::ScramSha512));
        assert_eq!(c.producer.acks, Acks::All);
        assert_eq!(c.producer.retry_max, 5);
        assert_eq!(c.consumer.auto_offset_reset, OffsetReset::Earliest);
        assert_eq!(c.consumer.session_timeout_ms, 6000);
        let back: Config = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.redacted().sasl_password.as_deref(), Some("***"));
    }

    #[test]
    fn toml_and_env_overrides() {
        let mut c = Config::parse("url = \"memory://\"\n[producerConfig]\nlingerMs = 0\n").unwrap();
        assert_eq!(c.url.as_deref(), Some("memory://"));
        assert_eq!(c.producer.linger_ms, 0);
        assert_eq!(c.producer.batch_size, 16384);
        assert_eq!(c.producer.compression_threshold, 1024);
        c.apply_env([
            ("COURIER_BROKERS", "a:1, b:2"),
            ("COURIER_PRODUCER_ACKS", "-1"),
            ("COURIER_PRODUCER_COMPRESSION_THRESHOLD", "4096"),
            ("COURIER_CONSUMER_AUTO_OFFSET_RESET", "earliest"),
            ("COURIER_UNRELATED", "x"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        assert_eq!(c.brokers, vec!["a:1", "b:2"]);
        assert_eq!(c.producer.acks, Acks::All);
        assert_eq!(c.producer.compression_threshold, 4096);
        assert_eq!(c.consumer.auto_offset_reset, OffsetReset::Earliest);
        let err = c
            .apply_env([("COURIER_PRODUCER_COMPRESSION_THRESHOLD", "big")])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("COURIER_PRODUCER_COMPRESSION_THRESHOLD"),
            "{err}"
        );
        let j = Config::parse(r#"{"producerConfig": {"compressionThreshold": 10}}"#).unwrap();
        assert_eq!(j.producer.compression_threshold, 10);
        let err = c.apply_env([("COURIER_PRODUCER_ACKS", "2")]).unwrap_err();
        assert!(err.to_string().contains("COURIER_PRODUCER_ACKS"), "{err}");
        assert!(Config::parse("producerConfig = 3").is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@h:5672/vh"),
            "amqp://guest:***@h:5672/vh"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }
}
