//! The conformance suite on `nats://` against the JetStream server on 127.0.0.1:4222
//! (`COURIER_NATS_URL` overrides; `scripts/brokers.sh start` starts one).

fn nats() -> courier_conformance::UrlHarness {
    let url = std::env::var("COURIER_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    courier_conformance::UrlHarness::new("nats", url, courier_conformance::harness::fast_config())
}

courier_conformance::conformance_tests!(nats());
