//! Helpers shared by the side-by-side benches (`mod common;` in each bench).
//!
//! Each bench uses a subset, so unused items are expected in any one of them.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use courier::{Client, Message};

/// `name` parsed from the environment, or `default` when unset or unparsable.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `{prefix}-{nanoseconds since the epoch}`: a name no earlier run used, so runs
/// against a shared broker never see each other's topics or groups.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos}")
}

/// 100 incompressible bytes for message `i` (xorshift), so compression flatters
/// neither side; both sides pay the same to build it.
pub fn value(i: usize) -> Vec<u8> {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..100)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Messages per second for `n` messages in `d`.
pub fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Courier's producer with default settings: `send` for every message (keys
/// `k0`…`k999`), then every handle awaited; returns the wall time of both.
pub async fn courier_produce(client: &Client, topic: &str, n: usize) -> Duration {
    let producer = client.producer();
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| producer.send(Message::new(topic, value(i)).key(format!("k{}", i % 1000))))
        .collect();
    for h in handles {
        h.await.expect("send");
    }
    start.elapsed()
}

/// CPU seconds (user + system) this process used so far, all threads included.
/// On a shared machine, CPU per message compares two sides more steadily than
/// wall-clock rates.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Runs `f`, returning its result and the CPU µs per message it used.
pub async fn with_cpu<T>(n: usize, f: impl std::future::Future<Output = T>) -> (T, f64) {
    let c0 = cpu_seconds();
    let out = f.await;
    (out, (cpu_seconds() - c0) * 1e6 / n as f64)
}
