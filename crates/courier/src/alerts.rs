//! Alert states for seed 001's rules (SPEC O2), evaluated in process from successive
//! [`StatsSnapshot`]s (and the consumer lag the caller measured). The same rules ship
//! as Prometheus alerting rules in `deploy/prometheus/courier-alerts.yml`.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::stats::StatsSnapshot;

/// Thresholds and hold times; [`AlertRules::default`] is seed 001's set.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertRules {
    /// Consumer lag above this …
    pub max_lag: u64,
    /// … for this long fires `ConsumerLagHigh`.
    pub lag_for: Duration,
    /// Throughput below this fraction of its recent peak …
    pub throughput_drop: f64,
    /// … for this long fires `ThroughputDrop`.
    pub throughput_for: Duration,
    /// How far back the throughput peak is looked for.
    pub throughput_baseline: Duration,
    /// p99 end-to-end latency above this fires `EndToEndLatencyHigh` at once.
    pub max_e2e_latency: Duration,
    /// Error ratio (failed sends and attempts over all) above this …
    pub max_error_rate: f64,
    /// … for this long fires `ErrorRateHigh`.
    pub error_rate_for: Duration,
}

impl Default for AlertRules {
    fn default() -> Self {
        Self {
            max_lag: 1000,
            lag_for: Duration::from_secs(300),
            throughput_drop: 0.5,
            throughput_for: Duration::from_secs(600),
            throughput_baseline: Duration::from_secs(3600),
            max_e2e_latency: Duration::from_secs(5),
            max_error_rate: 0.01,
            error_rate_for: Duration::from_secs(300),
        }
    }
}

/// Where an alert stands (Prometheus' states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AlertState {
    /// Condition false.
    Inactive,
    /// Condition true, not yet for the hold time.
    Pending,
    /// Condition true for the hold time.
    Firing,
}

/// One rule's evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// Rule name (same as in the Prometheus rules file).
    pub name: &'static str,
    /// Current state.
    pub state: AlertState,
    /// The measured value.
    pub value: f64,
    /// The threshold it is compared with.
    pub threshold: f64,
    /// Since when the condition holds (ms since the epoch).
    pub since_ms: Option<i64>,
}

/// Name of each rule.
pub const RULES: [&str; 5] = [
    "ConsumerLagHigh",
    "ThroughputDrop",
    "EndToEndLatencyHigh",
    "ErrorRateHigh",
    "DeadLetters",
];

/// Evaluates the rules over time. Call [`observe`](Self::observe) periodically (e.g.
/// every 15–60 s) with a fresh snapshot; rates come from the difference between
/// successive snapshots, so a [`Client::reset_stats`](crate::Client::reset_stats) in
/// between only costs one interval.
pub struct AlertEvaluator {
    rules: AlertRules,
    last: Option<(i64, u64, u64)>,
    rates: VecDeque<(i64, f64)>,
    since: [Option<i64>; 5],
}

impl AlertEvaluator {
    /// An evaluator for `rules`.
    pub fn new(rules: AlertRules) -> Self {
        Self {
            rules,
            last: None,
            rates: VecDeque::new(),
            since: [None; 5],
        }
    }

    /// Evaluates every rule at `snapshot.at_ms`; `lag` is the largest consumer lag
    /// measured (e.g. `Admin::describe_group(..).total_lag()`), `None` if unknown.
    pub fn observe(&mut self, snapshot: &StatsSnapshot, lag: Option<u64>) -> Vec<Alert> {
        let now = snapshot.at_ms;
        let t = &snapshot.total;
        let ops = t.sent + t.consumed;
        let errors = t.send_errors + t.consume_errors;
        let (rate, error_rate) = match self.last {
            Some((at, prev_ops, prev_err)) if now > at && ops >= prev_ops && errors >= prev_err => {
                let d_ops = ops - prev_ops;
                let d_err = errors - prev_err;
                let secs = (now - at) as f64 / 1000.0;
                let er = if d_ops + d_err == 0 {
                    0.0
                } else {
                    d_err as f64 / (d_ops + d_err) as f64
                };
                (Some(d_ops as f64 / secs), er)
            }
            _ => (None, 0.0),
        };
        self.last = Some((now, ops, errors));
        let horizon = now - self.rules.throughput_baseline.as_millis() as i64;
        while self.rates.front().is_some_and(|(at, _)| *at < horizon) {
            self.rates.pop_front();
        }
        let peak = self.rates.iter().map(|(_, r)| *r).fold(0.0, f64::max);
        if let Some(r) = rate {
            self.rates.push_back((now, r));
        }
        let drop = match rate {
            Some(r) if peak > 0.0 => 1.0 - r / peak,
            _ => 0.0,
        };
        let e2e_ms = t.e2e_latency.p99_ms;
        let lag_v = lag.unwrap_or(0) as f64;
        let r = self.rules.clone();
        vec![
            self.rule(
                0,
                now,
                lag_v,
                r.max_lag as f64,
                lag_v > r.max_lag as f64,
                r.lag_for,
            ),
            self.rule(
                1,
                now,
                drop,
                r.throughput_drop,
                drop > r.throughput_drop,
                r.throughput_for,
            ),
            self.rule(
                2,
                now,
                e2e_ms,
                r.max_e2e_latency.as_millis() as f64,
                e2e_ms > r.max_e2e_latency.as_millis() as f64,
                Duration::ZERO,
            ),
            self.rule(
                3,
                now,
                error_rate,
                r.max_error_rate,
                error_rate > r.max_error_rate,
                r.error_rate_for,
            ),
            self.rule(
                4,
                now,
                t.dead_lettered as f64,
                0.0,
                t.dead_lettered > 0,
                Duration::ZERO,
            ),
        ]
    }

