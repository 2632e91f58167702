//! The conformance suite on `redis://` against the server on 127.0.0.1:6379
//! (`COURIER_REDIS_URL` overrides). Every test uses fresh topic and group names, so
//! the shared server is never flushed.

fn redis() -> courier_conformance::UrlHarness {
    let url =
        std::env::var("COURIER_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    courier_conformance::UrlHarness::new("redis", url, courier_conformance::harness::fast_config())
}

courier_conformance::conformance_tests!(redis());
