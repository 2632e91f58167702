//! Metrics (SPEC O1): every count and latency is recorded twice — into the `metrics`
//! facade (so any installed recorder, e.g. Prometheus, sees it, labelled by topic and
//! group) and into an in-process registry behind [`Client::stats`](crate::Client::stats)
//! that works without any recorder and can be reset.
//!
//! The hot path touches only pre-registered handles and atomics: a topic's (or
//! topic × group's) handles are looked up once per publish batch or per partition
//! worker, never built per message. Each partition worker counts its handled
//! messages in its own [`Shard`] (no cache line shared with other workers); shards
//! are summed into the topic's numbers when a snapshot is taken.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

/// Metric names as exported (Prometheus style).
pub mod names {
    /// Messages stored by the backend, by `topic`.
    pub const SENT: &str = "courier_messages_sent_total";
    /// Sends that failed, by `topic`.
    pub const SEND_ERRORS: &str = "courier_send_errors_total";
    /// Messages handled successfully, by `topic` and `group`.
    pub const CONSUMED: &str = "courier_messages_consumed_total";
    /// Handler failures (each failed attempt), by `topic` and `group`.
    pub const CONSUME_ERRORS: &str = "courier_consume_errors_total";
    /// In-place retries, by `topic` and `group`.
    pub const RETRIES: &str = "courier_retries_total";
    /// Messages published to a dead-letter topic, by `topic` and `group`.
    pub const DEAD_LETTERED: &str = "courier_dead_letters_total";
    /// Send latency (send call to receipt), seconds, by `topic`.
    pub const SEND_LATENCY: &str = "courier_send_latency_seconds";
    /// End-to-end latency (message timestamp to handler start), seconds.
    pub const E2E_LATENCY: &str = "courier_e2e_latency_seconds";
    /// Messages not yet consumed, by `group`, `topic`, `partition` (set by
    /// [`Client::record_lag`](crate::Client::record_lag)).
    pub const CONSUMER_LAG: &str = "courier_consumer_lag";
}

/// Log-linear histogram over microseconds: 8 sub-buckets per power of two (≤ 12.5%
/// relative error), lock-free.
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

const BUCKETS: usize = 8 + 61 * 8;

fn bucket_of(us: u64) -> usize {
    if us < 8 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize; // ≥ 3
    let m = ((us >> (e - 3)) & 7) as usize;
    (8 + (e - 3) * 8 + m).min(BUCKETS - 1)
}

fn bucket_upper(idx: usize) -> u64 {
    if idx < 8 {
        return idx as u64 + 1;
    }
    let e = (idx - 8) / 8 + 3;
    let m = ((idx - 8) % 8) as u64;
    (8 + m + 1) << (e - 3)
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buckets[bucket_of(us)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Relaxed);
        }
        self.count.store(0, Relaxed);
        self.sum_us.store(0, Relaxed);
    }

    fn merge_into(&self, acc: &mut LatencyAcc) {
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Relaxed);
            if n > 0 {
                acc.buckets[i] += n;
            }
        }
        acc.count += self.count.load(Relaxed);
        acc.sum_us += self.sum_us.load(Relaxed);
    }
}

struct LatencyAcc {
    buckets: Vec<u64>,
    count: u64,
    sum_us: u64,
}

impl LatencyAcc {
    fn new() -> Self {
        Self {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum_us: 0,
        }
    }

    fn summary(&self) -> LatencySummary {
        if self.count == 0 {
            return LatencySummary::default();
        }
        let rank = (self.count * 99).div_ceil(100);
        let mut seen = 0;
        let mut p99 = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                p99 = bucket_upper(i);
                break;
            }
        }
        LatencySummary {
            count: self.count,
            avg_ms: self.sum_us as f64 / self.count as f64 / 1000.0,
            p99_ms: p99 as f64 / 1000.0,
        }
    }
}

