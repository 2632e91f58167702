//! A live group membership on Redis: a reader task and a coordinator task sharing
//! the member's state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use courier_core::{Delivery, Error, Result, Subscription, TopicPartition};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::state::{Event, Shared};
use crate::BACKEND;

pub(crate) struct RedisSubscription {
    pub(crate) shared: Arc<Shared>,
    pub(crate) events: mpsc::Receiver<Event>,
    pub(crate) reader: Option<JoinHandle<()>>,
    pub(crate) coordinator: Option<JoinHandle<()>>,
    pub(crate) reported: Vec<TopicPartition>,
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next_batch(&mut self, _max: usize) -> Result<Option<Vec<Delivery>>> {
        loop {
            let now = self.shared.assignment();
            if now != self.reported {
                self.reported = now;
                return Ok(Some(Vec::new()));
            }
            match self.events.recv().await {
                Some(Event::Batch(b)) => return Ok(Some(b)),
                Some(Event::Assigned) => continue,
                None => return Ok(None),
            }
        }
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.shared.assignment()
    }

    async fn close(&mut self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.flow.wake_reader.notify_one();
        // Deliveries never handed to a handler are dropped (nacked): they stay pending
        // and the next owner re-reads them.
        self.events.close();
        while self.events.try_recv().is_ok() {}
        if let Some(r) = self.reader.take() {
            r.await.map_err(|e| Error::backend(BACKEND, e))?;
        }
        self.shared.leaving.store(true, Ordering::Release);
        self.shared.flow.wake_coordinator.notify_one();
        if let Some(c) = self.coordinator.take() {
            match tokio::time::timeout(Duration::from_secs(10), c).await {
                Ok(r) => r.map_err(|e| Error::backend(BACKEND, e))?,
                Err(_) => tracing::warn!("leaving the group timed out; leases expire on their own"),
            }
        }
        Ok(())
    }
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        // Not closed: stop and leave in the background as well as we can.
        self.shared.closed.store(true, Ordering::Release);
        self.shared.leaving.store(true, Ordering::Release);
        self.shared.flow.wake_reader.notify_one();
        self.shared.flow.wake_coordinator.notify_one();
    }
}
