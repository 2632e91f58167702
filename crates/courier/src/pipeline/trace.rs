//! Consume-side trace propagation (SPEC R1): the handler runs in a `courier.consume`
//! span whose `trace_id` is the producer's, as the current [`TraceContext`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use courier_core::{BoxError, Delivery};
use tower::{Layer, Service};
use tracing::instrument::{Instrument, Instrumented};

use crate::trace::{scoped, TraceContext, TraceScope};

/// Adds [`TraceService`].
#[derive(Clone)]
pub struct TraceLayer {
    group: Arc<str>,
}

impl TraceLayer {
    pub(crate) fn new(group: Arc<str>) -> Self {
        Self { group }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceService {
            inner,
            group: self.group.clone(),
        }
    }
}

/// True when a subscriber listens for the handler's span, so even a message without a
/// trace context gets one (a new root). One callsite, so every path filters alike.
pub(crate) fn span_wanted() -> bool {
    tracing::enabled!(tracing::Level::INFO)
}

/// Extracts the message's trace context and runs the rest of the pipeline as its
/// child span. Without a context and without a listening subscriber it adds nothing
/// but a header scan.
#[derive(Clone)]
pub struct TraceService<S> {
    inner: S,
    group: Arc<str>,
}

impl<S> Service<Delivery> for TraceService<S>
where
    S: Service<Delivery, Response = (), Error = BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, d: Delivery) -> Self::Future {
        let ctx = match TraceContext::extract(&d.headers) {
            Some(parent) => Some(parent.child()),
            None if span_wanted() => Some(TraceContext::new_root()),
            None => None,
        };
        let Some(c) = &ctx else {
            // Nothing to carry and nobody listening: no span, no task-local.
            return TraceFuture {
                state: TraceState::Plain {
                    fut: self.inner.call(d),
                },
            };
        };
        let span = tracing::info_span!(
                "courier.consume",
                trace_id = %format_args!("{:032x}", c.trace_id),
                span_id = %format_args!("{:016x}", c.span_id),
                parent_span_id = %format_args!("{:016x}", c.parent_span_id.unwrap_or(0)),
                topic = %d.topic,
                partition = d.partition,
                offset = d.offset,
                group = %self.group,
                message_id = %d.id,
        );
        TraceFuture {
            state: TraceState::Scoped {
                fut: scoped(ctx, self.inner.call(d).instrument(span)),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`TraceService`].
    pub struct TraceFuture<F> {
        #[pin]
        state: TraceState<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = TraceProj]
    enum TraceState<F> {
        Plain {
            #[pin]
            fut: F,
        },
        Scoped {
            #[pin]
            fut: TraceScope<Instrumented<F>>,
        },
    }
}

impl<F: Future> Future for TraceFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().state.project() {
            TraceProj::Plain { fut } => fut.poll(cx),
            TraceProj::Scoped { fut } => fut.poll(cx),
        }
    }
}
