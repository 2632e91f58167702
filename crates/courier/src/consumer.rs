//! The consumer runtime (SPEC C3): one group membership, one in-order worker per
//! partition, concurrency across partitions, settle on handler result.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_core::{
    BoxError, Config, ConsumerConfig, Delivery, Driver, Error, OffsetReset, Result, SubscribeSpec,
    Subscription, TopicPartition,
};
use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Layer, Service, ServiceExt};

use crate::pipeline::{
    Backoff, BoxedHandler, DeadLetterLayer, DedupLayer, DedupStore, DefaultStack, Handler,
    HandlerFn, RetryLayer, StackParts,
};
use crate::stats::{GroupCounters, Registry};
use crate::validate::{validate_group, validate_topic};

/// Deliveries pulled from the driver per call.
const FETCH_MAX: usize = 512;
/// Batches queued per partition worker before the fetch loop waits.
const WORKER_QUEUE: usize = 4;

/// What happens when a handler returns an error (SPEC R2).
#[derive(Clone, Debug)]
pub enum FailurePolicy {
    /// The default: retry in place with backoff, then publish to the dead-letter
    /// topic and commit. Nothing is dropped: if the dead-letter publish fails, the
    /// message is not committed and comes back.
    RetryThenDeadLetter(Backoff),
    /// Do not commit; the message comes back after `after` and blocks its partition
    /// until handled.
    Redeliver {
        /// Delay before the message is delivered again.
        after: Duration,
    },
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy::RetryThenDeadLetter(Backoff::default())
    }
}

impl FailurePolicy {
    /// How long an uncommitted message waits before it is delivered again.
    fn redeliver_after(&self) -> Duration {
        match self {
            FailurePolicy::Redeliver { after } => *after,
            FailurePolicy::RetryThenDeadLetter(b) => b.initial().max(Duration::from_millis(100)),
        }
    }
}

type UserLayer = Arc<dyn Fn(BoxedHandler) -> BoxedHandler + Send + Sync>;

/// What readiness probes read about one running consumer (SPEC R9).
#[derive(Debug)]
pub(crate) struct ConsumerStatus {
    pub(crate) group: String,
    assigned: AtomicUsize,
    connected: AtomicBool,
    running: AtomicBool,
}

impl ConsumerStatus {
    /// `Err` while the member owns no partition, is disconnected or has stopped.
    pub(crate) fn check(&self) -> Result<()> {
        if !self.running.load(Ordering::Acquire) {
            return Err(Error::NotReady(format!(
                "consumer of {} stopped",
                self.group
            )));
        }
        if !self.connected.load(Ordering::Acquire) {
            return Err(Error::NotReady(format!(
                "consumer of {} is disconnected",
                self.group
            )));
        }
        if self.assigned.load(Ordering::Acquire) == 0 {
            return Err(Error::NotReady(format!(
                "consumer of {} has no partitions",
                self.group
            )));
        }
        Ok(())
    }

    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }
}

/// The client's list of its consumers' statuses.
pub(crate) type Statuses = Arc<parking_lot::Mutex<Vec<Arc<ConsumerStatus>>>>;

/// Builds a consumer for one group. Made by [`Client::consumer`](crate::Client::consumer).
pub struct ConsumerBuilder {
    driver: Arc<dyn Driver>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    spec: SubscribeSpec,
    policy: FailurePolicy,
    registry: Arc<Registry>,
    dead_letter: Option<String>,
    dedup: Option<(Arc<dyn DedupStore>, Duration)>,
    layers: Vec<UserLayer>,
    bare: bool,
    statuses: Statuses,
    live: watch::Receiver<Arc<Config>>,
    follows: Follows,
}

/// Which subscription settings a consumer takes from the client's live config (the
/// ones its builder did not set).
#[derive(Clone, Copy, Debug)]
struct Follows {
    offset_reset: bool,
    commit_interval: bool,
    session_timeout: bool,
}

impl Follows {
    fn any(&self) -> bool {
        self.offset_reset || self.commit_interval || self.session_timeout
    }

