//! [`Subscription`] over a group [`Member`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use courier_core::{Delivery, Result, Subscription, TopicPartition};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::member::{self, Member, MemberConfig};

/// A live group membership.
pub struct AmqpSubscription {
    member: Arc<Member>,
    rx: mpsc::Receiver<Delivery>,
    assigned: watch::Receiver<Vec<TopicPartition>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl AmqpSubscription {
    /// Joins the group described by `cfg`.
    pub fn start(cfg: MemberConfig) -> Self {
        let (tx, rx) = mpsc::channel(usize::from(cfg.prefetch).max(64));
        let member = Member::new(cfg, tx);
        let stop = CancellationToken::new();
        let task = tokio::spawn(member::run(member.clone(), stop.clone()));
        let assigned = member.assigned.subscribe();
        Self {
            member,
            rx,
            assigned,
            stop,
            task: Some(task),
        }
    }
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Delivery>>> {
        if self.task.is_none() {
            return Ok(None);
        }
        if self.assigned.has_changed().unwrap_or(false) {
            self.assigned.borrow_and_update();
            return Ok(Some(Vec::new()));
        }
        let first = tokio::select! {
            d = self.rx.recv() => d,
            _ = self.assigned.changed() => {
                self.assigned.borrow_and_update();
                return Ok(Some(Vec::new()));
            }
        };
        let Some(first) = first else { return Ok(None) };
        let mut out = Vec::with_capacity(max.min(self.rx.len() + 1));
        out.push(first);
        while out.len() < max {
            match self.rx.try_recv() {
                Ok(d) => out.push(d),
                Err(_) => break,
            }
        }
        Ok(Some(out))
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.member.assigned.borrow().clone()
    }

    fn is_connected(&self) -> bool {
        self.member.connected.load(Ordering::Acquire)
    }

    async fn close(&mut self) -> Result<()> {
        self.stop.cancel();
        // Unhandled deliveries go back (their handles nack) before the final commit.
        while let Ok(d) = self.rx.try_recv() {
            drop(d);
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        Ok(())
    }
}
