//! Publishing: records go to their topic's exchange with the partition as routing key
//! (Courier's murmur2, so keys land where every Courier backend puts them), persistent,
//! with publisher confirms unless `acks = 0` or `confirm = false`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use courier_core::{partition_for_key, Error, Receipt, Record, Result};
use lapin::options::BasicPublishOptions;
use lapin::Confirmation;
use tokio::sync::Mutex;

use crate::codec;
use crate::config::ExchangeKind;
use crate::conn::{err, Shared};
use crate::names;
use crate::topics::Topics;

/// The driver's publisher.
pub struct Publisher {
    shared: Arc<Shared>,
    topics: Arc<Topics>,
    confirm: bool,
    retry_max: u32,
    /// Publishes hand their messages to the channel in call order (FIFO lock), so
    /// concurrent publishes keep per-key order.
    order: Mutex<()>,
    /// Receipt positions: RabbitMQ's confirms do not say where a message was stored.
    seq: AtomicU64,
    sticky: AtomicU64,
}

impl Publisher {
    /// A publisher on `shared`'s publishing channel.
    pub fn new(shared: Arc<Shared>, topics: Arc<Topics>, confirm: bool, retry_max: u32) -> Self {
        Self {
            shared,
            topics,
            confirm,
            retry_max,
            order: Mutex::new(()),
            seq: AtomicU64::new(0),
            sticky: AtomicU64::new(0),
        }
    }

    /// Stores `batch`; receipts in input order.
    pub async fn publish(&self, batch: Vec<Record>) -> Result<Vec<Receipt>> {
        let total = batch.len();
        let mut attempt = 0;
        loop {
            match self.try_publish(&batch).await {
                Ok(r) => return Ok(r),
                Err(e @ (Error::Connection { .. } | Error::NotReady(_)))
                    if attempt < self.retry_max =>
                {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "publish failed; retrying on a new connection");
                    tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt)))
                        .await;
                }
                Err(e) => {
                    return Err(Error::BatchSendFailed {
                        failed: total,
                        total,
                        source: Box::new(e),
                    })
                }
            }
        }
    }

    async fn try_publish(&self, batch: &[Record]) -> Result<Vec<Receipt>> {
        let sticky = self.sticky.fetch_add(1, Ordering::Relaxed);
        let mut routes: Vec<(&str, crate::topics::Route)> = Vec::new();
        let mut placed = Vec::with_capacity(batch.len());
        for r in batch {
            let route = match routes.iter().find(|(t, _)| *t == r.topic) {
                Some((_, route)) => *route,
                None => {
                    let route = self.topics.route_or_create(&r.topic).await?;
                    routes.push((&r.topic, route));
                    route
                }
            };
            let n = route.partitions;
            let p = match (r.partition, &r.key) {
                (Some(p), _) if p < n => p,
                (Some(p), _) => {
                    return Err(Error::InvalidArgument(format!(
                        "partition {p} out of range: topic {:?} has {n}",
                        r.topic
                    )))
                }
                (None, Some(k)) => partition_for_key(k, n),
                (None, None) => (sticky % u64::from(n)) as u32,
            };
            placed.push((p, route.exchange));
        }
        let confirms = {
            let _order = self.order.lock().await;
            let ch = self.shared.publish_channel().await?;
            let mut confirms = Vec::with_capacity(batch.len());
            for (r, (p, kind)) in batch.iter().zip(&placed) {
                let props = codec::properties(r, (*kind == ExchangeKind::Headers).then_some(*p));
                let rk = names::routing_key(*p);
                let c = ch
                    .basic_publish(
                        names::exchange(&r.topic).into(),
                        rk.as_str().into(),
                        // Mandatory: a message no partition stream takes (bindings not
                        // recovered yet after a broker restart) comes back instead of
                        // being confirmed and dropped.
                        BasicPublishOptions {
                            mandatory: self.confirm,
                            ..Default::default()
                        },
                        &r.value,
                        props,
                    )
                    .await
                    .map_err(err)?;
                confirms.push(c);
            }
            confirms
        };
        if self.confirm {
            for c in confirms {
                match c.await.map_err(err)? {
                    Confirmation::Nack(_) => {
                        return Err(Error::NotReady(
                            "RabbitMQ refused the message (nack)".into(),
                        ))
                    }
                    Confirmation::Ack(Some(returned)) => {
                        return Err(Error::NotReady(format!(
                            "RabbitMQ routed the message to no partition stream ({} {}); \
                             the topic's bindings are missing or not recovered yet",
                            returned.reply_code, returned.reply_text
                        )))
                    }
                    Confirmation::Ack(None) | Confirmation::NotRequested => {}
                }
            }
        }
        let base = self.seq.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(batch
            .iter()
            .zip(placed)
            .enumerate()
            .map(|(i, (r, (p, _)))| Receipt {
                topic: r.topic.clone(),
                partition: p,
                offset: base + i as u64,
                id: r.id.clone(),
                timestamp: r.timestamp,
            })
            .collect())
    }
}
