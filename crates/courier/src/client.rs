//! [`Client`]: owns the backend connection and hands out producers and consumers
//! (SPEC C6).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use courier_core::{
    Capabilities, Config, Driver, Error, GroupInfo, ResetTo, Result, SubscribeSpec, TopicInfo,
    TopicSpec,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connect::connect_driver;
use crate::consumer::{ConsumerBuilder, Statuses};
use crate::dead_letters::DeadLetters;
use crate::live::{ConfigSource, Live};
use crate::producer::Producer;
use crate::schedule::{ScheduleOptions, Scheduler};
use crate::stats::{Registry, StatsSnapshot};
use crate::txn::Transactions;
use crate::validate::{validate_group, validate_topic};

struct Inner {
    driver: Arc<dyn Driver>,
    config: Config,
    shutdown: CancellationToken,
    consumers: TaskTracker,
    producers: Mutex<Vec<Producer>>,
    stats: Arc<Registry>,
    statuses: Statuses,
    schedule: Arc<Scheduler>,
    /// Stops this client's scheduler member when the last clone is dropped.
    _schedule_guard: tokio_util::sync::DropGuard,
    live: Arc<Live>,
    /// Stops config watches when the last clone is dropped.
    watch_stop: CancellationToken,
    _watch_guard: tokio_util::sync::DropGuard,
}