    /// `spec` with the followed settings taken from `c`.
    fn apply(&self, spec: &SubscribeSpec, c: &ConsumerConfig) -> SubscribeSpec {
        let mut s = spec.clone();
        if self.offset_reset {
            s.auto_offset_reset = c.auto_offset_reset;
        }
        if self.commit_interval {
            s.commit_interval = Duration::from_millis(c.auto_commit_interval_ms.max(1));
        }
        if self.session_timeout {
            s.session_timeout = Duration::from_millis(c.session_timeout_ms);
        }
        s
    }
}

/// True when the subscription settings differ (a rejoin is needed).
fn spec_changed(a: &SubscribeSpec, b: &SubscribeSpec) -> bool {
    a.auto_offset_reset != b.auto_offset_reset
        || a.commit_interval != b.commit_interval
        || a.session_timeout != b.session_timeout
}

impl ConsumerBuilder {
    pub(crate) fn new(
        driver: Arc<dyn Driver>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        spec: SubscribeSpec,
        registry: Arc<Registry>,
        statuses: Statuses,
        live: watch::Receiver<Arc<Config>>,
    ) -> Self {
        Self {
            live,
            follows: Follows {
                offset_reset: true,
                commit_interval: true,
                session_timeout: true,
            },
            statuses,
            driver,
            shutdown,
            tracker,
            spec,
            policy: FailurePolicy::default(),
            registry,
            dead_letter: None,
            dedup: None,
            layers: Vec::new(),
            bare: false,
        }
    }

    /// Where the group starts when it has no committed position.
    pub fn auto_offset_reset(mut self, reset: OffsetReset) -> Self {
        self.spec.auto_offset_reset = reset;
        self.follows.offset_reset = false;
        self
    }

    /// Shorthand for `auto_offset_reset(OffsetReset::Earliest)`.
    pub fn from_earliest(self) -> Self {
        self.auto_offset_reset(OffsetReset::Earliest)
    }

    /// What to do when the handler fails.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Retry failed handlers in place with `backoff`, then dead-letter
    /// (`FailurePolicy::RetryThenDeadLetter`).
    pub fn retry(self, backoff: Backoff) -> Self {
        self.failure_policy(FailurePolicy::RetryThenDeadLetter(backoff))
    }

    /// The dead-letter topic for exhausted messages (default `{topic}.dlq`, per
    /// source topic). Created with one partition if missing.
    pub fn dead_letter(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter = Some(topic.into());
        self
    }

    /// Handles each message id at most once per `window` in this group (SPEC R4),
    /// remembering ids in `store` ([`MemoryDedupStore`](crate::MemoryDedupStore) for
    /// one process). A failed handling forgets the id again.
    pub fn dedup(mut self, store: Arc<dyn DedupStore>, window: Duration) -> Self {
        self.dedup = Some((store, window));
        self
    }

    /// Wraps the handler in a `tower` layer (timeout, concurrency limit, rate limit,
    /// your own). Layers sit inside the retry step, so a timeout applies per attempt
    /// and a timed-out attempt is retried. The first layer added is the outermost.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<BoxedHandler> + Send + Sync + 'static,
        L::Service: Service<Delivery, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as Service<Delivery>>::Error: Into<BoxError>,
        <L::Service as Service<Delivery>>::Future: Send + 'static,
    {
        self.layers.push(Arc::new(move |inner: BoxedHandler| {
            BoxedHandler::new(layer.layer(inner).map_err(Into::into))
        }));
        self
    }

    /// Runs the handler with no middleware at all — no retry, dead letters, tracing,
    /// metrics, dedup or decompression; a failure is redelivered (`Redeliver`
    /// policy). For measuring the pipeline and for handlers that do all of it
    /// themselves.
    pub fn bare(mut self) -> Self {
        self.bare = true;
        self
    }

