//! The default consumer stack, with a fused path for the common message.
//!
//! Most deliveries go to a closure without user layers, with nobody listening for
//! handler spans, and succeed the first time. Through the layered stack such a
//! delivery mostly moves through six nested futures; [`DefaultStack`] instead does in
//! one step what the layers would do for it — make its trace context current,
//! decompress, count, call the handler, keep the copy a retry needs. If that first
//! attempt fails, the message continues in the same retry loop and dead-letter step
//! the layers use. Deliveries to user layers, with dedup on, or while a subscriber
//! listens for spans take the layers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use courier_core::{BoxError, Delivery};
use futures::future::{ready, BoxFuture, Either};
use tower::{Layer, Service};

use super::dead_letter::{DeadLetterLayer, DeadLetterService};
use super::decompress::{decompress_in_place, DecompressLayer, DecompressService};
use super::dedup::{DedupLayer, DedupService};
use super::handler::{Handler, HandlerFn, HandlerFuture};
use super::metrics::{note_arrival, MetricsLayer, MetricsService};
use super::retry::{self, RetryLayer, RetryService};
use super::trace::{span_wanted, TraceLayer, TraceService};
use crate::stats::{GroupCounters, Shard};
use crate::trace::{inherit, Inherited, TraceScope};

/// One attempt: decompress, count, handle (what a retry calls again).
type Attempt<H> = DecompressService<MetricsService<Handler<H>>>;
/// The whole stack as layers.
type Layered<H> = TraceService<DeadLetterService<DedupService<RetryService<Attempt<H>>>>>;

/// What builds the default stack around a handler.
pub(crate) struct StackParts {
    /// Retry policy, shutdown signal and whether a copy is kept for a retry.
    pub retry: RetryLayer,
    /// The dead-letter step (disabled under the `Redeliver` policy).
    pub dead_letter: DeadLetterLayer,
    /// Dedup by id, when configured.
    pub dedup: Option<DedupLayer>,
    /// The group's counters.
    pub counters: GroupCounters,
    /// The group, named in handler spans.
    pub group: Arc<str>,
}

/// Trace → dead letter → dedup → retry → decompress → metrics → handler: as tower
/// layers, plus a fused path (same behaviour) for plain deliveries to a direct handler.
/// Cloned once per partition worker; clones share no per-message state.
pub struct DefaultStack<H> {
    layered: Layered<H>,
    fused: Option<Fused<H>>,
}

impl<H> DefaultStack<H> {
    pub(crate) fn new(inner: Handler<H>, parts: StackParts) -> Self {
        let fused = match (&inner, &parts.dedup) {
            (Handler::Direct(h), None) => Some(Fused {
                handler: h.clone(),
                retry: parts.retry.clone(),
                dead_letter: parts.dead_letter.clone(),
                counters: parts.counters.clone(),
                worker: None,
            }),
            _ => None,
        };
        let attempt = DecompressLayer.layer(MetricsLayer::new(parts.counters).layer(inner));
        let retried = parts.retry.layer(attempt);
        let deduped = DedupService::optional(retried, parts.dedup);
        let layered = TraceLayer::new(parts.group).layer(parts.dead_letter.layer(deduped));
        Self { layered, fused }
    }
}

impl<H> Clone for DefaultStack<H>
where
    Layered<H>: Clone,
{
    fn clone(&self) -> Self {
        Self {
            layered: self.layered.clone(),
            fused: self.fused.as_ref().map(Fused::fresh),
        }
    }
}

/// The fused path of one partition worker.
struct Fused<H> {
    handler: HandlerFn<H>,
    retry: RetryLayer,
    dead_letter: DeadLetterLayer,
    counters: GroupCounters,
    /// Made on the first delivery (a worker serves one topic).
    worker: Option<Arc<Worker<H>>>,
}

impl<H> Fused<H> {
    fn fresh(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            retry: self.retry.clone(),
            dead_letter: self.dead_letter.clone(),
            counters: self.counters.clone(),
            worker: None,
        }
    }

    /// This worker's state for `topic`.
    fn worker(&mut self, topic: &Arc<str>) -> &Arc<Worker<H>> {
        let stale = self.worker.as_ref().is_none_or(|w| *w.topic != **topic);
        if stale {
            self.worker = None;
        }
        self.worker.get_or_insert_with(|| {
            let attempt = DecompressLayer.layer(
                MetricsLayer::new(self.counters.clone())
                    .layer(Handler::Direct(self.handler.clone())),
            );
            Arc::new(Worker {
                topic: Arc::from(&**topic),
                shard: self.counters.shard(topic),
                retry: retry::Shared::new(attempt, self.retry.clone()),
                dead_letter: self.dead_letter.clone(),
            })
        })
    }
}

