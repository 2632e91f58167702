//! SPEC C7 configuration → librdkafka properties.

use courier_core::{Acks, Config, Error, OffsetReset, Result, SecurityProtocol};
use rdkafka::ClientConfig;

/// Bootstrap servers: the URL's hosts (`kafka://h1:9092,h2:9092`), else
/// `config.brokers`.
pub fn bootstrap(config: &Config) -> Result<String> {
    let url = config.url_or_default();
    let rest = url.strip_prefix("kafka://").unwrap_or("");
    // Userinfo and any path or query are not part of the host list.
    let hosts = rest.split(['/', '?']).next().unwrap_or("");
    let hosts = hosts.rsplit_once('@').map_or(hosts, |(_, h)| h);
    let list: Vec<String> = if hosts.is_empty() {
        config.brokers.clone()
    } else {
        hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.contains(':') {
                    h.to_string()
                } else {
                    format!("{h}:9092")
                }
            })
            .collect()
    };
    if list.is_empty() {
        return Err(Error::NoBrokers);
    }
    Ok(list.join(","))
}

/// Settings every client shares: brokers and security.
pub fn common(config: &Config) -> Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap(config)?);
    c.set("security.protocol", config.security_protocol.as_str());
    if matches!(
        config.security_protocol,
        SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
    ) {
        let mechanism = config
            .sasl_mechanism
            .ok_or_else(|| Error::Config("SASL needs saslMechanism".into()))?;
        c.set("sasl.mechanism", mechanism.as_str());
        if let Some(u) = &config.sasl_username {
            c.set("sasl.username", u);
        }
        if let Some(p) = &config.sasl_password {
            c.set("sasl.password", p);
        }
    }
    Ok(c)
}

/// Raw pass-through of `config.backend` (any librdkafka key), applied last so it wins.
fn passthrough(c: &mut ClientConfig, config: &Config, skip: &[&str]) {
    for (k, v) in &config.backend {
        if !skip.contains(&k.as_str()) {
            c.set(k, v);
        }
    }
}

/// Producer properties. Idempotence is on when acks = -1 unless configured, which also
/// keeps per-partition order with up to 5 requests in flight.
pub fn producer(config: &Config) -> Result<ClientConfig> {
    let p = &config.producer;
    let mut c = common(config)?;
    let acks = match p.acks {
        Acks::None => "0",
        Acks::Leader => "1",
        Acks::All => "all",
    };
    c.set("acks", acks)
        .set("retries", p.retry_max.to_string())
        .set("batch.size", p.batch_size.max(1).to_string())
        .set("linger.ms", p.linger_ms.to_string())
        .set(
            "enable.idempotence",
            p.enable_idempotence
                .unwrap_or(p.acks == Acks::All)
                .to_string(),
        )
        .set("compression.type", "lz4")
        // Fallback only: Courier picks partitions itself with the same murmur2.
        .set("partitioner", "murmur2_random")
        .set(
            "message.max.bytes",
            (config.max_message_size + 4096).to_string(),
        )
        .set(
            "queue.buffering.max.messages",
            p.max_buffered.clamp(1, 10_000_000).to_string(),
        );
    // Per-partition order across requests in flight: guaranteed with idempotence
    // (librdkafka allows at most 5 then); without it, a retry could still reorder
    // (set `max.in.flight.requests.per.connection=1` in `backend` to rule that out).
    c.set("max.in.flight.requests.per.connection", "5");
    passthrough(&mut c, config, &[]);
    Ok(c)
}

/// Consumer properties for `group`. Commits are Courier's: librdkafka never commits or
/// stores an offset on its own.
pub fn consumer(
    config: &Config,
    group: &str,
    reset: OffsetReset,
    session_timeout_ms: u64,
) -> Result<ClientConfig> {
    let mut c = common(config)?;
    c.set("group.id", group)
        .set(
            "auto.offset.reset",
            match reset {
                OffsetReset::Earliest => "earliest",
                OffsetReset::Latest => "latest",
            },
        )
        .set("session.timeout.ms", session_timeout_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            (session_timeout_ms / 3).max(100).to_string(),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    // Courier owns commits: these keys would let librdkafka commit unhandled messages.
    passthrough(
        &mut c,
        config,
        &[
            "enable.auto.commit",
            "enable.auto.offset.store",
            "group.id",
            // Producer-only keys librdkafka warns about on a consumer.
            "acks",
            "retries",
            "batch.size",
            "linger.ms",
            "enable.idempotence",
            "compression.type",
            "partitioner",
        ],
    );
    Ok(c)
}

/// Properties for admin and metadata clients.
pub fn admin(config: &Config) -> Result<ClientConfig> {
    common(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts_win_over_brokers() {
        let mut c = Config::with_url("kafka://a:1,b");
        c.brokers = vec!["x:9".into()];
        assert_eq!(bootstrap(&c).unwrap(), "a:1,b:9092");
        c.url = Some("kafka://".into());
        assert_eq!(bootstrap(&c).unwrap(), "x:9");
        c.brokers.clear();
        assert!(matches!(bootstrap(&c), Err(Error::NoBrokers)));
    }

    #[test]
    fn producer_maps_seed_names_and_idempotence() {
        let mut c = Config::with_url("kafka://h:9092");
        c.producer.acks = Acks::All;
        c.producer.retry_max = 7;
        c.producer.batch_size = 1000;
        c.producer.linger_ms = 3;
        c.backend.insert("client.id".into(), "me".into());
        let p = producer(&c).unwrap();
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("retries"), Some("7"));
        assert_eq!(p.get("batch.size"), Some("1000"));
        assert_eq!(p.get("linger.ms"), Some("3"));
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("compression.type"), Some("lz4"));
        assert_eq!(p.get("client.id"), Some("me"));
        c.producer.enable_idempotence = Some(false);
        assert_eq!(
            producer(&c).unwrap().get("enable.idempotence"),
            Some("false")
        );
    }

    #[test]
    fn consumer_never_auto_commits() {
        let mut c = Config::with_url("kafka://h:9092");
        c.backend.insert("enable.auto.commit".into(), "true".into());
        let k = consumer(&c, "g", OffsetReset::Earliest, 6000).unwrap();
        assert_eq!(k.get("enable.auto.commit"), Some("false"));
        assert_eq!(k.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(k.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(k.get("session.timeout.ms"), Some("6000"));
    }
}
