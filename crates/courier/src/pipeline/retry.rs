//! In-place retry with exponential backoff and jitter (SPEC R2).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use courier_core::{BoxError, Delivery};
use std::future::Future;
use std::pin::Pin;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};

use crate::stats::GroupCounters;

type Predicate = Arc<dyn Fn(&BoxError) -> bool + Send + Sync>;

/// How often and how patiently a failed handler is retried before the message is
/// dead-lettered: delay `n` (0-based) is `initial × multiplier^n`, capped at `max`,
/// randomised by ±`jitter` so that many consumers do not retry in lockstep.
#[derive(Clone)]
pub struct Backoff {
    max_retries: u32,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    retryable: Option<Predicate>,
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("max_retries", &self.max_retries)
            .field("initial", &self.initial)
            .field("max", &self.max)
            .field("multiplier", &self.multiplier)
            .field("jitter", &self.jitter)
            .field("retryable", &self.retryable.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl Default for Backoff {
    /// 3 retries after 1 s, 2 s, 4 s (±20%), capped at 30 s; every error retryable.
    fn default() -> Self {
        Self::exponential(3, Duration::from_secs(1))
    }
}

impl Backoff {
    /// `max_retries` retries, the first after `initial`, each next one twice as long
    /// (capped at 30 s), ±20% jitter.
    pub fn exponential(max_retries: u32, initial: Duration) -> Self {
        Self {
            max_retries,
            initial,
            max: Duration::from_secs(30).max(initial),
            multiplier: 2.0,
            jitter: 0.2,
            retryable: None,
        }
    }

    /// No retries: the first failure is final.
    pub fn none() -> Self {
        Self::exponential(0, Duration::ZERO)
    }

    /// Caps each delay at `max`.
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Growth factor between delays (≥ 1).
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = m.max(1.0);
        self
    }

    /// Random spread of each delay, as a fraction (0 = exact, clamped to 0..=1).
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// Only errors for which `f` is true are retried; others go to the dead-letter
    /// topic at once. [`Permanent`] errors are never retried regardless.
    pub fn retry_if(mut self, f: impl Fn(&BoxError) -> bool + Send + Sync + 'static) -> Self {
        self.retryable = Some(Arc::new(f));
        self
    }

    /// Retries after the first failure.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The first delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The delay before retry `n` (0-based), with jitter applied.
    pub fn delay(&self, n: u32) -> Duration {
        let base = self.initial.as_secs_f64() * self.multiplier.powi(n.min(64) as i32);
        let capped = base.min(self.max.as_secs_f64());
        let spread = if self.jitter > 0.0 {
            1.0 + self.jitter * (fastrand::f64() * 2.0 - 1.0)
        } else {
            1.0
        };
        Duration::from_secs_f64((capped * spread).max(0.0))
    }

    fn is_retryable(&self, e: &BoxError) -> bool {
        if e.is::<Permanent>() {
            return false;
        }
        self.retryable.as_ref().is_none_or(|f| f(e))
    }
}

/// An error that retrying cannot fix (corrupt input, a rejected schema …): the
/// message goes to the dead-letter topic without retries. Handlers may return it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub BoxError);

impl Permanent {
    /// Wraps any error as permanent.
    pub fn new(e: impl Into<BoxError>) -> Self {
        Self(e.into())
    }
}

/// The handler failed and no retry is left; carries the original delivery so the
/// dead-letter step can publish its exact bytes.
#[derive(Debug, thiserror::Error)]
#[error("failed after {retries} retries: {source}")]
pub struct Exhausted {
    /// Retries made after the first attempt.
    pub retries: u32,
    /// The last error.
    pub source: BoxError,
    /// The message as it was delivered.
    pub delivery: Box<Delivery>,
}

/// The consumer stopped while a retry was pending; the message stays uncommitted and
/// is delivered again (never dead-lettered for a shutdown).
#[derive(Debug, thiserror::Error)]
#[error("retry interrupted by shutdown")]
pub struct Interrupted;

/// Adds [`RetryService`].
#[derive(Clone)]
pub struct RetryLayer {
    backoff: Arc<Backoff>,
    stop: CancellationToken,
    counters: GroupCounters,
    /// False when no copy of the message is needed after a failure (no retries and
    /// no dead-lettering: the `Redeliver` policy).
    keep_copy: bool,
}

impl RetryLayer {
    pub(crate) fn new(
        backoff: Backoff,
        stop: CancellationToken,
        counters: GroupCounters,
        dead_letters: bool,
    ) -> Self {
        Self {
            keep_copy: dead_letters || backoff.max_retries > 0,
            backoff: Arc::new(backoff),
            stop,
            counters,
        }
    }
}

impl<S: Clone> Layer<S> for RetryLayer {
    type Service = RetryService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RetryService::new(inner, self.clone())
    }
}

/// What a retry needs after the first attempt failed: a service to call again and
/// the policy. One per partition worker (see [`RetryService`]'s `Clone`).
pub(crate) struct Shared<S> {
    // A clone of the first-attempt service, used only by retries, so the first
    // attempt (the hot path) takes no lock.
    inner: Mutex<S>,
    layer: RetryLayer,
}

/// Calls the inner service again after a failure, up to the backoff's limit; the
/// final error is [`Exhausted`]. The first attempt is a plain, unboxed call with no
/// lock; only a failure starts the (boxed) retry loop.
pub struct RetryService<S> {
    inner: S,
    // Shared with this service's in-flight futures only: cloning the service (once
    // per partition worker) makes a new one, so workers share no state.
    shared: Arc<Shared<S>>,
}

