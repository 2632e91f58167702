//! Dead letters (SPEC R3): a message whose retries are exhausted is published to the
//! dead-letter topic with its original key, value and headers plus the `x-original-*`
//! headers; only when that publish succeeded is the message committed.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use courier_core::{BoxError, Delivery, Driver, Error, Record, TopicSpec};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tower::{Layer, Service};

use super::retry::Exhausted;
use crate::stats::GroupCounters;

/// Topic the message was first published to.
pub const ORIGINAL_TOPIC: &str = "x-original-topic";
/// Its partition there.
pub const ORIGINAL_PARTITION: &str = "x-original-partition";
/// Its offset there.
pub const ORIGINAL_OFFSET: &str = "x-original-offset";
/// Its message id (re-drive sends it again under this id).
pub const ORIGINAL_ID: &str = "x-original-id";
/// The handler's last error.
pub const ERROR_MESSAGE: &str = "x-error-message";
/// The group that gave up on it.
pub const CONSUMER_GROUP: &str = "x-consumer-group";
/// Retries made after the first attempt.
pub const RETRY_COUNT: &str = "x-retry-count";
/// When it was dead-lettered, ms since the epoch.
pub const FAILED_AT: &str = "x-failed-at";

/// Every header the dead-letter step adds (removed again on re-drive).
pub const HEADERS: [&str; 8] = [
    ORIGINAL_TOPIC,
    ORIGINAL_PARTITION,
    ORIGINAL_OFFSET,
    ORIGINAL_ID,
    ERROR_MESSAGE,
    CONSUMER_GROUP,
    RETRY_COUNT,
    FAILED_AT,
];

/// The dead-letter topic for messages of `topic`: `dlq` if given, else `{topic}.dlq`.
pub(crate) fn dead_letter_topic(dlq: Option<&str>, topic: &str) -> String {
    match dlq {
        Some(t) => t.to_string(),
        None => format!("{topic}.dlq"),
    }
}

/// Longest error text stored in `x-error-message`.
const MAX_ERROR_LEN: usize = 1024;

/// Adds [`DeadLetterService`].
#[derive(Clone)]
pub struct DeadLetterLayer {
    enabled: bool,
    driver: Arc<dyn Driver>,
    topic: Option<Arc<str>>,
    counters: GroupCounters,
    ensured: Arc<Mutex<HashSet<String>>>,
}

impl DeadLetterLayer {
    /// `enabled = false` passes every error through (the `Redeliver` policy).
    pub(crate) fn new(
        enabled: bool,
        driver: Arc<dyn Driver>,
        topic: Option<String>,
        counters: GroupCounters,
    ) -> Self {
        Self {
            enabled,
            driver,
            topic: topic.map(Arc::from),
            counters,
            ensured: Arc::new(Mutex::new(HashSet::new())),
        }
    }
}

impl<S> Layer<S> for DeadLetterLayer {
    type Service = DeadLetterService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DeadLetterService {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

/// Turns an [`Exhausted`] error into a dead letter; any other error passes through
/// (the message stays uncommitted).
pub struct DeadLetterService<S> {
    inner: S,
    // Per partition worker (see `Clone`): the per-message cost is one uncontended
    // reference count.
    layer: Arc<DeadLetterLayer>,
}

impl<S: Clone> Clone for DeadLetterService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: Arc::new(DeadLetterLayer::clone(&self.layer)),
        }
    }
}

