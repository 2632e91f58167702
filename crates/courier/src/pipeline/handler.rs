//! The user's handler closure as a `tower::Service`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use courier_core::{BoxError, Delivery};
use futures::future::{BoxFuture, CatchUnwind, Either};
use futures::FutureExt;
use tower::Service;

/// A boxed, cloneable handler service (what user layers are stacked on).
pub type BoxedHandler = tower::util::BoxCloneSyncService<Delivery, (), BoxError>;

/// Adapts `Fn(Delivery) -> Future<Output = Result<(), E>>` to `Service<Delivery>`.
/// Always ready; cloning shares the closure.
pub struct HandlerFn<H> {
    f: Arc<H>,
}

impl<H> Clone for HandlerFn<H> {
    fn clone(&self) -> Self {
        Self { f: self.f.clone() }
    }
}

impl<H> HandlerFn<H> {
    /// Wraps `f`.
    pub fn new(f: H) -> Self {
        Self { f: Arc::new(f) }
    }
}

impl<H, Fut, E> Service<Delivery> for HandlerFn<H>
where
    H: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = HandlerFuture<Fut>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, d: Delivery) -> Self::Future {
        // A panic becomes an ordinary failure, so a poison message is retried and
        // dead-lettered instead of blocking its partition forever — whether the
        // closure panics making its future or the future panics when polled.
        match std::panic::catch_unwind(AssertUnwindSafe(|| (self.f)(d))) {
            Ok(fut) => HandlerFuture::Running {
                fut: AssertUnwindSafe(fut).catch_unwind(),
            },
            Err(_) => HandlerFuture::Panicked,
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`HandlerFn`]: the closure's own future (no box), with panics
    /// turned into errors.
    #[project = HandlerProj]
    pub enum HandlerFuture<F> {
        /// The handler runs.
        Running {
            #[pin]
            fut: CatchUnwind<AssertUnwindSafe<F>>,
        },
        /// The closure panicked before returning a future.
        Panicked,
    }
}

impl<F, E> Future for HandlerFuture<F>
where
    F: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            HandlerProj::Running { fut } => match std::task::ready!(fut.poll(cx)) {
                Ok(r) => Poll::Ready(r.map_err(Into::into)),
                Err(_) => Poll::Ready(Err(BoxError::from("handler panicked"))),
            },
            HandlerProj::Panicked => Poll::Ready(Err(BoxError::from("handler panicked"))),
        }
    }
}

/// The handler with the user's tower layers, if any.
pub enum Handler<H> {
    /// No user layers: the closure is called directly.
    Direct(HandlerFn<H>),
    /// Wrapped in user layers.
    Layered(BoxedHandler),
}

impl<H> Clone for Handler<H> {
    fn clone(&self) -> Self {
        match self {
            Handler::Direct(h) => Handler::Direct(h.clone()),
            Handler::Layered(h) => Handler::Layered(h.clone()),
        }
    }
}

impl<H, Fut, E> Service<Delivery> for Handler<H>
where
    H: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<HandlerFuture<Fut>, BoxFuture<'static, Result<(), BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Handler::Direct(h) => h.poll_ready(cx),
            Handler::Layered(h) => h.poll_ready(cx),
        }
    }

    fn call(&mut self, d: Delivery) -> Self::Future {
        match self {
            Handler::Direct(h) => Either::Left(h.call(d)),
            Handler::Layered(h) => Either::Right(h.call(d)),
        }
    }
}
