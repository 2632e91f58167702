//! Per-partition delivery bookkeeping and the [`Acker`] of a subscription.
//!
//! JetStream acks each message on its own, so nothing needs a committed prefix; what
//! Courier adds is order under nacks: a nack of sequence `S` naks `S` and every later
//! delivered message of the partition with the same deadline (JetStream hands expired
//! redeliveries back sorted by sequence, ahead of new messages), makes the old
//! deliveries stale (a new epoch), and holds the partition until `S` is back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::Bytes;
use courier_core::{AckToken, Acker};
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot, Notify};

/// Topic and partition.
pub(crate) type Tp = (Arc<str>, u32);

/// What the settler task sends to the server.
pub(crate) enum Settle {
    /// Publish `payload` to an ack reply subject.
    Reply(Subject, Bytes),
    /// Answer once everything queued before was written and the server confirmed it.
    Flush(oneshot::Sender<()>),
}

/// A delivered, unsettled message.
pub(crate) struct Outstanding {
    pub epoch: u64,
    pub reply: Subject,
    pub attempt: u32,
    /// When the server last restarted its `ack_wait` timer for it (delivery or
    /// progress ack).
    pub since: Instant,
}

/// The hold a nack puts on its partition.
pub(crate) struct Rewind {
    /// When the nacked messages come back.
    pub due: Instant,
    /// Sequences naked and not yet delivered again, lowest first.
    pub awaiting: BTreeSet<u64>,
}

/// Bookkeeping of one owned partition.
#[derive(Default)]
pub(crate) struct Part {
    pub epoch: u64,
    pub outstanding: BTreeMap<u64, Outstanding>,
    pub rewind: Option<Rewind>,
    /// Attempt numbers of naked messages, for their next delivery.
    pub attempts: HashMap<u64, u32>,
}

/// What the reader does with a message that arrived.
pub(crate) enum Verdict {
    /// Hand it out with this epoch and attempt number.
    Deliver { epoch: u64, attempt: u32 },
    /// It overtook a nacked message: nak it to come back after this delay.
    Bounce(Duration),
    /// JetStream sent again a message still held here (its `ack_wait` ran out while
    /// the handler or the scheduler held it): the holder settles it, so it is not
    /// handed out a second time.
    Held,
}

impl Part {
    /// Decides about sequence `seq` (delivered `delivered` times by the server) and
    /// records it as outstanding when it is handed out.
    pub(crate) fn arrive(&mut self, seq: u64, delivered: i64, reply: Subject) -> Verdict {
        if let Some(o) = self.outstanding.get_mut(&seq) {
            if o.epoch == self.epoch {
                o.reply = reply;
                o.since = Instant::now();
                return Verdict::Held;
            }
        }
        if let Some(rw) = &mut self.rewind {
            match rw.awaiting.first().copied() {
                Some(head) if seq == head => {
                    rw.awaiting.remove(&seq);
                    if rw.awaiting.is_empty() {
                        self.rewind = None;
                    }
                }
                Some(head) if seq > head => {
                    rw.awaiting.insert(seq);
                    // A bounce is not an attempt: keep the count the handler will see.
                    self.attempts
                        .entry(seq)
                        .or_insert_with(|| delivered.clamp(1, i64::from(u32::MAX)) as u32);
                    return Verdict::Bounce(rw.due.saturating_duration_since(Instant::now()));
                }
                _ => {}
            }
        }
        let attempt = self
            .attempts
            .remove(&seq)
            .unwrap_or_else(|| delivered.clamp(1, i64::from(u32::MAX)) as u32);
        self.outstanding.insert(
            seq,
            Outstanding {
                epoch: self.epoch,
                reply,
                attempt,
                since: Instant::now(),
            },
        );
        Verdict::Deliver {
            epoch: self.epoch,
            attempt,
        }
    }
}