/// Entry point: one backend connection, chosen by URL. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to `url` (`file://./data`, `memory://name`, `kafka://h:9092`, …) with
    /// development defaults. An unknown scheme is [`Error::UnsupportedBackend`].
    pub async fn connect(url: &str) -> Result<Client> {
        Self::connect_with(Config::with_url(url)).await
    }

    /// Connects with a full configuration; `config.url` picks the backend
    /// (`file://./data` when absent).
    pub async fn connect_with(config: Config) -> Result<Client> {
        config.validate()?;
        let driver = connect_driver(&config).await?;
        tracing::info!(backend = driver.name(), url = %courier_core::config::redact_url(config.url_or_default()), "connected");
        let client = Self::from_driver(driver, config);
        client.resume_local_schedule().await?;
        Ok(client)
    }

    /// On the in-process backends, a restarted application resumes pending delayed
    /// messages and halves of the default scope without being asked (a metadata
    /// lookup, no I/O when nothing was ever scheduled). Network backends start the
    /// member on first use or [`Client::start_scheduler`], so plain clients never join
    /// the scheduler group.
    async fn resume_local_schedule(&self) -> Result<()> {
        if !matches!(self.backend(), "file" | "memory") {
            return Ok(());
        }
        let log = self.inner.schedule.options().log_topic();
        if self.inner.driver.partitions(&log).await?.is_some() {
            self.start_scheduler().await?;
        }
        Ok(())
    }

    /// Wraps an already built driver (custom backends, tests).
    pub fn from_driver(driver: Arc<dyn Driver>, config: Config) -> Client {
        let shutdown = CancellationToken::new();
        let consumers = TaskTracker::new();
        let schedule_stop = shutdown.child_token();
        let schedule = Arc::new(Scheduler::new(
            driver.clone(),
            schedule_stop.clone(),
            consumers.clone(),
            Duration::from_millis(config.consumer.session_timeout_ms),
        ));
        let watch_stop = shutdown.child_token();
        Client {
            inner: Arc::new(Inner {
                driver,
                live: Arc::new(Live::new(&config)),
                _watch_guard: watch_stop.clone().drop_guard(),
                watch_stop,
                config,
                shutdown,
                consumers,
                producers: Mutex::new(Vec::new()),
                stats: Arc::new(Registry::new()),
                statuses: Statuses::default(),
                schedule,
                _schedule_guard: schedule_stop.drop_guard(),
            }),
        }
    }

    /// Sets this client's scheduler settings (scope, check-back timing, limits).
    /// Fails once the member has started.
    pub fn set_schedule_options(&self, opts: ScheduleOptions) -> Result<()> {
        self.inner.schedule.set_options(opts)
    }

    /// The scheduler settings in force.
    pub fn schedule_options(&self) -> ScheduleOptions {
        self.inner.schedule.options()
    }

    /// Starts this client's scheduler member, which moves due delayed messages and
    /// settles halves of its scope. Idempotent. Happens by itself on the first delayed
    /// send, `prepare` or decision, and at connect on `file://`/`memory://` when the
    /// scope's schedule log exists; a process that only needs pending messages moved
    /// (e.g. after a restart on a network backend) calls this.
    pub async fn start_scheduler(&self) -> Result<()> {
        self.inner.schedule.ensure_started().await.map(|_| ())
    }

    /// True once this client's scheduler member runs.
    pub fn scheduler_started(&self) -> bool {
        self.inner.schedule.is_started()
    }

    /// Starts the member if needed and waits until it owns every partition of the
    /// schedule log, so due times are honoured from now on (meaningful with one member
    /// per scope: tests, single-instance services). [`Error::Timeout`] otherwise.
    pub async fn scheduler_ready(&self, timeout: Duration) -> Result<()> {
        self.inner.schedule.ready(timeout).await
    }

    /// Delayed messages and halves this client's scheduler member holds in its index
    /// (0 before it starts).
    pub fn scheduler_pending(&self) -> usize {
        self.inner
            .schedule
            .pending
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decides halves by id and registers the check-back ([`crate::TxnChecker`]).
    pub fn transactions(&self) -> Transactions {
        Transactions {
            sched: self.inner.schedule.clone(),
        }
    }

    /// The configuration the client was connected with. Settings changed live
    /// through [`watch_config`](Self::watch_config) are in
    /// [`current_config`](Self::current_config).
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The configuration in force now: the connect-time one with the live changes
    /// applied (see [`crate::live`] for which settings change while running).
    pub fn current_config(&self) -> Arc<Config> {
        self.inner.live.current()
    }

    /// Applies every configuration `source` yields until the client shuts down (or
    /// its last clone is dropped): producers use the new compression threshold from
    /// their next message, and consumers that took the client's commit
    /// interval, session timeout or offset reset rejoin their group with the new
    /// value after committing what they handled. Invalid updates are ignored with a
    /// warning. Several sources may be watched; the latest update wins.
    pub fn watch_config<S: ConfigSource>(&self, mut source: S) {
        let live = self.inner.live.clone();
        let stop = self.inner.watch_stop.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    c = source.next() => c,
                };
                match next {
                    Some(c) => {
                        live.apply(c);
                    }
                    None => break,
                }
            }
        });
    }

    /// The backend's name (`memory`, `file`, `kafka` …).
    pub fn backend(&self) -> &'static str {
        self.inner.driver.name()
    }

    /// What the backend does natively.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.driver.capabilities()
    }

    /// The driver, for admin calls and tests.
    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.inner.driver
    }

    /// A new producer. Producers are flushed and closed by [`Client::shutdown`].
    pub fn producer(&self) -> Producer {
        let p = Producer::new(
            self.inner.driver.clone(),
            self.inner.config.max_message_size,
            self.inner.config.producer.max_buffered,
            self.inner.stats.clone(),
            Some(self.inner.schedule.clone()),
            self.inner.live.clone(),
        );
        if self.inner.shutdown.is_cancelled() {
            // Refuse sends on a closed client without blocking the caller.
            let closing = p.clone();
            tokio::spawn(async move { closing.close().await });
        }
        let mut ps = self.inner.producers.lock();
        ps.retain(|p| !p.is_closed());
        ps.push(p.clone());
        p
    }

    /// A consumer builder for `group`, with the client's consumer settings.
    pub fn consumer(&self, group: impl Into<String>) -> ConsumerBuilder {
        let current = self.inner.live.current();
        let c = &current.consumer;
        let mut spec = SubscribeSpec::new(group, Vec::new());
        spec.auto_offset_reset = c.auto_offset_reset;
        spec.session_timeout = Duration::from_millis(c.session_timeout_ms);
        spec.commit_interval = Duration::from_millis(c.auto_commit_interval_ms.max(1));
        ConsumerBuilder::new(
            self.inner.driver.clone(),
            self.inner.shutdown.clone(),
            self.inner.consumers.clone(),
            spec,
            self.inner.stats.clone(),
            self.inner.statuses.clone(),
            self.inner.live.subscribe(),
        )
    }

    /// Counts and latencies of this client's producers and consumers since it was
    /// created or [`reset_stats`](Self::reset_stats) was last called (SPEC O1). The
    /// same numbers go to the `metrics` facade (see
    /// [`install_prometheus_recorder`](crate::install_prometheus_recorder)).
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Zeroes the counters behind [`stats`](Self::stats) (the `metrics` facade's
    /// counters are monotonic and are not reset).
    pub fn reset_stats(&self) {
        self.inner.stats.reset();
    }

    /// Lists and re-drives dead letters (SPEC R3).
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters::new(self.clone())
    }

    /// Admin operations (SPEC A1, A2) with input validation.
    pub fn admin(&self) -> Admin {
        Admin {
            driver: self.inner.driver.clone(),
        }
    }

    /// A real round trip to the backend (for liveness probes).
    pub async fn health_check(&self) -> Result<()> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::ClientClosed);
        }
        self.inner.driver.health().await
    }

    /// Readiness (SPEC R9, for `/readyz`): the backend answers a round trip and every
    /// running consumer owns at least one partition and is connected. A member
    /// waiting for its group to assign partitions is not ready.
    pub async fn readiness(&self) -> Result<()> {
        self.health_check().await?;
        let statuses: Vec<_> = self.inner.statuses.lock().iter().cloned().collect();
        for s in statuses.iter().filter(|s| s.is_running()) {
            s.check()?;
        }
        Ok(())
    }

    /// Records each partition's lag of `group` in the `courier_consumer_lag` gauge
    /// (labels `group`, `topic`, `partition`) and returns the total lag (SPEC O1).
    pub async fn record_lag(&self, group: &str) -> Result<u64> {
        let info = self.admin().describe_group(group).await?;
        for o in &info.offsets {
            metrics::gauge!(
                crate::stats::names::CONSUMER_LAG,
                "group" => group.to_string(),
                "topic" => o.topic.clone(),
                "partition" => o.partition.to_string()
            )
            .set(o.lag as f64);
        }
        Ok(info.total_lag())
    }

    /// True once [`Client::shutdown`] started.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Graceful shutdown: consumers stop fetching, finish in-flight handlers and
    /// commit; producers deliver what they buffered; then the backend connection
    /// closes. Gives up waiting after `timeout` ([`Error::Timeout`]); whatever was not
    /// committed by then is delivered again later (at-least-once).
    pub async fn shutdown(&self, timeout: Duration) -> Result<()> {
        self.inner.shutdown.cancel();
        self.inner.consumers.close();
        let work = async {
            self.inner.consumers.wait().await;
            let producers = std::mem::take(&mut *self.inner.producers.lock());
            for p in producers {
                p.close().await?;
            }
            self.inner.driver.close().await
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| Error::Timeout(timeout))?
    }
}

