//! The conformance suite on `kafka://` against the broker on 127.0.0.1:9092 (tansu in
//! CI; `scripts/brokers.sh start`).
//!
//! Group joins on tansu take about half of `session.timeout.ms`, so the harness uses a
//! 6 s session timeout and more patience than the in-process backends.

use std::time::Duration;

fn kafka() -> courier_conformance::UrlHarness {
    let mut config = courier_conformance::harness::fast_config();
    config.consumer.session_timeout_ms = 6000;
    let url =
        std::env::var("COURIER_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    courier_conformance::UrlHarness::new("kafka", url, config).patience(Duration::from_secs(45))
}

courier_conformance::conformance_tests!(kafka());