/// Count, average and 99th percentile of one latency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean, milliseconds.
    pub avg_ms: f64,
    /// 99th percentile (bucket upper bound, ≤ 12.5% above the true value), ms.
    pub p99_ms: f64,
}

/// The counters of one topic (producer side) or one topic × group (consumer side).
pub(crate) struct Counters {
    topic: Arc<str>,
    sent: AtomicU64,
    send_errors: AtomicU64,
    consumed: AtomicU64,
    consume_errors: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    send_latency: Histogram,
    e2e_latency: Histogram,
    m_sent: metrics::Counter,
    m_send_errors: metrics::Counter,
    m_consumed: metrics::Counter,
    m_consume_errors: metrics::Counter,
    m_retries: metrics::Counter,
    m_dead_lettered: metrics::Counter,
    m_send_latency: metrics::Histogram,
    m_e2e_latency: metrics::Histogram,
    /// Per-worker consume counters, summed on snapshot.
    shards: Mutex<Vec<Arc<Shard>>>,
}

/// End-to-end latency is timed for one handled message in this many (per worker;
/// the first always): reading the clock per message costs more than the rest of the
/// metrics step, and a sample gives the same average and p99.
pub(crate) const E2E_SAMPLE_EVERY: u64 = 16;

/// One partition worker's consume counters of one topic × group: written by that
/// worker only, read by snapshots.
pub(crate) struct Shard {
    topic: Arc<str>,
    consumed: AtomicU64,
    consume_errors: AtomicU64,
    e2e_latency: Histogram,
    seen: AtomicU64,
    m_consumed: metrics::Counter,
    m_consume_errors: metrics::Counter,
    m_e2e_latency: metrics::Histogram,
}

impl Shard {
    /// The topic counted.
    pub(crate) fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub(crate) fn consumed(&self) {
        self.consumed.fetch_add(1, Relaxed);
        self.m_consumed.increment(1);
    }

    pub(crate) fn consume_error(&self) {
        self.consume_errors.fetch_add(1, Relaxed);
        self.m_consume_errors.increment(1);
    }

    /// True when this message's end-to-end latency is to be timed (a sample).
    pub(crate) fn sample_e2e(&self) -> bool {
        // Single writer: a load and a store, no locked read-modify-write.
        let n = self.seen.load(Relaxed);
        self.seen.store(n.wrapping_add(1), Relaxed);
        n.is_multiple_of(E2E_SAMPLE_EVERY)
    }

    pub(crate) fn e2e_latency(&self, d: Duration) {
        self.e2e_latency.record(d);
        self.m_e2e_latency.record(d.as_secs_f64());
    }

    fn reset(&self) {
        self.consumed.store(0, Relaxed);
        self.consume_errors.store(0, Relaxed);
        self.e2e_latency.reset();
    }
}

impl Counters {
    fn new(topic: &str, group: Option<&str>) -> Self {
        let labels: Vec<metrics::Label> = match group {
            Some(g) => vec![
                metrics::Label::new("topic", topic.to_string()),
                metrics::Label::new("group", g.to_string()),
            ],
            None => vec![metrics::Label::new("topic", topic.to_string())],
        };
        Self {
            topic: Arc::from(topic),
            sent: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            consume_errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            send_latency: Histogram::new(),
            e2e_latency: Histogram::new(),
            m_sent: metrics::counter!(names::SENT, labels.clone()),
            m_send_errors: metrics::counter!(names::SEND_ERRORS, labels.clone()),
            m_consumed: metrics::counter!(names::CONSUMED, labels.clone()),
            m_consume_errors: metrics::counter!(names::CONSUME_ERRORS, labels.clone()),
            m_retries: metrics::counter!(names::RETRIES, labels.clone()),
            m_dead_lettered: metrics::counter!(names::DEAD_LETTERED, labels.clone()),
            m_send_latency: metrics::histogram!(names::SEND_LATENCY, labels.clone()),
            m_e2e_latency: metrics::histogram!(names::E2E_LATENCY, labels),
            shards: Mutex::new(Vec::new()),
        }
    }

