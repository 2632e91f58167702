//! The conformance suite on `amqp://` against RabbitMQ on 127.0.0.1:5672 (guest/guest;
//! `scripts/brokers.sh start`; `COURIER_AMQP_URL` overrides).

use std::time::Duration;

fn amqp() -> courier_conformance::UrlHarness {
    let url = std::env::var("COURIER_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    courier_conformance::UrlHarness::new("amqp", url, courier_conformance::harness::fast_config())
        .patience(Duration::from_secs(30))
}

courier_conformance::conformance_tests!(amqp());
