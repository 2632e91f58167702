//! What a consumer receives ([`Delivery`]) and how it is settled ([`AckHandle`]).

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::message::Headers;

/// Identifies one delivered message to the driver that delivered it.
pub struct AckToken {
    /// Topic of the message.
    pub topic: Arc<str>,
    /// Partition of the message.
    pub partition: u32,
    /// Offset (or backend position) of the message.
    pub offset: u64,
    /// Driver-defined generation; lets a driver recognise deliveries made before a
    /// rewind or a rebalance.
    pub epoch: u64,
    /// Anything else the driver needs to settle the message (a reply subject, a
    /// delivery tag …).
    pub extra: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for AckToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckToken")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("epoch", &self.epoch)
            .finish()
    }
}

/// Settles deliveries; implemented by drivers. Both calls must return quickly and never
/// block on I/O: drivers record the outcome and commit in the background (and on
/// close), which keeps per-message cost low.
pub trait Acker: Send + Sync + 'static {
    /// The message was handled: it may be committed once every earlier message of its
    /// partition is settled.
    fn ack(&self, token: AckToken);
    /// The message was not handled: deliver it again to this group no earlier than
    /// `redeliver_after`; nothing at or after it in its partition is committed first.
    fn nack(&self, token: AckToken, redeliver_after: Duration);
    /// True when the delivery was overtaken by a rewind or rebalance and must be
    /// neither handled nor settled.
    fn is_stale(&self, _token: &AckToken) -> bool {
        false
    }
}

/// The right to settle one delivery. Dropping it unsettled nacks the message with no
/// delay, so a panicking or cancelled handler never loses a message.
pub struct AckHandle {
    acker: Arc<dyn Acker>,
    token: Option<AckToken>,
}

impl AckHandle {
    /// A handle settling `token` through `acker`.
    pub fn new(acker: Arc<dyn Acker>, token: AckToken) -> Self {
        Self {
            acker,
            token: Some(token),
        }
    }

    /// Acknowledges the message.
    pub fn ack(mut self) {
        if let Some(t) = self.token.take() {
            self.acker.ack(t);
        }
    }

    /// Rejects the message; it comes back after `redeliver_after`.
    pub fn nack(mut self, redeliver_after: Duration) {
        if let Some(t) = self.token.take() {
            self.acker.nack(t, redeliver_after);
        }
    }

    /// The topic of the delivery this handle settles (`None` once settled).
    pub fn topic(&self) -> Option<&str> {
        self.token.as_ref().map(|t| &*t.topic)
    }

    /// True when the delivery is stale (see [`Acker::is_stale`]).
    pub fn is_stale(&self) -> bool {
        self.token.as_ref().is_some_and(|t| self.acker.is_stale(t))
    }

    /// Drops the handle without settling (for stale deliveries only).
    pub fn discard(mut self) {
        self.token = None;
    }

    /// The acker and token, while unsettled (`None` once settled), without taking
    /// them: who hands out the delivery, for a holder that tracks ownership.
    pub fn parts(&self) -> Option<(&Arc<dyn Acker>, &AckToken)> {
        self.token.as_ref().map(|t| (&self.acker, t))
    }

    /// The acker and token, unsettled: lets a holder of very many deliveries of one
    /// partition keep one acker per partition and settle by offset later (Courier's
    /// scheduler index). Whoever takes them must settle or knowingly leave the message
    /// unsettled; dropping them does not nack.
    pub fn into_parts(mut self) -> Option<(Arc<dyn Acker>, AckToken)> {
        let token = self.token.take()?;
        Some((self.acker.clone(), token))
    }
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        if let Some(t) = self.token.take() {
            self.acker.nack(t, Duration::ZERO);
        }
    }
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("token", &self.token)
            .finish()
    }
}