    /// A consume shard for one worker: an idle one (its worker ended) is reused, so
    /// shards stay as many as workers ever ran at once.
    pub(crate) fn shard(&self) -> Arc<Shard> {
        let mut shards = self.shards.lock();
        if let Some(s) = shards.iter().find(|s| Arc::strong_count(s) == 1) {
            return s.clone();
        }
        let s = Arc::new(Shard {
            topic: self.topic.clone(),
            consumed: AtomicU64::new(0),
            consume_errors: AtomicU64::new(0),
            e2e_latency: Histogram::new(),
            seen: AtomicU64::new(0),
            m_consumed: self.m_consumed.clone(),
            m_consume_errors: self.m_consume_errors.clone(),
            m_e2e_latency: self.m_e2e_latency.clone(),
        });
        shards.push(s.clone());
        s
    }

    fn consumed_total(&self) -> (u64, u64) {
        let shards = self.shards.lock();
        let mut ok = self.consumed.load(Relaxed);
        let mut err = self.consume_errors.load(Relaxed);
        for s in shards.iter() {
            ok += s.consumed.load(Relaxed);
            err += s.consume_errors.load(Relaxed);
        }
        (ok, err)
    }

    fn merge_e2e(&self, acc: &mut LatencyAcc) {
        self.e2e_latency.merge_into(acc);
        for s in self.shards.lock().iter() {
            s.e2e_latency.merge_into(acc);
        }
    }

    /// The topic these counters belong to.
    pub(crate) fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub(crate) fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Relaxed);
        self.m_sent.increment(n);
    }
    pub(crate) fn send_error(&self, n: u64) {
        self.send_errors.fetch_add(n, Relaxed);
        self.m_send_errors.increment(n);
    }
    pub(crate) fn send_latency(&self, d: Duration) {
        self.send_latency.record(d);
        self.m_send_latency.record(d.as_secs_f64());
    }
    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Relaxed);
        self.m_retries.increment(1);
    }
    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Relaxed);
        self.m_dead_lettered.increment(1);
    }

    fn reset(&self) {
        for a in [
            &self.sent,
            &self.send_errors,
            &self.consumed,
            &self.consume_errors,
            &self.retries,
            &self.dead_lettered,
        ] {
            a.store(0, Relaxed);
        }
        self.send_latency.reset();
        self.e2e_latency.reset();
        for s in self.shards.lock().iter() {
            s.reset();
        }
    }
}

/// Producer-side counters of a topic, then its consumer groups' (few per topic).
#[derive(Default)]
struct TopicEntry {
    producer: Option<Arc<Counters>>,
    groups: Vec<(Arc<str>, Arc<Counters>)>,
}

