//! Per-attempt consume metrics (SPEC O1): successes, failures, end-to-end latency.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use courier_core::{BoxError, Delivery};
use tower::{Layer, Service};

use crate::stats::{GroupCounters, Shard};

/// Adds [`MetricsService`].
#[derive(Clone)]
pub struct MetricsLayer {
    counters: GroupCounters,
}

impl MetricsLayer {
    pub(crate) fn new(counters: GroupCounters) -> Self {
        Self { counters }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            counters: self.counters.clone(),
            shard: None,
        }
    }
}

/// Counts each handler attempt as consumed (`Ok`) or a consume error (`Err`), and
/// records end-to-end latency (message timestamp → first attempt) of a sample of
/// the messages. Each clone (one per partition worker) counts into its own shard.
pub struct MetricsService<S> {
    inner: S,
    counters: GroupCounters,
    shard: Option<Arc<Shard>>,
}

impl<S: Clone> Clone for MetricsService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            counters: self.counters.clone(),
            // A new worker gets a shard of its own on its first message.
            shard: None,
        }
    }
}

impl<S> MetricsService<S> {
    fn shard(&mut self, topic: &Arc<str>) -> Arc<Shard> {
        match &self.shard {
            Some(s) if Arc::ptr_eq(s.topic(), topic) || **s.topic() == **topic => s.clone(),
            _ => {
                let s = self.counters.shard(topic);
                self.shard = Some(s.clone());
                s
            }
        }
    }
}

impl<S> Service<Delivery> for MetricsService<S>
where
    S: Service<Delivery, Response = (), Error = BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, d: Delivery) -> Self::Future {
        let shard = self.shard(&d.topic);
        note_arrival(&shard, &d);
        MetricsFuture {
            inner: self.inner.call(d),
            shard,
        }
    }
}

/// Records the end-to-end latency of a first attempt, for a sample of the messages.
pub(crate) fn note_arrival(shard: &Shard, d: &Delivery) {
    if d.attempt <= 1 && d.timestamp > 0 && shard.sample_e2e() {
        let age = courier_core::now_millis().saturating_sub(d.timestamp);
        shard.e2e_latency(Duration::from_millis(age.max(0) as u64));
    }
}

pin_project_lite::pin_project! {
    /// Future of [`MetricsService`].
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        shard: Arc<Shard>,
    }
}

impl<F: Future<Output = Result<(), BoxError>>> Future for MetricsFuture<F> {
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        match &out {
            Ok(()) => this.shard.consumed(),
            Err(_) => this.shard.consume_error(),
        }
        Poll::Ready(out)
    }
}
