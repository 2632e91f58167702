//! Consumer-side dedup by message id within a window (SPEC R4).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use courier_core::{BoxError, Delivery, Result};
use futures::future::{BoxFuture, Either};
use parking_lot::Mutex;
use tower::{Layer, Service};

/// Where handled ids are remembered. `claim` must be atomic: of two concurrent claims
/// of one key, exactly one returns `true`.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Marks `key` as taken for `window`; `false` when it already was (a duplicate).
    async fn claim(&self, key: &str, window: Duration) -> Result<bool>;
    /// Forgets `key` (its handling failed, so a later copy must be handled).
    async fn release(&self, key: &str) -> Result<()>;
}

/// An in-process [`DedupStore`]: ids live in memory for the window. Only members of
/// one process share it; use a shared store for groups spread over processes.
#[derive(Default)]
pub struct MemoryDedupStore {
    inner: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    until: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl MemoryDedupStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ids currently remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().until.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn claim(&self, key: &str, window: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut s = self.inner.lock();
        // Expire from the front: entries are in insertion order and share one window
        // per consumer, so the oldest expire first.
        while let Some((at, _)) = s.order.front() {
            if *at > now {
                break;
            }
            if let Some((at, k)) = s.order.pop_front() {
                if s.until.get(&k).is_some_and(|u| *u <= at) {
                    s.until.remove(&k);
                }
            }
        }
        if s.until.get(key).is_some_and(|u| *u > now) {
            return Ok(false);
        }
        let until = now + window;
        s.until.insert(key.to_string(), until);
        s.order.push_back((until, key.to_string()));
        Ok(true)
    }

    async fn release(&self, key: &str) -> Result<()> {
        self.inner.lock().until.remove(key);
        Ok(())
    }
}

/// Adds [`DedupService`].
#[derive(Clone)]
pub struct DedupLayer {
    store: Arc<dyn DedupStore>,
    window: Duration,
    group: Arc<str>,
}

impl DedupLayer {
    pub(crate) fn new(store: Arc<dyn DedupStore>, window: Duration, group: Arc<str>) -> Self {
        Self {
            store,
            window,
            group,
        }
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = DedupService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DedupService {
            inner,
            layer: Some(self.clone()),
        }
    }
}

/// Handles an id once per window per group: a duplicate is acknowledged without
/// calling the handler; a failed handling releases the id. Without a layer it passes
/// straight through.
#[derive(Clone)]
pub struct DedupService<S> {
    inner: S,
    layer: Option<DedupLayer>,
}

impl<S> DedupService<S> {
    /// `inner` with dedup by `layer`, or none.
    pub(crate) fn optional(inner: S, layer: Option<DedupLayer>) -> Self {
        Self { inner, layer }
    }
}

impl<S> Service<Delivery> for DedupService<S>
where
    S: Service<Delivery, Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<S::Future, BoxFuture<'static, Result<(), BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, d: Delivery) -> Self::Future {
        let Some(layer) = self.layer.clone() else {
            return Either::Left(self.inner.call(d));
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(async move {
            let key = format!("{}\u{1f}{}", layer.group, d.id);
            if !layer.store.claim(&key, layer.window).await? {
                tracing::debug!(topic = %d.topic, offset = d.offset, id = %d.id, "duplicate skipped");
                return Ok(());
            }
            let result = inner.call(d).await;
            if result.is_err() {
                if let Err(e) = layer.store.release(&key).await {
                    tracing::warn!(error = %e, "dedup release failed");
                }
            }
            result
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claims_once_within_the_window_then_expires() {
        let s = MemoryDedupStore::new();
        assert!(s.claim("a", Duration::from_millis(50)).await.unwrap());
        assert!(!s.claim("a", Duration::from_millis(50)).await.unwrap());
        s.release("a").await.unwrap();
        assert!(s.claim("a", Duration::from_millis(50)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(s.claim("b", Duration::from_millis(50)).await.unwrap());
        assert_eq!(s.len(), 1, "expired ids are dropped");
        assert!(s.claim("a", Duration::from_millis(50)).await.unwrap());
    }
}