impl TopicEntry {
    fn find(&self, group: Option<&str>) -> Option<&Arc<Counters>> {
        match group {
            None => self.producer.as_ref(),
            Some(g) => self.groups.iter().find(|(n, _)| &**n == g).map(|(_, c)| c),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Counters>> {
        self.producer
            .iter()
            .chain(self.groups.iter().map(|(_, c)| c))
    }
}

/// The in-process registry shared by a client's producers and consumers.
pub(crate) struct Registry {
    by_topic: RwLock<HashMap<Arc<str>, TopicEntry>>,
    since_ms: Mutex<i64>,
}

impl Registry {
    pub(crate) fn new() -> Self {
        Self {
            by_topic: RwLock::new(HashMap::new()),
            since_ms: Mutex::new(courier_core::now_millis()),
        }
    }

    /// The counters for `topic` (and `group`, on the consumer side).
    pub(crate) fn counters(&self, topic: &str, group: Option<&str>) -> Arc<Counters> {
        if let Some(c) = self.by_topic.read().get(topic).and_then(|e| e.find(group)) {
            return c.clone();
        }
        let mut map = self.by_topic.write();
        let entry = map.entry(Arc::from(topic)).or_default();
        if let Some(c) = entry.find(group) {
            return c.clone();
        }
        let c = Arc::new(Counters::new(topic, group));
        match group {
            None => entry.producer = Some(c.clone()),
            Some(g) => entry.groups.push((Arc::from(g), c.clone())),
        }
        c
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let map = self.by_topic.read();
        let mut topics: BTreeMap<String, (TopicStats, LatencyAcc, LatencyAcc)> = BTreeMap::new();
        let mut all_send = LatencyAcc::new();
        let mut all_e2e = LatencyAcc::new();
        for c in map.values().flat_map(TopicEntry::all) {
            let entry = topics
                .entry(c.topic.to_string())
                .or_insert_with(|| (TopicStats::default(), LatencyAcc::new(), LatencyAcc::new()));
            let t = &mut entry.0;
            t.sent += c.sent.load(Relaxed);
            t.send_errors += c.send_errors.load(Relaxed);
            let (ok, err) = c.consumed_total();
            t.consumed += ok;
            t.consume_errors += err;
            t.retries += c.retries.load(Relaxed);
            t.dead_lettered += c.dead_lettered.load(Relaxed);
            c.send_latency.merge_into(&mut entry.1);
            c.merge_e2e(&mut entry.2);
            c.send_latency.merge_into(&mut all_send);
            c.merge_e2e(&mut all_e2e);
        }
        let mut total = TopicStats::default();
        let topics = topics
            .into_iter()
            .map(|(name, (mut t, send, e2e))| {
                t.send_latency = send.summary();
                t.e2e_latency = e2e.summary();
                total.add(&t);
                (name, t)
            })
            .collect();
        total.send_latency = all_send.summary();
        total.e2e_latency = all_e2e.summary();
        StatsSnapshot {
            since_ms: *self.since_ms.lock(),
            at_ms: courier_core::now_millis(),
            success_rate: total.success_rate(),
            total,
            topics,
        }
    }

    pub(crate) fn reset(&self) {
        for c in self.by_topic.read().values().flat_map(TopicEntry::all) {
            c.reset();
        }
        *self.since_ms.lock() = courier_core::now_millis();
    }
}

/// A consumer-side handle cache: one partition worker sees one topic, so the lookup
/// happens once per worker, not per message.
#[derive(Clone)]
pub(crate) struct GroupCounters {
    registry: Arc<Registry>,
    group: Arc<str>,
    cur: Option<Arc<Counters>>,
}

impl GroupCounters {
    pub(crate) fn new(registry: Arc<Registry>, group: Arc<str>) -> Self {
        Self {
            registry,
            group,
            cur: None,
        }
    }

    /// The counters of `topic` × this group.
    pub(crate) fn get(&mut self, topic: &Arc<str>) -> Arc<Counters> {
        match &self.cur {
            Some(c) if Arc::ptr_eq(c.topic(), topic) || c.topic() == topic => c.clone(),
            _ => {
                let c = self.registry.counters(topic, Some(&self.group));
                self.cur = Some(c.clone());
                c
            }
        }
    }

    pub(crate) fn group(&self) -> &Arc<str> {
        &self.group
    }

    /// A consume shard of `topic` × this group for one worker.
    pub(crate) fn shard(&mut self, topic: &Arc<str>) -> Arc<Shard> {
        self.get(topic).shard()
    }
}

/// Counts and latencies of one topic (or of everything, in [`StatsSnapshot::total`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicStats {
    /// Messages stored by the backend.
    pub sent: u64,
    /// Failed sends.
    pub send_errors: u64,
    /// Messages handled successfully.
    pub consumed: u64,
    /// Failed handler attempts.
    pub consume_errors: u64,
    /// In-place retries.
    pub retries: u64,
    /// Messages moved to a dead-letter topic.
    pub dead_lettered: u64,
    /// Send call to receipt.
    pub send_latency: LatencySummary,
    /// Message timestamp to handler start.
    pub e2e_latency: LatencySummary,
}

impl TopicStats {
    fn add(&mut self, o: &TopicStats) {
        self.sent += o.sent;
        self.send_errors += o.send_errors;
        self.consumed += o.consumed;
        self.consume_errors += o.consume_errors;
        self.retries += o.retries;
        self.dead_lettered += o.dead_lettered;
    }