/// `-NAK` with a redelivery delay.
pub(crate) fn nak_payload(delay: Duration) -> Bytes {
    if delay.is_zero() {
        Bytes::from_static(b"-NAK")
    } else {
        Bytes::from(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
    }
}

/// State shared by the readers, the coordinator and the ack handles.
pub(crate) struct Book {
    parts: Mutex<HashMap<Tp, Part>>,
    epochs: AtomicU64,
    settle: mpsc::UnboundedSender<Settle>,
    /// Signalled whenever a message is settled (revocations wait on it).
    pub settled: Notify,
}

impl Book {
    pub(crate) fn new(settle: mpsc::UnboundedSender<Settle>) -> Self {
        Self {
            parts: Mutex::new(HashMap::new()),
            epochs: AtomicU64::new(1),
            settle,
            settled: Notify::new(),
        }
    }

    pub(crate) fn parts(&self) -> MutexGuard<'_, HashMap<Tp, Part>> {
        self.parts.lock()
    }

    pub(crate) fn new_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn send(&self, s: Settle) {
        // The settler only ends when the subscription is dropped; a lost ack is a
        // redelivery, never a loss.
        let _ = self.settle.send(s);
    }

    /// Gives the delivery behind `reply` back for immediate redelivery (`-NAK`).
    pub(crate) fn nak_now(&self, reply: Subject) {
        self.send(Settle::Reply(reply, nak_payload(Duration::ZERO)));
    }

    /// Starts tracking a newly owned partition.
    pub(crate) fn add(&self, tp: Tp) {
        let epoch = self.new_epoch();
        self.parts().insert(
            tp,
            Part {
                epoch,
                ..Default::default()
            },
        );
    }

    /// Unsettled deliveries of `tp`.
    pub(crate) fn outstanding(&self, tp: &Tp) -> usize {
        self.parts().get(tp).map_or(0, |p| p.outstanding.len())
    }

    /// Stops tracking `tp`: what is still unsettled is naked (lowest first, so the
    /// next owner gets it back in order) and its deliveries become stale.
    pub(crate) fn remove(&self, tp: &Tp) {
        let Some(part) = self.parts().remove(tp) else {
            return;
        };
        for (_, o) in part.outstanding {
            self.nak_now(o.reply);
        }
        self.settled.notify_waiters();
    }

    /// Sends a progress ack (`+WIP`) for every delivery held longer than `older`, so
    /// JetStream does not send it again while it is held (a long handler, or a
    /// delayed message waiting in the scheduler). Returns how many it refreshed.
    pub(crate) fn keep_alive(&self, older: Duration) -> usize {
        let now = Instant::now();
        let mut refreshed = 0;
        for part in self.parts().values_mut() {
            for o in part.outstanding.values_mut() {
                if now.duration_since(o.since) >= older {
                    o.since = now;
                    refreshed += 1;
                    self.send(Settle::Reply(o.reply.clone(), Bytes::from_static(WIP)));
                }
            }
        }
        refreshed
    }

    /// Writes every queued settle and waits for the server to confirm.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Settle::Flush(tx));
        let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
    }
}

impl Acker for Book {
    fn ack(&self, token: AckToken) {
        let mut parts = self.parts();
        if let Some(p) = parts.get_mut(&(token.topic.clone(), token.partition)) {
            if p.outstanding.get(&token.offset).map(|o| o.epoch) == Some(token.epoch) {
                if let Some(o) = p.outstanding.remove(&token.offset) {
                    self.send(Settle::Reply(o.reply, Bytes::from_static(ACK)));
                }
            }
        }
        drop(parts);
        self.settled.notify_waiters();
    }

    fn nack(&self, token: AckToken, redeliver_after: Duration) {
        let mut parts = self.parts();
        let seq = token.offset;
        if let Some(p) = parts.get_mut(&(token.topic.clone(), token.partition)) {
            if p.outstanding.get(&seq).map(|o| o.epoch) == Some(token.epoch) {
                p.epoch = self.new_epoch();
                let later = p.outstanding.split_off(&seq);
                let payload = nak_payload(redeliver_after);
                let rw = p.rewind.get_or_insert_with(|| Rewind {
                    due: Instant::now() + redeliver_after,
                    awaiting: BTreeSet::new(),
                });
                rw.due = Instant::now() + redeliver_after;
                for (s, o) in later {
                    let attempt = if s == seq { o.attempt + 1 } else { o.attempt };
                    p.attempts.insert(s, attempt);
                    rw.awaiting.insert(s);
                    self.send(Settle::Reply(o.reply, payload.clone()));
                }
            }
        }
        drop(parts);
        self.settled.notify_waiters();
    }

    fn is_stale(&self, token: &AckToken) -> bool {
        let parts = self.parts();
        parts
            .get(&(token.topic.clone(), token.partition))
            .and_then(|p| p.outstanding.get(&token.offset))
            .map(|o| o.epoch)
            != Some(token.epoch)
    }
}

/// Writes acks and naks in order on the connection.
///
/// A flush also waits until JetStream has applied the acks: the server queues acks
/// per consumer and applies them in order, so once a synchronous re-ack of the last
/// acked message of each consumer is answered, everything acked before it is
/// visible (to the next owner and to admin reads).
pub(crate) async fn settler(client: async_nats::Client, mut rx: mpsc::UnboundedReceiver<Settle>) {
    let mut last_acked: HashMap<String, Subject> = HashMap::new();
    while let Some(s) = rx.recv().await {
        match s {
            Settle::Reply(subject, payload) => {
                if payload.as_ref() == ACK {
                    last_acked.insert(consumer_of(&subject).to_string(), subject.clone());
                }
                if let Err(e) = client.publish(subject, payload).await {
                    tracing::warn!(error = %e, "ack not sent; the message will be redelivered");
                }
            }
            Settle::Flush(done) => {
                if let Err(e) = client.flush().await {
                    tracing::warn!(error = %e, "flush of acks failed");
                }
                let confirms = last_acked.drain().map(|(_, subject)| {
                    let client = client.clone();
                    async move {
                        let sync = client.request(subject, Bytes::from_static(ACK));
                        if tokio::time::timeout(ACK_SYNC_TIMEOUT, sync).await.is_err() {
                            tracing::debug!("JetStream did not confirm the acks in time");
                        }
                    }
                });
                futures::future::join_all(confirms).await;
                let _ = done.send(());
            }
        }
    }
}