    /// How often handled positions are committed in the background.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.spec.commit_interval = interval;
        self.follows.commit_interval = false;
        self
    }

    /// Member liveness timeout (backends with heartbeats).
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.spec.session_timeout = timeout;
        self.follows.session_timeout = false;
        self
    }

    /// Joins the group and runs `handler` on every message until the client shuts
    /// down. `Ok` from the handler commits the message; `Err` (or a panic) applies
    /// the failure policy. Returns after in-flight handlers finished and the last
    /// positions were committed.
    pub async fn subscribe<T, S, H, Fut, E>(self, topics: T, handler: H) -> Result<()>
    where
        T: IntoIterator<Item = S>,
        S: Into<String>,
        H: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.start(topics, handler).await?.join().await
    }

    /// Like [`subscribe`](Self::subscribe) but runs in the background: returns once
    /// the member has joined, with a handle to watch and stop it.
    pub async fn start<T, S, H, Fut, E>(mut self, topics: T, handler: H) -> Result<ConsumerHandle>
    where
        T: IntoIterator<Item = S>,
        S: Into<String>,
        H: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        if self.shutdown.is_cancelled() {
            return Err(Error::ClientClosed);
        }
        validate_group(&self.spec.group)?;
        self.spec.topics = topics.into_iter().map(Into::into).collect();
        if self.spec.topics.is_empty() {
            return Err(Error::NoTopics);
        }
        for t in &self.spec.topics {
            validate_topic(t)?;
        }
        if let Some(dlq) = &self.dead_letter {
            validate_topic(dlq)?;
        }
        let handler = HandlerFn::new(handler);
        // Settings changed between `consumer()` and now count too.
        let mut live = self.live.clone();
        self.spec = self
            .follows
            .apply(&self.spec, &live.borrow_and_update().consumer);
        let rejoin = self.follows.any().then(|| Rejoin {
            live,
            follows: self.follows,
            driver: self.driver.clone(),
            spec: self.spec.clone(),
        });
        let subscription = self.driver.subscribe(self.spec.clone()).await?;
        let stop = self.shutdown.child_token();
        let (assigned_tx, assigned_rx) = watch::channel(Vec::new());
        let status = Arc::new(ConsumerStatus {
            group: self.spec.group.clone(),
            assigned: AtomicUsize::new(0),
            connected: AtomicBool::new(true),
            running: AtomicBool::new(true),
        });
        {
            let mut all = self.statuses.lock();
            all.retain(|s| s.is_running());
            all.push(status.clone());
        }
        let task = if self.bare {
            let run = Runtime {
                subscription,
                service: handler,
                redeliver_after: FailurePolicy::Redeliver {
                    after: Duration::from_secs(1),
                }
                .redeliver_after(),
                stop: stop.clone(),
                assigned: assigned_tx,
                status: status.clone(),
                rejoin,
            };
            self.tracker.spawn(run.run())
        } else {
            let group: Arc<str> = Arc::from(self.spec.group.as_str());
            let counters = GroupCounters::new(self.registry.clone(), group.clone());
            let inner = if self.layers.is_empty() {
                Handler::Direct(handler)
            } else {
                let mut svc = BoxedHandler::new(handler);
                for l in self.layers.iter().rev() {
                    svc = l(svc);
                }
                Handler::Layered(svc)
            };
            let (backoff, dead_letters) = match &self.policy {
                FailurePolicy::RetryThenDeadLetter(b) => (b.clone(), true),
                FailurePolicy::Redeliver { .. } => (Backoff::none(), false),
            };
            let service = DefaultStack::new(
                inner,
                StackParts {
                    retry: RetryLayer::new(backoff, stop.clone(), counters.clone(), dead_letters),
                    dead_letter: DeadLetterLayer::new(
                        dead_letters,
                        self.driver.clone(),
                        self.dead_letter.clone(),
                        counters.clone(),
                    ),
                    dedup: self
                        .dedup
                        .map(|(store, window)| DedupLayer::new(store, window, group.clone())),
                    counters,
                    group,
                },
            );
            let run = Runtime {
                subscription,
                service,
                redeliver_after: self.policy.redeliver_after(),
                stop: stop.clone(),
                assigned: assigned_tx,
                status: status.clone(),
                rejoin,
            };
            self.tracker.spawn(run.run())
        };
        Ok(ConsumerHandle {
            stop,
            task,
            assigned: assigned_rx,
            group: self.spec.group,
        })
    }
}

/// A running consumer.
pub struct ConsumerHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
    assigned: watch::Receiver<Vec<TopicPartition>>,
    group: String,
}

