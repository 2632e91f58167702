//! One owned partition: its stream consumer (the runner), its settle state and the
//! [`Acker`] that records handler outcomes.
//!
//! Offsets are stream offsets. Commits are the contiguous handled prefix: the lowest
//! delivered-but-unsettled offset, else the offset after the last delivery. A nack
//! bumps the epoch (deliveries made before are stale), rewinds to the nacked offset
//! and re-attaches the stream consumer there after the delay, so the partition waits
//! for the failed message as on every other backend.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier_core::{AckHandle, AckToken, Acker, Delivery, TopicPartition};
use futures::StreamExt;
use lapin::Connection;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::codec;
use crate::conn::{attach, err, Credit, StreamStart};
use crate::names;

/// Epochs are unique across partitions and members of the process.
static EPOCH: AtomicU64 = AtomicU64::new(1);

fn next_epoch() -> u64 {
    EPOCH.fetch_add(1, Ordering::Relaxed)
}

/// Settle state of a partition.
#[derive(Debug)]
pub struct State {
    /// Current generation.
    pub epoch: u64,
    /// Delivered, not yet settled.
    pub pending: BTreeSet<u64>,
    /// Offset after the last delivery (or the rewind point).
    pub next: Option<u64>,
    /// Last offset written to the offset queue.
    pub committed: Option<u64>,
    /// Redeliveries per offset.
    attempts: HashMap<u64, u32>,
    /// Where and when to re-attach after a nack.
    rewind: Option<(u64, Instant)>,
    /// No more fetching; in-flight deliveries stay valid (hand-over in progress).
    pub draining: bool,
    /// The partition is no longer owned: every delivery is stale.
    pub stopped: bool,
}

impl State {
    /// The offset the group may commit now.
    pub fn commit_point(&self) -> Option<u64> {
        self.pending.first().copied().or(self.next)
    }
}

/// An owned partition.
pub struct Part {
    /// Topic and partition.
    pub tp: TopicPartition,
    topic: Arc<str>,
    /// Settle state.
    pub state: Mutex<State>,
    /// Wakes the runner after a state change.
    pub wake: Notify,
}

impl Part {
    /// A partition whose group position is `committed`.
    pub fn new(tp: TopicPartition, committed: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            topic: Arc::from(tp.topic.as_str()),
            tp,
            state: Mutex::new(State {
                epoch: next_epoch(),
                pending: BTreeSet::new(),
                next: committed,
                committed,
                attempts: HashMap::new(),
                rewind: None,
                draining: false,
                stopped: false,
            }),
            wake: Notify::new(),
        })
    }

    /// Stops fetching but keeps in-flight deliveries valid.
    pub fn drain(&self) {
        self.state.lock().draining = true;
        self.wake.notify_one();
    }

    /// Invalidates everything delivered; the runner ends.
    pub fn stop(&self) {
        {
            let mut s = self.state.lock();
            s.stopped = true;
            s.epoch = next_epoch();
        }
        self.wake.notify_one();
    }

    fn changed(&self, epoch: u64) -> bool {
        let s = self.state.lock();
        s.epoch != epoch || s.stopped || s.draining
    }
}

/// A partition settles its own deliveries: the acker of every delivery it hands out
/// is the part itself, so a token needs nothing beyond its offset and epoch (no
/// allocation per delivery).
impl Acker for Part {
    fn ack(&self, t: AckToken) {
        let mut s = self.state.lock();
        if s.epoch == t.epoch && !s.stopped {
            s.pending.remove(&t.offset);
            s.attempts.remove(&t.offset);
        }
    }

    fn nack(&self, t: AckToken, redeliver_after: Duration) {
        {
            let mut s = self.state.lock();
            if s.epoch != t.epoch || s.stopped {
                return;
            }
            let to = s.pending.first().copied().unwrap_or(t.offset).min(t.offset);
            s.epoch = next_epoch();
            s.pending.clear();
            *s.attempts.entry(t.offset).or_insert(0) += 1;
            s.next = Some(to);
            s.rewind = Some((to, Instant::now() + redeliver_after));
        }
        self.wake.notify_one();
    }

    fn is_stale(&self, t: &AckToken) -> bool {
        let s = self.state.lock();
        s.epoch != t.epoch || s.stopped
    }
}

/// Reads the partition's stream into `tx` until the partition is drained or stopped.
pub async fn run(
    part: Arc<Part>,
    conn: Arc<Connection>,
    tx: mpsc::Sender<Delivery>,
    prefetch: u16,
    initial: StreamStart,
    mut attached: Option<oneshot::Sender<()>>,
) {
    let stream = names::stream(&part.tp.topic, part.tp.partition);
    let acker: Arc<dyn Acker> = part.clone();
    let mut start = match part.state.lock().next {
        Some(o) => StreamStart::Offset(o),
        None => initial,
    };
    loop {
        let epoch = {
            let s = part.state.lock();
            if s.stopped || s.draining {
                return;
            }
            s.epoch
        };
        let ctx = Attach {
            part: &part,
            conn: &conn,
            stream: &stream,
            tx: &tx,
            acker: &acker,
            prefetch,
        };
        if let Err(e) = ctx.run(start, epoch, &mut attached).await {
            tracing::warn!(partition = %part.tp, error = %e, "stream consumer failed; re-attaching");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = part.wake.notified() => {}
            }
        }
        let rewind = {
            let mut s = part.state.lock();
            if s.stopped || s.draining {
                return;
            }
            start = s.next.map(StreamStart::Offset).unwrap_or(start);
            s.rewind.take()
        };
        if let Some((offset, due)) = rewind {
            start = StreamStart::Offset(offset);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => break,
                    _ = part.wake.notified() => {
                        let s = part.state.lock();
                        if s.stopped || s.draining { return; }
                    }
                }
            }
        }
    }
}

