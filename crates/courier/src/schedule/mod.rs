//! Delayed messages (SPEC P3) and the half-message store of transactions (SPEC P4),
//! built once over the driver SPI so every backend behaves the same.
//!
//! Both live in one internal topic per scope, the *schedule log*
//! (`__courier.schedule.<scope>`), stored by the backend like any topic (durable
//! where the backend is). A scheduler member — one per client that uses the feature,
//! all in the consumer group `__courier.scheduler.<scope>` — reads it, keeps an index
//! ordered by due time, and when an entry is due publishes the original message (same
//! id, key, value, headers) to its target topic, then acknowledges it. Unacknowledged
//! entries come back after a restart or to another member after a rebalance, so
//! nothing pending is lost. On backends that read by position (`file://`,
//! `memory://`) the index keeps only the entry's position, not its payload.

mod engine;
mod wheel;
pub(crate) mod wire;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use courier_core::{now_millis, Driver, Error, Record, Result, SubscribeSpec, TopicSpec};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, OnceCell};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::txn::TxnChecker;

pub use wire::HEADER_DELAY_UNTIL;

/// Settings of a client's scheduler member. Set them with
/// [`Client::set_schedule_options`](crate::Client::set_schedule_options) before the
/// first delayed send, prepare or decision.
#[derive(Clone, Debug)]
pub struct ScheduleOptions {
    /// Names the schedule log and the scheduler group: clients sharing a scope share
    /// pending delayed messages and halves (and check-backs). Default `default`.
    pub scope: String,
    /// Partitions of the schedule log when Courier creates it (members split them).
    pub partitions: u32,
    /// A half undecided this long after `prepare` is checked back.
    pub check_after: Duration,
    /// Wait between check-backs answered [`TxnDecision::Unknown`](crate::TxnDecision).
    pub check_interval: Duration,
    /// Check-backs per half before it is rolled back (and a warning logged).
    pub max_checks: u32,
    /// Most entries one member holds in its index (a larger backlog waits in the log).
    pub max_pending: usize,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        Self {
            scope: "default".into(),
            partitions: 4,
            check_after: Duration::from_secs(6),
            check_interval: Duration::from_secs(30),
            max_checks: 15,
            max_pending: 4_000_000,
        }
    }
}

impl ScheduleOptions {
    /// The schedule log's topic name.
    pub fn log_topic(&self) -> String {
        format!("{SCHEDULE_PREFIX}{}", self.scope)
    }
}

/// Prefix of every schedule log topic.
pub const SCHEDULE_PREFIX: &str = "__courier.schedule.";

/// A started member.
pub(crate) struct Started {
    pub(crate) log: String,
    pub(crate) partitions: u32,
    pub(crate) check_after: Duration,
    ready: watch::Receiver<bool>,
}

impl Started {
    /// `r` as a delayed record of this member's schedule log.
    pub(crate) fn delayed(&self, r: Record, due: i64) -> Record {
        wire::delay(r, due, &self.log, self.partitions)
    }
}

/// What this member knows about undecided halves, shared between the engine and
/// [`Scheduler::decide`] so a decision for a half it owns but does not hold fails
/// with [`Error::TxnNotFound`] instead of being written and ignored.
#[derive(Default)]
pub(crate) struct Book {
    /// Undecided halves in this member's index (or just prepared through it).
    pub(crate) halves: HashSet<String>,
    /// Schedule-log partitions this member owns and has read to its own marker:
    /// for those, `halves` is complete.
    pub(crate) caught_up: HashSet<u32>,
}

/// One client's scheduler member, started on first use.
pub(crate) struct Scheduler {
    driver: Arc<dyn Driver>,
    opts: Mutex<ScheduleOptions>,
    pub(crate) checker: RwLock<Option<Arc<dyn TxnChecker>>>,
    started: OnceCell<Started>,
    stop: CancellationToken,
    tracker: TaskTracker,
    commit_interval: Duration,
    session_timeout: Duration,
    /// Entries in this member's index (delayed messages and halves).
    pub(crate) pending: std::sync::atomic::AtomicUsize,
    pub(crate) book: Mutex<Book>,
}

impl Scheduler {
    pub(crate) fn new(
        driver: Arc<dyn Driver>,
        stop: CancellationToken,
        tracker: TaskTracker,
        session_timeout: Duration,
    ) -> Self {
        Self {
            driver,
            opts: Mutex::new(ScheduleOptions::default()),
            checker: RwLock::new(None),
            started: OnceCell::new(),
            stop,
            tracker,
            // Short, because moves acknowledged but not yet committed are repeated
            // (same id) after a crash.
            commit_interval: Duration::from_millis(50),
            session_timeout,
            pending: std::sync::atomic::AtomicUsize::new(0),
            book: Mutex::new(Book::default()),
        }
    }

    pub(crate) fn set_options(&self, opts: ScheduleOptions) -> Result<()> {
        if self.started.initialized() {
            return Err(Error::InvalidArgument(
                "schedule options must be set before the scheduler starts".into(),
            ));
        }
        crate::validate_topic(&opts.log_topic())?;
        if opts.partitions == 0 {
            return Err(Error::InvalidArgument(
                "schedule partitions must be at least 1".into(),
            ));
        }
        *self.opts.lock() = opts;
        Ok(())
    }