/// Admin operations over the client's backend.
#[derive(Clone)]
pub struct Admin {
    driver: Arc<dyn Driver>,
}

impl Admin {
    /// Creates a topic; [`Error::TopicExists`] when present.
    pub async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        validate_topic(&spec.name)?;
        if spec.partitions == 0 {
            return Err(Error::InvalidArgument(
                "partitions must be at least 1".into(),
            ));
        }
        self.driver.create_topic(spec).await
    }

    /// Creates the topic unless it exists (then does nothing).
    pub async fn ensure_topic(&self, spec: TopicSpec) -> Result<()> {
        match self.create_topic(spec).await {
            Ok(()) | Err(Error::TopicExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// True when the topic exists.
    pub async fn topic_exists(&self, name: &str) -> Result<bool> {
        validate_topic(name)?;
        Ok(self.driver.partitions(name).await?.is_some())
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        validate_topic(name)?;
        self.driver.delete_topic(name).await
    }

    /// All topics, sorted.
    pub async fn list_topics(&self) -> Result<Vec<String>> {
        self.driver.list_topics().await
    }

    /// Partitions, extents and config of a topic.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        validate_topic(name)?;
        self.driver.describe_topic(name).await
    }

    /// Updates topic settings (`retention.ms`, `max.message.bytes`, …).
    pub async fn update_topic_config(
        &self,
        name: &str,
        config: BTreeMap<String, String>,
    ) -> Result<()> {
        validate_topic(name)?;
        self.driver.update_topic_config(name, config).await
    }

    /// Grows a topic to `total` partitions.
    pub async fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        validate_topic(name)?;
        self.driver.add_partitions(name, total).await
    }

    /// All consumer groups, sorted.
    pub async fn list_groups(&self) -> Result<Vec<String>> {
        self.driver.list_groups().await
    }

    /// Members, committed offsets and lag of a group.
    pub async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        validate_group(group)?;
        self.driver.describe_group(group).await
    }

    /// Moves a group's position on `topic` (the group must have no live members).
    pub async fn reset_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<()> {
        validate_group(group)?;
        validate_topic(topic)?;
        self.driver.reset_offsets(group, topic, to).await
    }
}
