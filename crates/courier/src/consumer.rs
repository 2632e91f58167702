//! The consumer runtime (SPEC C3): one group membership, one in-order worker per
//! partition, concurrency across partitions, settle on handler result.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use courier_core::{
    BoxError, Delivery, Driver, Error, OffsetReset, Result, SubscribeSpec, Subscription,
    TopicPartition,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::validate::{validate_group, validate_topic};

/// Deliveries pulled from the driver per call.
const FETCH_MAX: usize = 512;
/// Batches queued per partition worker before the fetch loop waits.
const WORKER_QUEUE: usize = 4;

/// What happens when a handler returns an error (SPEC R2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Do not commit; the message comes back after `after` and blocks its partition
    /// until handled.
    Redeliver {
        /// Delay before the message is delivered again.
        after: Duration,
    },
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy::Redeliver {
            after: Duration::from_secs(1),
        }
    }
}

type Handler = Arc<dyn Fn(Delivery) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// Builds a consumer for one group. Made by [`Client::consumer`](crate::Client::consumer).
pub struct ConsumerBuilder {
    driver: Arc<dyn Driver>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    spec: SubscribeSpec,
    policy: FailurePolicy,
}

impl ConsumerBuilder {
    pub(crate) fn new(
        driver: Arc<dyn Driver>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        spec: SubscribeSpec,
    ) -> Self {
        Self {
            driver,
            shutdown,
            tracker,
            spec,
            policy: FailurePolicy::default(),
        }
    }

    /// Where the group starts when it has no committed position.
    pub fn auto_offset_reset(mut self, reset: OffsetReset) -> Self {
        self.spec.auto_offset_reset = reset;
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

    /// How often handled positions are committed in the background.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.spec.commit_interval = interval;
        self
    }

    /// Member liveness timeout (backends with heartbeats).
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.spec.session_timeout = timeout;
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
        let handler: Handler = Arc::new(move |d| {
            let fut = handler(d);
            async move { fut.await.map_err(Into::into) }.boxed()
        });
        let subscription = self.driver.subscribe(self.spec.clone()).await?;
        let stop = self.shutdown.child_token();
        let (assigned_tx, assigned_rx) = watch::channel(Vec::new());
        let run = Runtime {
            subscription,
            handler,
            policy: self.policy,
            stop: stop.clone(),
            assigned: assigned_tx,
        };
        let task = self.tracker.spawn(run.run());
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

struct Runtime {
    subscription: Box<dyn Subscription>,
    handler: Handler,
    policy: FailurePolicy,
    stop: CancellationToken,
    assigned: watch::Sender<Vec<TopicPartition>>,
}

impl Runtime {
    async fn run(mut self) -> Result<()> {
        let mut workers: HashMap<(Arc<str>, u32), mpsc::Sender<Work>> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut failures = 0u32;
        loop {
            let batch = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                b = self.subscription.next_batch(FETCH_MAX) => b,
            };
            let batch = match batch {
                Ok(Some(b)) => {
                    failures = 0;
                    b
                }
                Ok(None) => break,
                Err(e) => {
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
                        self.dispatcher()
                            .route(&mut workers, &mut tasks, std::mem::take(&mut run))
                            .await;
                    }
                }
                run.push(d);
            }
            if !run.is_empty() {
                self.dispatcher().route(&mut workers, &mut tasks, run).await;
            }
        }
        // Queued-but-unstarted deliveries are dropped (their handles nack, so they are
        // not committed); each worker finishes the handler it is running.
        drop(workers);
        while tasks.join_next().await.is_some() {}
        let result = self.subscription.close().await;
        self.assigned.send_replace(Vec::new());
        result
    }

    fn dispatcher(&self) -> Dispatcher {
        Dispatcher {
            handler: self.handler.clone(),
            policy: self.policy.clone(),
            stop: self.stop.clone(),
        }
    }
}

/// Routes a run of one partition's deliveries to that partition's worker.
struct Dispatcher {
    handler: Handler,
    policy: FailurePolicy,
    stop: CancellationToken,
}

impl Dispatcher {
    async fn route(
        &self,
        workers: &mut HashMap<(Arc<str>, u32), mpsc::Sender<Work>>,
        tasks: &mut JoinSet<()>,
        run: Work,
    ) {
        let key = (run[0].topic.clone(), run[0].partition);
        let tx = workers.entry(key).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(WORKER_QUEUE);
            tasks.spawn(worker(
                rx,
                self.handler.clone(),
                self.policy.clone(),
                self.stop.clone(),
            ));
            tx
        });
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => {}
            _ = tx.send(run) => {}
        }
    }
}

async fn worker(
    mut rx: mpsc::Receiver<Work>,
    handler: Handler,
    policy: FailurePolicy,
    stop: CancellationToken,
) {
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
            let (topic, partition, offset) = (d.topic.clone(), d.partition, d.offset);
            let outcome = AssertUnwindSafe(handler(d)).catch_unwind().await;
            match outcome {
                Ok(Ok(())) => ack.ack(),
                Ok(Err(e)) => {
                    tracing::warn!(%topic, partition, offset, error = %e, "handler failed");
                    match &policy {
                        FailurePolicy::Redeliver { after } => ack.nack(*after),
                    }
                }
                Err(_) => {
                    tracing::error!(%topic, partition, offset, "handler panicked");
                    match &policy {
                        FailurePolicy::Redeliver { after } => ack.nack(*after),
                    }
                }
            }
        }
    }
}