const ACK: &[u8] = b"+ACK";
const WIP: &[u8] = b"+WIP";
const ACK_SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// The `$JS.ACK.<stream>.<consumer>` part of an ack reply subject.
fn consumer_of(reply: &str) -> &str {
    match reply.match_indices('.').nth(3) {
        Some((i, _)) => &reply[..i],
        None => reply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_of_keeps_stream_and_consumer() {
        assert_eq!(
            consumer_of("$JS.ACK.orders.g-0.1.42.42.1700000000.0"),
            "$JS.ACK.orders.g-0"
        );
        assert_eq!(consumer_of("short"), "short");
    }

    fn tok(seq: u64, epoch: u64) -> AckToken {
        AckToken {
            topic: Arc::from("t"),
            partition: 0,
            offset: seq,
            epoch,
            extra: None,
        }
    }

    #[test]
    fn a_nack_holds_the_partition_until_the_message_is_back() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let book = Book::new(tx);
        let tp: Tp = (Arc::from("t"), 0);
        book.add(tp.clone());
        let mut epochs = Vec::new();
        for seq in [10, 11, 12] {
            let v = book
                .parts()
                .get_mut(&tp)
                .unwrap()
                .arrive(seq, 1, "r".into());
            match v {
                Verdict::Deliver { epoch, attempt } => {
                    assert_eq!(attempt, 1);
                    epochs.push(epoch)
                }
                Verdict::Bounce(_) | Verdict::Held => panic!("no hold yet"),
            }
        }
        book.ack(tok(10, epochs[0]));
        book.nack(tok(11, epochs[1]), Duration::from_millis(100));
        assert!(book.is_stale(&tok(12, epochs[2])));
        // +ACK for 10, then naks for 11 and 12 in order.
        let mut sent = Vec::new();
        while let Ok(Settle::Reply(_, p)) = rx.try_recv() {
            sent.push(String::from_utf8_lossy(&p).into_owned());
        }
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[0], "+ACK");
        assert!(sent[1].starts_with("-NAK {\"delay\":"));
        let mut parts = book.parts();
        let p = parts.get_mut(&tp).unwrap();
        // A newer message overtaking the nacked one is bounced.
        assert!(matches!(p.arrive(13, 1, "r".into()), Verdict::Bounce(_)));
        assert!(matches!(p.arrive(12, 2, "r".into()), Verdict::Bounce(_)));
        assert!(matches!(
            p.arrive(11, 2, "r".into()),
            Verdict::Deliver { attempt: 2, .. }
        ));
        assert!(matches!(
            p.arrive(12, 3, "r".into()),
            Verdict::Deliver { attempt: 1, .. }
        ));
        assert!(matches!(
            p.arrive(13, 2, "r".into()),
            Verdict::Deliver { .. }
        ));
        assert!(p.rewind.is_none());
    }

    #[test]
    fn a_held_delivery_sent_again_is_not_handed_out_twice() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let book = Book::new(tx);
        let tp: Tp = (Arc::from("t"), 0);
        book.add(tp.clone());
        let epoch = match book.parts().get_mut(&tp).unwrap().arrive(7, 1, "r1".into()) {
            Verdict::Deliver { epoch, .. } => epoch,
            _ => panic!("first delivery is handed out"),
        };
        // ack_wait ran out while it was held: the server sends it again.
        assert!(matches!(
            book.parts().get_mut(&tp).unwrap().arrive(7, 2, "r2".into()),
            Verdict::Held
        ));
        assert_eq!(book.outstanding(&tp), 1);
        // Nothing is older than an hour: no progress ack.
        assert_eq!(book.keep_alive(Duration::from_secs(3600)), 0);
        assert_eq!(book.keep_alive(Duration::ZERO), 1);
        match rx.try_recv() {
            Ok(Settle::Reply(subject, p)) => {
                assert_eq!(subject.as_str(), "r2");
                assert_eq!(p.as_ref(), WIP);
            }
            _ => panic!("a progress ack to the newest reply subject"),
        }
        // Settled once, through the newest reply subject.
        book.ack(tok(7, epoch));
        match rx.try_recv() {
            Ok(Settle::Reply(subject, p)) => {
                assert_eq!(subject.as_str(), "r2");
                assert_eq!(p.as_ref(), ACK);
            }
            _ => panic!("an ack"),
        }
        assert_eq!(book.outstanding(&tp), 0);
    }
}
