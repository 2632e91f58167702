//! Per-attempt consume metrics (SPEC O1): successes, failures, end-to-end latency.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use courier_core::{BoxError, Delivery};
use tower::{Layer, Service};

use crate::stats::{Counters, GroupCounters};

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
        }
    }
}

/// Counts each handler attempt as consumed (`Ok`) or a consume error (`Err`), and
/// records end-to-end latency (message timestamp → first attempt).
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    counters: GroupCounters,
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
        let counters = self.counters.get(&d.topic);
        if d.attempt <= 1 && d.timestamp > 0 {
            let age = courier_core::now_millis().saturating_sub(d.timestamp);
            counters.e2e_latency(Duration::from_millis(age.max(0) as u64));
        }
        MetricsFuture {
            inner: self.inner.call(d),
            counters,
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`MetricsService`].
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        counters: Arc<Counters>,
    }
}

impl<F: Future<Output = Result<(), BoxError>>> Future for MetricsFuture<F> {
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        match &out {
            Ok(()) => this.counters.consumed(),
            Err(_) => this.counters.consume_error(),
        }
        Poll::Ready(out)
    }
}