impl ConsumerHandle {
    /// The group this consumer belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Partitions this member owns now.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.assigned.borrow().clone()
    }

    /// Waits until the member owns at least `min` partitions, up to `timeout`.
    pub async fn wait_assigned(&self, min: usize, timeout: Duration) -> Result<()> {
        let mut rx = self.assigned.clone();
        tokio::time::timeout(timeout, rx.wait_for(|a| a.len() >= min))
            .await
            .map_err(|_| Error::Timeout(timeout))?
            .map_err(|_| Error::ConsumerClosed)?;
        Ok(())
    }

    /// Stops fetching, lets in-flight handlers finish, commits and leaves the group.
    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.join().await
    }

    /// Waits for the consumer to end (after client shutdown or [`stop`](Self::stop)).
    pub async fn join(self) -> Result<()> {
        self.task
            .await
            .map_err(|e| Error::backend("consumer", format!("consumer task failed: {e}")))?
    }
}

type Work = Vec<Delivery>;

struct Runtime<S> {
    subscription: Box<dyn Subscription>,
    service: S,
    redeliver_after: Duration,
    stop: CancellationToken,
    assigned: watch::Sender<Vec<TopicPartition>>,
    status: Arc<ConsumerStatus>,
    rejoin: Option<Rejoin>,
}

/// What a consumer following the live config needs to join again (SPEC C7).
struct Rejoin {
    live: watch::Receiver<Arc<Config>>,
    follows: Follows,
    driver: Arc<dyn Driver>,
    spec: SubscribeSpec,
}

impl Rejoin {
    /// Resolves with the new spec once a config change alters this consumer's
    /// subscription settings; never when the client's config can no longer change.
    async fn changed(&mut self) -> SubscribeSpec {
        loop {
            if self.live.changed().await.is_err() {
                return std::future::pending().await;
            }
            let next = self
                .follows
                .apply(&self.spec, &self.live.borrow_and_update().consumer);
            if spec_changed(&next, &self.spec) {
                return next;
            }
        }
    }
}

/// Waits for a rejoin-worthy config change, or forever without one.
async fn config_change(rejoin: &mut Option<Rejoin>) -> SubscribeSpec {
    match rejoin {
        Some(r) => r.changed().await,
        None => std::future::pending().await,
    }
}