/// What a fused first attempt needs after it ends: where to count it, and the retry
/// and dead-letter steps should it fail.
struct Worker<H> {
    /// This worker's own copy of the topic name, for the retry copies: the delivery's
    /// is one reference count that the topic's reader and every worker touch.
    topic: Arc<str>,
    shard: Arc<Shard>,
    retry: Arc<retry::Shared<Attempt<H>>>,
    dead_letter: DeadLetterLayer,
}

impl<H, Fut, E> Service<Delivery> for DefaultStack<H>
where
    H: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<
        Either<FusedFuture<Fut, H>, TraceScope<FusedFuture<Fut, H>>>,
        <Layered<H> as Service<Delivery>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The fused path's direct handler is always ready.
        self.layered.poll_ready(cx)
    }

    fn call(&mut self, d: Delivery) -> Self::Future {
        match &mut self.fused {
            Some(f) if !span_wanted() => {
                // What the trace layer does when nobody listens for spans: the
                // handler (and its retries) run with the producer's context current.
                let ctx = Inherited::from_headers(&d.headers);
                let fut = f.call(d);
                match ctx {
                    None => Either::Left(Either::Left(fut)),
                    Some(ctx) => Either::Left(Either::Right(inherit(ctx, fut))),
                }
            }
            _ => Either::Right(self.layered.call(d)),
        }
    }
}

impl<H, Fut, E> Fused<H>
where
    H: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    /// The first attempt: decompress, count, handle — keeping the original for a
    /// retry or a dead letter.
    fn call(&mut self, mut d: Delivery) -> FusedFuture<Fut, H> {
        let keep = self.retry.keeps_copy();
        let worker = self.worker(&d.topic).clone();
        let copy = keep.then(|| d.clone_message_naming(worker.topic.clone()));
        if let Err(e) = decompress_in_place(&mut d) {
            // Not an attempt (nothing counted): straight to the dead letters.
            let e: BoxError = Box::new(e);
            let fut: BoxFuture<'static, Result<(), BoxError>> = match copy {
                Some(d) => Box::pin(recover(worker, d, e)),
                None => Box::pin(ready(Err(e))),
            };
            return FusedFuture {
                state: FusedState::Recovering { fut },
            };
        }
        note_arrival(&worker.shard, &d);
        FusedFuture {
            state: FusedState::First {
                fut: self.handler.call(d),
                worker: Some(worker),
                copy,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of a fused delivery: the handler's own future; boxed only to retry.
    pub struct FusedFuture<Fut, H> {
        #[pin]
        state: FusedState<Fut, H>,
    }
}

pin_project_lite::pin_project! {
    #[project = FusedProj]
    enum FusedState<Fut, H> {
        First {
            #[pin]
            fut: HandlerFuture<Fut>,
            worker: Option<Arc<Worker<H>>>,
            copy: Option<Delivery>,
        },
        Recovering {
            fut: BoxFuture<'static, Result<(), BoxError>>,
        },
    }
}

impl<Fut, E, H> Future for FusedFuture<Fut, H>
where
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
    H: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Send + 'static,
    E: 'static,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                FusedProj::First { fut, worker, copy } => {
                    let out = std::task::ready!(fut.poll(cx));
                    let Some(w) = worker.take() else {
                        return Poll::Ready(out);
                    };
                    let e = match out {
                        Ok(()) => {
                            w.shard.consumed();
                            return Poll::Ready(Ok(()));
                        }
                        Err(e) => e,
                    };
                    w.shard.consume_error();
                    let Some(d) = copy.take() else {
                        // Redeliver policy: nothing to retry or bury here.
                        return Poll::Ready(Err(e));
                    };
                    state.set(FusedState::Recovering {
                        fut: Box::pin(recover(w, d, e)),
                    });
                }
                FusedProj::Recovering { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}

/// After a failed fused first attempt: the layered stack's retry loop, then its
/// dead-letter step.
async fn recover<H, Fut, E>(w: Arc<Worker<H>>, d: Delivery, e: BoxError) -> Result<(), BoxError>
where
    H: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    let e = match retry::retry_after_failure(w.retry.clone(), d, e).await {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    match w.dead_letter.bury(e) {
        Ok(publish) => publish.await,
        Err(e) => Err(e),
    }
}