    pub(crate) fn options(&self) -> ScheduleOptions {
        self.opts.lock().clone()
    }

    pub(crate) fn is_started(&self) -> bool {
        self.started.initialized()
    }

    /// Starts this client's member (once): creates the schedule log if needed and
    /// joins the scheduler group.
    pub(crate) async fn ensure_started(self: &Arc<Self>) -> Result<&Started> {
        self.started.get_or_try_init(|| self.start()).await
    }

    async fn start(self: &Arc<Self>) -> Result<Started> {
        if self.stop.is_cancelled() {
            return Err(Error::ClientClosed);
        }
        let opts = self.options();
        let log = opts.log_topic();
        let mut spec = TopicSpec::new(&log, opts.partitions);
        // Pending entries may wait longer than any default retention.
        spec.retention_ms = Some(-1);
        match self.driver.create_topic(spec).await {
            Ok(()) | Err(Error::TopicExists(_)) => {}
            Err(e) => return Err(e),
        }
        let partitions = self
            .driver
            .partitions(&log)
            .await?
            .ok_or_else(|| Error::TopicNotFound(log.clone()))?;
        let mut sub_spec = SubscribeSpec::new(
            format!("__courier.scheduler.{}", opts.scope),
            vec![log.clone()],
        );
        sub_spec.auto_offset_reset = courier_core::OffsetReset::Earliest;
        sub_spec.commit_interval = self.commit_interval;
        sub_spec.session_timeout = self.session_timeout;
        sub_spec.prefetch = opts.max_pending.max(1);
        // The catch-up relies on reading each partition in log order after a crash.
        sub_spec.replay_after_takeover = true;
        let sub = self.driver.subscribe(sub_spec).await?;
        let (ready_tx, ready) = watch::channel(false);
        let engine = engine::Engine::new(
            self.clone(),
            log.clone(),
            partitions,
            opts.clone(),
            ready_tx,
        )
        .await;
        self.tracker.spawn(engine.run(sub, self.stop.clone()));
        tracing::info!(log = %log, partitions, "scheduler member started");
        Ok(Started {
            log,
            partitions,
            check_after: opts.check_after,
            ready,
        })
    }

    /// The started member, if it runs.
    pub(crate) fn started(&self) -> Option<&Started> {
        self.started.get()
    }

    /// Waits until this member owns every partition of the schedule log (one-member
    /// deployments and tests).
    pub(crate) async fn ready(self: &Arc<Self>, timeout: Duration) -> Result<()> {
        let mut rx = self.ensure_started().await?.ready.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .map_err(|_| Error::Timeout(timeout))?
            .map_err(|_| Error::ClientClosed)?;
        Ok(())
    }

    /// `r` as a delayed record of the schedule log.
    pub(crate) async fn delayed(self: &Arc<Self>, r: Record, due: i64) -> Result<Record> {
        let s = self.ensure_started().await?;
        Ok(s.delayed(r, due))
    }

    /// `r` as a half of the schedule log.
    pub(crate) async fn half(self: &Arc<Self>, r: Record) -> Result<Record> {
        let s = self.ensure_started().await?;
        let check_at = now_millis().saturating_add(s.check_after.as_millis() as i64);
        Ok(wire::half(r, check_at, &s.log, s.partitions))
    }

    /// Notes a half just prepared through this member, when it owns the half's
    /// partition (so an immediate decision finds it before the engine reads it).
    pub(crate) fn prepared(&self, id: &str) {
        let Some(s) = self.started.get() else { return };
        let p = wire::partition_for(id, s.partitions);
        let mut book = self.book.lock();
        if book.caught_up.contains(&p) {
            book.halves.insert(id.to_string());
        }
    }

    /// Durably records the decision for half `id`. [`Error::TxnNotFound`] when this
    /// member owns the half's partition, has caught up with it, and holds no such
    /// undecided half; a half owned by another member (or while catching up after a
    /// start) cannot be checked here, so its decision is written and applied (or
    /// ignored) by the owner.
    pub(crate) async fn decide(self: &Arc<Self>, id: &str, commit: bool) -> Result<()> {
        if id.is_empty() {
            return Err(Error::InvalidArgument(
                "transaction id must not be empty".into(),
            ));
        }
        let s = self.ensure_started().await?;
        let p = wire::partition_for(id, s.partitions);
        let held = {
            let mut book = self.book.lock();
            if book.caught_up.contains(&p) {
                if !book.halves.remove(id) {
                    return Err(Error::TxnNotFound(id.to_string()));
                }
                true
            } else {
                false
            }
        };
        let res = self
            .driver
            .publish(vec![wire::op(id, commit, &s.log, s.partitions)])
            .await;
        if res.is_err() && held {
            // Not decided after all: a retry must find it.
            self.book.lock().halves.insert(id.to_string());
        }
        res.map(|_| ())
    }
}