impl<S> Runtime<S>
where
    S: Service<Delivery, Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    async fn run(mut self) -> Result<()> {
        let mut workers: HashMap<(Arc<str>, u32), mpsc::Sender<Work>> = HashMap::new();
        let mut tasks = JoinSet::new();
        // Runs not handed to a worker because the consumer stopped. They are released
        // only after the workers end: settling them while an earlier message of their
        // partition is still in its handler could void that message's commit.
        let mut unsent: Vec<Work> = Vec::new();
        let mut failures = 0u32;
        loop {
            let batch = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                spec = config_change(&mut self.rejoin) => {
                    if !self.rejoin_with(spec, &mut workers, &mut tasks).await {
                        break;
                    }
                    continue;
                }
                b = self.subscription.next_batch(FETCH_MAX) => b,
            };
            let batch = match batch {
                Ok(Some(b)) => {
                    failures = 0;
                    b
                }
                Ok(None) => break,
                Err(e) => {
                    self.status
                        .connected
                        .store(self.subscription.is_connected(), Ordering::Release);
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_millis(100 * u64::from(failures.min(50)));
                    tracing::warn!(error = %e, ?wait, "fetch failed; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            let now = self.subscription.assignment();
            self.status.assigned.store(now.len(), Ordering::Release);
            self.status
                .connected
                .store(self.subscription.is_connected(), Ordering::Release);
            self.assigned.send_if_modified(|cur| {
                if *cur == now {
                    false
                } else {
                    *cur = now;
                    true
                }
            });
            let mut run: Work = Vec::new();
            for d in batch {
                if let Some(first) = run.first() {
                    if first.partition != d.partition || first.topic != d.topic {
                        unsent.extend(
                            self.dispatcher()
                                .route(&mut workers, &mut tasks, std::mem::take(&mut run))
                                .await,
                        );
                    }
                }
                run.push(d);
            }
            if !run.is_empty() {
                unsent.extend(self.dispatcher().route(&mut workers, &mut tasks, run).await);
            }
        }
        // Queued-but-unstarted deliveries are dropped (their handles nack, so they are
        // not committed); each worker finishes the handler it is running.
        drop(workers);
        while tasks.join_next().await.is_some() {}
        drop(unsent);
        let result = self.subscription.close().await;
        self.assigned.send_replace(Vec::new());
        self.status.running.store(false, Ordering::Release);
        result
    }

    /// Finishes every message already fetched (the workers drain their queues and
    /// settle), commits and leaves, then joins again with `spec`. False when the
    /// consumer stopped meanwhile (the caller then shuts down as usual).
    async fn rejoin_with(
        &mut self,
        spec: SubscribeSpec,
        workers: &mut HashMap<(Arc<str>, u32), mpsc::Sender<Work>>,
        tasks: &mut JoinSet<()>,
    ) -> bool {
        let Some(rejoin) = &mut self.rejoin else {
            return true;
        };
        tracing::info!(
            group = %spec.group,
            commit_interval = ?spec.commit_interval,
            session_timeout = ?spec.session_timeout,
            auto_offset_reset = ?spec.auto_offset_reset,
            "consumer settings changed; committing and rejoining"
        );
        // Closing the queues lets each worker finish what it holds, then end.
        workers.clear();
        while tasks.join_next().await.is_some() {}
        if let Err(e) = self.subscription.close().await {
            // What was not committed is delivered again: at-least-once holds.
            tracing::warn!(error = %e, "commit before rejoin failed");
        }
        let mut failures = 0u32;
        loop {
            match rejoin.driver.subscribe(spec.clone()).await {
                Ok(s) => {
                    self.subscription = s;
                    rejoin.spec = spec;
                    return true;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_millis(100 * u64::from(failures.min(50)));
                    tracing::warn!(error = %e, ?wait, "rejoin failed; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    fn dispatcher(&self) -> Dispatcher<'_, S> {
        Dispatcher {
            service: &self.service,
            redeliver_after: self.redeliver_after,
            stop: &self.stop,
        }
    }
}

/// Routes a run of one partition's deliveries to that partition's worker.
struct Dispatcher<'a, S> {
    service: &'a S,
    redeliver_after: Duration,
    stop: &'a CancellationToken,
}

impl<S> Dispatcher<'_, S>
where
    S: Service<Delivery, Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    /// Hands `run` to its partition's worker; gives it back when the consumer stops
    /// first.
    async fn route(
        &self,
        workers: &mut HashMap<(Arc<str>, u32), mpsc::Sender<Work>>,
        tasks: &mut JoinSet<()>,
        run: Work,
    ) -> Option<Work> {
        let key = (run[0].topic.clone(), run[0].partition);
        let tx = workers.entry(key).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(WORKER_QUEUE);
            tasks.spawn(worker(
                rx,
                self.service.clone(),
                self.redeliver_after,
                self.stop.clone(),
            ));
            tx
        });
        let permit = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Some(run),
            p = tx.reserve() => p,
        };
        match permit {
            Ok(p) => {
                p.send(run);
                None
            }
            Err(_) => Some(run),
        }
    }
}

async fn worker<S>(
    mut rx: mpsc::Receiver<Work>,
    mut service: S,
    redeliver_after: Duration,
    stop: CancellationToken,
) where
    S: Service<Delivery, Response = (), Error = BoxError> + Send + 'static,
    S::Future: Send,
{
    while let Some(work) = rx.recv().await {
        for mut d in work {
            if stop.is_cancelled() {
                return;
            }
            let Some(ack) = d.take_ack() else {
                continue;
            };
            if ack.is_stale() {
                ack.discard();
                continue;
            }
            // The topic for the logs comes from the handle, not a clone of the
            // delivery's name: that reference count is shared by every worker.
            let (partition, offset) = (d.partition, d.offset);
            let outcome = match service.ready().await {
                Ok(svc) => AssertUnwindSafe(svc.call(d)).catch_unwind().await,
                Err(e) => Ok(Err(e)),
            };
            match outcome {
                Ok(Ok(())) => ack.ack(),
                Ok(Err(e)) => {
                    let topic = ack.topic().unwrap_or_default();
                    tracing::warn!(topic, partition, offset, error = %e, "handler failed; not committed");
                    ack.nack(redeliver_after);
                }
                Err(_) => {
                    let topic = ack.topic().unwrap_or_default();
                    tracing::error!(topic, partition, offset, "handler panicked");
                    ack.nack(redeliver_after);
                }
            }
        }
    }
}