    /// Successful operations (sends and handler attempts) over all attempted; 1.0
    /// when nothing happened.
    pub fn success_rate(&self) -> f64 {
        let ok = self.sent + self.consumed;
        let all = ok + self.send_errors + self.consume_errors;
        if all == 0 {
            1.0
        } else {
            ok as f64 / all as f64
        }
    }
}

/// A point-in-time copy of a client's counters since creation or the last
/// [`Client::reset_stats`](crate::Client::reset_stats).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    /// Start of the counting period, ms since the epoch.
    pub since_ms: i64,
    /// When the snapshot was taken.
    pub at_ms: i64,
    /// Sum over all topics.
    pub total: TopicStats,
    /// `total.success_rate()`.
    pub success_rate: f64,
    /// Per topic.
    pub topics: BTreeMap<String, TopicStats>,
}

impl StatsSnapshot {
    /// The counts of `topic` (zeros when it saw no traffic).
    pub fn topic(&self, topic: &str) -> TopicStats {
        self.topics.get(topic).cloned().unwrap_or_default()
    }
}

/// Installs a Prometheus recorder as the process's global `metrics` recorder and
/// returns its handle (`handle.render()` gives the text exposition, e.g. for a
/// `/metrics` endpoint). Install it before creating clients: handles registered
/// earlier stay with the previous recorder. Fails if a recorder is already installed.
pub fn install_prometheus_recorder(
) -> courier_core::Result<metrics_exporter_prometheus::PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| courier_core::Error::Config(format!("prometheus recorder: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_bound_the_value() {
        for us in [0u64, 1, 7, 8, 9, 15, 16, 100, 999, 1000, 123_456, 5_000_000] {
            let i = bucket_of(us);
            assert!(bucket_upper(i) > us, "{us}");
            assert!(bucket_upper(i) as f64 <= (us as f64 * 1.125).max(us as f64 + 1.0) + 1.0);
        }
    }

    #[test]
    fn snapshot_sums_groups_and_resets() {
        let r = Registry::new();
        let a = r.counters("t", None);
        let b = r.counters("t", Some("g"));
        assert!(Arc::ptr_eq(&a, &r.counters("t", None)));
        a.sent(3);
        a.send_error(1);
        b.shard().consumed();
        b.retry();
        for ms in 1..=100 {
            a.send_latency(Duration::from_millis(ms));
        }
        let s = r.snapshot();
        let t = s.topic("t");
        assert_eq!((t.sent, t.send_errors, t.consumed, t.retries), (3, 1, 1, 1));
        assert!((t.send_latency.avg_ms - 50.5).abs() < 0.01);
        assert!(t.send_latency.p99_ms >= 99.0 && t.send_latency.p99_ms <= 112.0);
        assert_eq!(s.success_rate, 0.8);
        let w1 = b.shard();
        let w2 = b.shard();
        assert!(!Arc::ptr_eq(&w1, &w2), "one shard per live worker");
        w1.consumed();
        w2.consumed();
        w2.consume_error();
        w1.e2e_latency(Duration::from_millis(3));
        let t = r.snapshot().topic("t");
        assert_eq!(
            (t.consumed, t.consume_errors, t.e2e_latency.count),
            (3, 1, 1)
        );
        // The shard of the first `consumed` above was idle and reused: two in all.
        drop(w1);
        let w3 = b.shard();
        assert_eq!(b.shards.lock().len(), 2, "an idle shard is reused");
        assert!(
            (0..E2E_SAMPLE_EVERY * 2)
                .filter(|_| w3.sample_e2e())
                .count()
                == 2
        );
        r.reset();
        assert_eq!(r.snapshot().topic("t"), TopicStats::default());
    }
}