/// A message delivered to a consumer.
#[derive(Debug)]
pub struct Delivery {
    /// Topic it came from.
    pub topic: Arc<str>,
    /// Partition it came from.
    pub partition: u32,
    /// Offset (or backend position) within the partition.
    pub offset: u64,
    /// Key as sent.
    pub key: Option<Bytes>,
    /// Value as sent.
    pub value: Bytes,
    /// Headers as sent.
    pub headers: Headers,
    /// The message id given on send (shared: copies the pipeline keeps for a retry or
    /// a dead letter cost a reference count, not an allocation).
    pub id: Arc<str>,
    /// Timestamp given on send, ms since the epoch.
    pub timestamp: i64,
    /// 1 on first delivery, then counts redeliveries (where the backend knows).
    pub attempt: u32,
    ack: Option<AckHandle>,
}

impl Delivery {
    /// A delivery as a driver builds it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topic: Arc<str>,
        partition: u32,
        offset: u64,
        key: Option<Bytes>,
        value: Bytes,
        headers: Headers,
        id: impl Into<Arc<str>>,
        timestamp: i64,
        attempt: u32,
        ack: Option<AckHandle>,
    ) -> Self {
        Self {
            topic,
            partition,
            offset,
            key,
            value,
            headers,
            id: id.into(),
            timestamp,
            attempt,
            ack,
        }
    }

    /// A copy of the message without the right to settle it (the pipeline keeps one
    /// to retry or dead-letter after the handler consumed the original).
    pub fn clone_message(&self) -> Delivery {
        self.clone_message_naming(self.topic.clone())
    }

    /// [`clone_message`](Self::clone_message) with `topic` (the same name, another
    /// reference): the delivery's own topic name is one reference count shared by
    /// every delivery of the topic, touched from all of its workers' threads.
    pub fn clone_message_naming(&self, topic: Arc<str>) -> Delivery {
        Delivery {
            topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.clone(),
            value: self.value.clone(),
            headers: self.headers.clone(),
            id: self.id.clone(),
            timestamp: self.timestamp,
            attempt: self.attempt,
            ack: None,
        }
    }

    /// Takes the settle handle out, leaving a plain message (what the consumer
    /// runtime does before calling a handler).
    pub fn take_ack(&mut self) -> Option<AckHandle> {
        self.ack.take()
    }

    /// Acknowledges the delivery (manual settling at the driver level).
    pub fn ack(mut self) {
        if let Some(h) = self.ack.take() {
            h.ack();
        }
    }

    /// Rejects the delivery; it comes back after `redeliver_after`.
    pub fn nack(mut self, redeliver_after: Duration) {
        if let Some(h) = self.ack.take() {
            h.nack(redeliver_after);
        }
    }

    /// The value as UTF-8 text.
    pub fn value_str(&self) -> Result<&str> {
        std::str::from_utf8(&self.value).map_err(|e| Error::Serialization(e.to_string()))
    }

    /// The value parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.value).map_err(|e| Error::Serialization(e.to_string()))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);
    impl Acker for Log {
        fn ack(&self, t: AckToken) {
            self.0.lock().unwrap().push(format!("ack {}", t.offset));
        }
        fn nack(&self, t: AckToken, d: Duration) {
            self.0
                .lock()
                .unwrap()
                .push(format!("nack {} {}", t.offset, d.as_millis()));
        }
    }

    fn token(offset: u64) -> AckToken {
        AckToken {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            epoch: 0,
            extra: None,
        }
    }

    #[test]
    fn dropping_an_unsettled_handle_nacks_it_once() {
        let log = Arc::new(Log::default());
        AckHandle::new(log.clone(), token(1)).ack();
        drop(AckHandle::new(log.clone(), token(2)));
        AckHandle::new(log.clone(), token(3)).nack(Duration::from_millis(5));
        AckHandle::new(log.clone(), token(4)).discard();
        assert_eq!(
            *log.0.lock().unwrap(),
            vec!["ack 1", "nack 2 0", "nack 3 5"]
        );
    }
}