impl<S> Service<Delivery> for DeadLetterService<S>
where
    S: Service<Delivery, Response = (), Error = BoxError> + Send + 'static,
    S::Future: Send,
{
    type Response = ();
    type Error = BoxError;
    type Future = DeadLetterFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, d: Delivery) -> Self::Future {
        DeadLetterFuture {
            state: DlState::Running {
                fut: self.inner.call(d),
                layer: Some(self.layer.clone()),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`DeadLetterService`]: the inner future as is; boxed only to
    /// publish a dead letter.
    pub struct DeadLetterFuture<F> {
        #[pin]
        state: DlState<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = DlProj]
    enum DlState<F> {
        Running {
            #[pin]
            fut: F,
            layer: Option<Arc<DeadLetterLayer>>,
        },
        Publishing {
            fut: BoxFuture<'static, Result<(), BoxError>>,
        },
    }
}

impl<F: Future<Output = Result<(), BoxError>>> Future for DeadLetterFuture<F> {
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                DlProj::Running { fut, layer } => {
                    let e = match std::task::ready!(fut.poll(cx)) {
                        Ok(()) => return Poll::Ready(Ok(())),
                        Err(e) => e,
                    };
                    let Some(layer) = layer.take() else {
                        return Poll::Ready(Err(e));
                    };
                    match layer.bury(e) {
                        Ok(fut) => state.set(DlState::Publishing { fut }),
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                DlProj::Publishing { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}

impl DeadLetterLayer {
    /// For an [`Exhausted`] error (and dead letters on): the publish of its dead
    /// letter, which resolves `Ok` once stored. Any other error comes back as is.
    pub(crate) fn bury(
        &self,
        e: BoxError,
    ) -> Result<BoxFuture<'static, Result<(), BoxError>>, BoxError> {
        if !self.enabled {
            return Err(e);
        }
        let x = e.downcast::<Exhausted>()?;
        Ok(Box::pin(self.clone().publish(*x)))
    }

    async fn publish(mut self, x: Exhausted) -> Result<(), BoxError> {
        let d = *x.delivery;
        let dlq = dead_letter_topic(self.topic.as_deref(), &d.topic);
        let mut error = x.source.to_string();
        if error.len() > MAX_ERROR_LEN {
            let mut cut = MAX_ERROR_LEN;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        let group = self.counters.group().clone();
        let mut headers = d.headers.clone();
        headers.insert(ORIGINAL_TOPIC, d.topic.to_string());
        headers.insert(ORIGINAL_PARTITION, d.partition.to_string());
        headers.insert(ORIGINAL_OFFSET, d.offset.to_string());
        headers.insert(ORIGINAL_ID, d.id.to_string());
        headers.insert(ERROR_MESSAGE, error.clone());
        headers.insert(CONSUMER_GROUP, group.to_string());
        headers.insert(RETRY_COUNT, x.retries.to_string());
        headers.insert(FAILED_AT, courier_core::now_millis().to_string());
        let record = Record::from_message(courier_core::Message {
            topic: dlq.clone(),
            key: d.key.clone(),
            value: d.value.clone(),
            headers,
            id: None,
            timestamp: None,
            partition: None,
            deliver_at: None,
        });
        let stored = async {
            self.ensure_topic(&dlq).await?;
            self.layer_publish(record).await
        }
        .await;
        match stored {
            Ok(()) => {
                self.counters.get(&d.topic).dead_lettered();
                tracing::error!(
                    topic = %d.topic, partition = d.partition, offset = d.offset,
                    id = %d.id, %group, dlq = %dlq, retries = x.retries, %error,
                    "message dead-lettered"
                );
                Ok(())
            }
            Err(e) => {
                // Not committed: the message comes back and is tried again.
                tracing::error!(
                    topic = %d.topic, partition = d.partition, offset = d.offset,
                    dlq = %dlq, error = %e, "dead-letter publish failed; not committing"
                );
                Err(Box::new(e) as BoxError)
            }
        }
    }

    async fn layer_publish(&self, record: Record) -> Result<(), Error> {
        self.driver.publish(vec![record]).await.map(|_| ())
    }

    async fn ensure_topic(&self, dlq: &str) -> Result<(), Error> {
        if self.ensured.lock().contains(dlq) {
            return Ok(());
        }
        if self.driver.partitions(dlq).await?.is_none() {
            match self.driver.create_topic(TopicSpec::new(dlq, 1)).await {
                Ok(()) | Err(Error::TopicExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.ensured.lock().insert(dlq.to_string());
        Ok(())
    }
}