    fn rule(
        &mut self,
        i: usize,
        now: i64,
        value: f64,
        threshold: f64,
        holds: bool,
        hold: Duration,
    ) -> Alert {
        if !holds {
            self.since[i] = None;
        } else if self.since[i].is_none() {
            self.since[i] = Some(now);
        }
        let state = match self.since[i] {
            None => AlertState::Inactive,
            Some(s) if now - s >= hold.as_millis() as i64 => AlertState::Firing,
            Some(_) => AlertState::Pending,
        };
        Alert {
            name: RULES[i],
            state,
            value,
            threshold,
            since_ms: self.since[i],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::TopicStats;
    use std::collections::BTreeMap;

    fn snap(at_s: i64, sent: u64, send_errors: u64, dead: u64, e2e_p99_ms: f64) -> StatsSnapshot {
        let mut total = TopicStats {
            sent,
            send_errors,
            dead_lettered: dead,
            ..Default::default()
        };
        total.e2e_latency.p99_ms = e2e_p99_ms;
        StatsSnapshot {
            since_ms: 0,
            at_ms: at_s * 1000,
            success_rate: total.success_rate(),
            total,
            topics: BTreeMap::new(),
        }
    }

    fn state(alerts: &[Alert], name: &str) -> AlertState {
        alerts
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.state)
            .unwrap()
    }

    #[test]
    fn seed_rules_go_pending_then_fire_and_clear() {
        let mut e = AlertEvaluator::new(AlertRules::default());
        // 1000 msg/s for ten minutes, no errors, lag 5000.
        let mut sent = 0;
        let mut last = Vec::new();
        for m in 0..=10 {
            if m > 0 {
                sent += 60_000;
            }
            last = e.observe(&snap(m * 60, sent, 0, 0, 10.0), Some(5000));
            if m == 1 {
                assert_eq!(state(&last, "ConsumerLagHigh"), AlertState::Pending);
            }
        }
        assert_eq!(state(&last, "ConsumerLagHigh"), AlertState::Firing);
        assert_eq!(state(&last, "ThroughputDrop"), AlertState::Inactive);
        assert_eq!(state(&last, "ErrorRateHigh"), AlertState::Inactive);
        assert_eq!(state(&last, "DeadLetters"), AlertState::Inactive);
        // Throughput falls to 100 msg/s with 5% errors and a dead letter.
        let mut errors = 0;
        for m in 11..=22 {
            sent += 6_000;
            errors += 300;
            last = e.observe(&snap(m * 60, sent, errors, 1, 6000.0), Some(0));
            if m == 11 {
                assert_eq!(state(&last, "ThroughputDrop"), AlertState::Pending);
                assert_eq!(state(&last, "ErrorRateHigh"), AlertState::Pending);
            }
        }
        assert_eq!(state(&last, "ConsumerLagHigh"), AlertState::Inactive);
        assert_eq!(state(&last, "ThroughputDrop"), AlertState::Firing);
        assert_eq!(state(&last, "ErrorRateHigh"), AlertState::Firing);
        assert_eq!(state(&last, "EndToEndLatencyHigh"), AlertState::Firing);
        assert_eq!(state(&last, "DeadLetters"), AlertState::Firing);
    }
}