impl<S> Shared<S> {
    /// What retries of `inner` under `layer` need, for one partition worker.
    pub(crate) fn new(inner: S, layer: RetryLayer) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(inner),
            layer,
        })
    }
}

impl RetryLayer {
    /// True when a failed first attempt is retried or dead-lettered, so its caller
    /// must keep a copy of the message.
    pub(crate) fn keeps_copy(&self) -> bool {
        self.keep_copy
    }
}

impl<S: Clone> RetryService<S> {
    fn new(inner: S, layer: RetryLayer) -> Self {
        Self {
            shared: Shared::new(inner.clone(), layer),
            inner,
        }
    }
}

impl<S: Clone> Clone for RetryService<S> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.shared.layer.clone())
    }
}

impl<S> Service<Delivery> for RetryService<S>
where
    S: Service<Delivery, Response = (), Error = BoxError> + Send + 'static,
    S::Future: Send,
{
    type Response = ();
    type Error = BoxError;
    type Future = RetryFuture<S::Future, S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, d: Delivery) -> Self::Future {
        let pending = self
            .shared
            .layer
            .keep_copy
            .then(|| (self.shared.clone(), d.clone_message()));
        RetryFuture::first(self.inner.call(d), pending)
    }
}

type Pending<S> = Option<(Arc<Shared<S>>, Delivery)>;

pin_project_lite::pin_project! {
    /// Future of [`RetryService`].
    pub struct RetryFuture<F, S> {
        #[pin]
        state: RetryState<F, S>,
    }
}

impl<F, S> RetryFuture<F, S> {
    fn first(fut: F, pending: Pending<S>) -> Self {
        Self {
            state: RetryState::First { fut, pending },
        }
    }
}

pin_project_lite::pin_project! {
    #[project = RetryProj]
    enum RetryState<F, S> {
        // The first attempt.
        First {
            #[pin]
            fut: F,
            pending: Pending<S>,
        },
        // Retrying after a failure.
        Again {
            fut: BoxFuture<'static, Result<(), BoxError>>,
        },
    }
}

impl<F, S> Future for RetryFuture<F, S>
where
    F: Future<Output = Result<(), BoxError>>,
    S: Service<Delivery, Response = (), Error = BoxError> + Send + 'static,
    S::Future: Send,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                RetryProj::First { fut, pending } => {
                    let e = match std::task::ready!(fut.poll(cx)) {
                        Ok(()) => return Poll::Ready(Ok(())),
                        Err(e) => e,
                    };
                    let Some((shared, d)) = pending.take() else {
                        // Redeliver policy: nothing to retry or bury here.
                        return Poll::Ready(Err(e));
                    };
                    let again = Box::pin(retry_after_failure(shared, d, e));
                    state.set(RetryState::Again { fut: again });
                }
                RetryProj::Again { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}

/// The retry loop after the first attempt failed with `e`.
pub(crate) async fn retry_after_failure<S>(
    shared: Arc<Shared<S>>,
    mut d: Delivery,
    mut e: BoxError,
) -> Result<(), BoxError>
where
    S: Service<Delivery, Response = (), Error = BoxError> + Send + 'static,
    S::Future: Send,
{
    let backoff = &shared.layer.backoff;
    let stop = &shared.layer.stop;
    let mut retries = 0u32;
    loop {
        if stop.is_cancelled() {
            // A handler failing while its consumer stops (e.g. its output closed) is
            // not the message's fault: redeliver, don't bury it.
            return Err(Box::new(Interrupted) as BoxError);
        }
        if retries >= backoff.max_retries || !backoff.is_retryable(&e) {
            return Err(Box::new(Exhausted {
                retries,
                source: e,
                delivery: Box::new(d),
            }) as BoxError);
        }
        let wait = backoff.delay(retries);
        // Looked up on the failure path only; the happy path stays lookup-free.
        shared.layer.counters.clone().get(&d.topic).retry();
        tracing::warn!(
            topic = %d.topic, partition = d.partition, offset = d.offset,
            retry = retries + 1, ?wait, error = %e, "handler failed; retrying"
        );
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Err(Box::new(Interrupted) as BoxError),
            _ = tokio::time::sleep(wait) => {}
        }
        retries += 1;
        d.attempt = d.attempt.saturating_add(1);
        futures::future::poll_fn(|cx| shared.inner.lock().poll_ready(cx)).await?;
        let fut = shared.inner.lock().call(d.clone_message());
        match fut.await {
            Ok(()) => return Ok(()),
            Err(next) => e = next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let b = Backoff::exponential(5, Duration::from_millis(100))
            .jitter(0.0)
            .max_delay(Duration::from_millis(300));
        let d: Vec<u128> = (0..4).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 300, 300]);
        let j = Backoff::exponential(3, Duration::from_millis(100));
        for _ in 0..100 {
            let ms = j.delay(1).as_millis();
            assert!((160..=240).contains(&ms), "{ms}");
        }
        let p = Backoff::default().retry_if(|e| e.to_string() != "fatal");
        assert!(!p.is_retryable(&BoxError::from("fatal")));
        assert!(p.is_retryable(&BoxError::from("flaky")));
        assert!(!p.is_retryable(&(Box::new(Permanent::new("x")) as BoxError)));
    }
}