struct Attach<'a> {
    part: &'a Arc<Part>,
    conn: &'a Connection,
    stream: &'a str,
    tx: &'a mpsc::Sender<Delivery>,
    acker: &'a Arc<dyn Acker>,
    prefetch: u16,
}

impl Attach<'_> {
    async fn run(
        &self,
        start: StreamStart,
        epoch: u64,
        attached: &mut Option<oneshot::Sender<()>>,
    ) -> courier_core::Result<()> {
        let Attach {
            part,
            conn,
            stream,
            tx,
            acker,
            prefetch,
        } = *self;
        let ch = conn.create_channel().await.map_err(err)?;
        let result = async {
            let mut consumer = attach(&ch, stream, "courier", prefetch, start).await?;
            if let Some(a) = attached.take() {
                let _ = a.send(());
            }
            // The broker starts at the beginning of the chunk holding the offset.
            let min = match start {
                StreamStart::Offset(o) => o,
                _ => 0,
            };
            let mut credit = Credit::new(prefetch);
            // One waiter, registered while the stream is idle and kept across
            // deliveries. The stream is polled first: every delivery checks the epoch
            // under the state lock anyway, so the wake-up only matters when none come.
            let mut wake = std::pin::pin!(part.wake.notified());
            loop {
                let d = tokio::select! {
                    biased;
                    d = consumer.next() => d,
                    _ = wake.as_mut() => {
                        wake.set(part.wake.notified());
                        if part.changed(epoch) { return Ok(()); }
                        continue;
                    }
                };
                let Some(d) = d else {
                    return Err(courier_core::Error::backend(
                        crate::BACKEND,
                        "stream consumer cancelled",
                    ));
                };
                let d = d.map_err(err)?;
                credit.delivered(&d).await?;
                let dec = codec::decode(&d.properties);
                let Some(offset) = dec.offset else { continue };
                if offset < min {
                    continue;
                }
                let attempt = {
                    let mut s = part.state.lock();
                    if s.epoch != epoch || s.stopped || s.draining {
                        return Ok(());
                    }
                    s.pending.insert(offset);
                    s.next = Some(offset + 1);
                    1 + s.attempts.get(&offset).copied().unwrap_or(0)
                };
                let token = AckToken {
                    topic: part.topic.clone(),
                    partition: part.tp.partition,
                    offset,
                    epoch,
                    extra: None,
                };
                let mut delivery = Some(Delivery::new(
                    part.topic.clone(),
                    part.tp.partition,
                    offset,
                    dec.key,
                    Bytes::from(d.data),
                    dec.headers,
                    dec.id,
                    dec.timestamp,
                    attempt,
                    Some(AckHandle::new(acker.clone(), token)),
                ));
                while let Some(dl) = delivery.take() {
                    let permit = tokio::select! {
                        biased;
                        p = tx.reserve() => p,
                        _ = wake.as_mut() => {
                            wake.set(part.wake.notified());
                            if part.changed(epoch) {
                                abandon(part, epoch, dl);
                                return Ok(());
                            }
                            delivery = Some(dl);
                            continue;
                        }
                    };
                    match permit {
                        Ok(p) => p.send(dl),
                        Err(_) => {
                            abandon(part, epoch, dl);
                            return Ok(());
                        }
                    }
                }
            }
        }
        .await;
        let _ = ch.close(200, "done".into()).await;
        result
    }
}

/// Takes back a delivery that was never handed out: not settled, not pending.
fn abandon(part: &Part, epoch: u64, mut d: Delivery) {
    if let Some(h) = d.take_ack() {
        h.discard();
    }
    let mut s = part.state.lock();
    if s.epoch == epoch && s.pending.remove(&d.offset) {
        s.next = Some(s.next.map_or(d.offset, |n| n.min(d.offset)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(p: &Arc<Part>, offset: u64) -> AckToken {
        AckToken {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            epoch: p.state.lock().epoch,
            extra: None,
        }
    }

    fn deliver(p: &Arc<Part>, offset: u64) -> AckToken {
        let t = token(p, offset);
        let mut s = p.state.lock();
        s.pending.insert(offset);
        s.next = Some(offset + 1);
        t
    }

    #[test]
    fn commits_the_contiguous_prefix_and_rewinds_on_nack() {
        let p = Part::new(TopicPartition::new("t", 0), Some(10));
        assert_eq!(p.state.lock().commit_point(), Some(10));
        let (a, b, c) = (deliver(&p, 10), deliver(&p, 11), deliver(&p, 12));
        p.ack(b);
        assert_eq!(
            p.state.lock().commit_point(),
            Some(10),
            "a gap holds the commit"
        );
        p.ack(a);
        assert_eq!(p.state.lock().commit_point(), Some(12));
        let later = deliver(&p, 13);
        p.nack(c, Duration::from_millis(5));
        assert!(p.is_stale(&later), "deliveries after the nack are stale");
        p.ack(later);
        let s = p.state.lock();
        assert_eq!(s.commit_point(), Some(12), "rewound to the nacked offset");
        assert_eq!(s.attempts.get(&12), Some(&1));
        assert!(s.rewind.is_some_and(|(o, _)| o == 12));
    }

    #[test]
    fn a_stopped_partition_makes_everything_stale() {
        let p = Part::new(TopicPartition::new("t", 0), None);
        let t = deliver(&p, 0);
        p.stop();
        assert!(p.is_stale(&t));
    }
}
