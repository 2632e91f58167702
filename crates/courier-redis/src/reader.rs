//! The reader of one member: one `XREADGROUP` over every owned partition per round
//! trip, with the `XACK`s of everything acknowledged since the last one in the same
//! pipeline. It runs on its own connection because `BLOCK` holds a connection.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use courier_core::{AckHandle, AckToken, Acker, Delivery, Record};
use redis::aio::ConnectionManager;
use redis::Value;

use crate::codec::{self, FIELD_META, FIELD_VALUE};
use crate::resp;
use crate::state::{Event, Mode, Shared, Tp};

/// How long one read blocks when nothing is there; bounds how late acks, nack
/// rewinds and revocations are noticed.
pub(crate) const BLOCK: Duration = Duration::from_millis(100);
/// Most entries asked for per partition per read (the bare-client benchmark's size).
const COUNT: usize = 1000;

pub(crate) struct Reader {
    pub shared: Arc<Shared>,
    pub conn: ConnectionManager,
    pub group: String,
    pub member: String,
    pub prefetch: usize,
}

/// Acknowledged offsets to send, per stream key.
type Acks = Vec<(String, Vec<u64>)>;

/// One partition's part of a read request.
struct Ask {
    tp: Tp,
    key: String,
    id: String,
    epoch: u64,
    history: bool,
}

impl Reader {
    pub(crate) async fn run(mut self) {
        let mut failures = 0u32;
        let mut starved_since: Option<Instant> = None;
        let resume_at = self.prefetch - self.prefetch / 2;
        self.shared
            .flow
            .resume_at
            .store(resume_at, Ordering::Relaxed);
        while !self.shared.is_closed() {
            // With more than half the prefetch still out, wait (up to BLOCK) for more
            // to settle before reading: reading after every settle made one small read
            // (and a few-id XACK) per settle instead of reads of up to COUNT per
            // partition. Settles wake the reader only when they reach `resume_at`.
            let outstanding = self.shared.flow.outstanding.load(Ordering::Acquire);
            if outstanding > resume_at {
                let since = *starved_since.get_or_insert_with(Instant::now);
                let left = BLOCK.saturating_sub(since.elapsed());
                if !left.is_zero() {
                    let wake = self.shared.flow.wake_reader.notified();
                    tokio::select! {
                        _ = wake => {}
                        _ = tokio::time::sleep(left) => {}
                    }
                    continue;
                }
            }
            starved_since = None;
            let shared = self.shared.clone();
            let wake = shared.flow.wake_reader.notified();
            let (acks, asks, next_due) = self.plan();
            let budget = self
                .prefetch
                .saturating_sub(self.shared.flow.outstanding.load(Ordering::Acquire));
            if asks.is_empty() || budget == 0 {
                if !acks.is_empty() {
                    if let Err(e) = self.send_acks(&acks).await {
                        tracing::warn!(error = %e, "XACK failed; will retry");
                        self.requeue(acks);
                    }
                }
                self.unmark(&asks);
                let wait = next_due
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or(BLOCK)
                    .min(BLOCK);
                tokio::select! {
                    _ = wake => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let per_stream = (budget / asks.len()).clamp(1, COUNT);
            let block = !asks.iter().any(|a| a.history);
            match self.read(&acks, &asks, per_stream, block).await {
                Ok(reply) => {
                    failures = 0;
                    let batch = self.accept(&asks, reply, per_stream);
                    if !batch.is_empty()
                        && self.shared.events.send(Event::Batch(batch)).await.is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    self.unmark(&asks);
                    self.reread_after_failure(&asks);
                    self.requeue(acks);
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_millis(50 * u64::from(failures.min(40)));
                    tracing::warn!(error = %e, ?wait, "redis read failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        // Whatever was acknowledged last goes out before the subscription closes.
        let acks = self.take_acks();
        if !acks.is_empty() {
            if let Err(e) = self.send_acks(&acks).await {
                tracing::warn!(error = %e, "final XACK failed; those messages will be redelivered");
            }
        }
    }

    /// Takes the pending acks and builds the read request (marking partitions as in a
    /// read). Returns the earliest time a paused partition becomes due.
    fn plan(&self) -> (Acks, Vec<Ask>, Option<Instant>) {
        let now = Instant::now();
        let mut parts = self.shared.parts();
        let mut acks = Vec::new();
        let mut asks = Vec::new();
        let mut next_due: Option<Instant> = None;
        for (tp, p) in parts.iter_mut() {
            let acked = std::mem::take(&mut p.book().acked);
            if !acked.is_empty() {
                acks.push((p.key.clone(), acked));
            }
            if p.revoking.is_some() {
                continue;
            }
            if let Some(due) = p.paused_until {
                if due > now {
                    next_due = Some(next_due.map_or(due, |n| n.min(due)));
                    continue;
                }
                p.paused_until = None;
            }
            let (id, history) = match p.mode {
                Mode::History { from } => (codec::id_before(from), true),
                Mode::New => (">".to_string(), false),
            };
            p.in_read = true;
            asks.push(Ask {
                tp: tp.clone(),
                key: p.key.clone(),
                id,
                epoch: p.epoch,
                history,
            });
        }
        (acks, asks, next_due)
    }

    fn take_acks(&self) -> Acks {
        self.shared
            .parts()
            .values()
            .map(|p| (p.key.clone(), std::mem::take(&mut p.book().acked)))
            .filter(|(_, acked)| !acked.is_empty())
            .collect()
    }

    fn unmark(&self, asks: &[Ask]) {
        if asks.is_empty() {
            return;
        }
        let mut parts = self.shared.parts();
        for a in asks {
            if let Some(p) = parts.get_mut(&a.tp) {
                p.in_read = false;
            }
        }
        drop(parts);
        self.shared.flow.wake_coordinator.notify_one();
    }

    /// A read whose reply was lost may still have moved entries into this member's
    /// PEL; reading the PEL from the next expected offset delivers them.
    fn reread_after_failure(&self, asks: &[Ask]) {
        let mut parts = self.shared.parts();
        for a in asks {
            if let Some(p) = parts.get_mut(&a.tp) {
                if p.epoch == a.epoch && p.mode == Mode::New {
                    p.mode = Mode::History { from: p.next };
                }
            }
        }
    }

    /// Puts acks back after a failed send (XACK is idempotent, so resending is safe).
    fn requeue(&self, acks: Acks) {
        if acks.is_empty() {
            return;
        }
        let mut parts = self.shared.parts();
        for (key, offsets) in acks {
            if let Some(p) = parts.values_mut().find(|p| p.key == key) {
                p.book().acked.extend(offsets);
            }
        }
    }

    fn push_acks(&self, pipe: &mut redis::Pipeline, acks: &Acks) {
        for (key, offsets) in acks {
            push_xack(pipe, key, &self.group, offsets);
        }
    }

    async fn send_acks(&mut self, acks: &Acks) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        self.push_acks(&mut pipe, acks);
        pipe.query_async::<()>(&mut self.conn).await
    }

    async fn read(
        &mut self,
        acks: &Acks,
        asks: &[Ask],
        count: usize,
        block: bool,
    ) -> redis::RedisResult<Value> {
        let mut pipe = redis::pipe();
        self.push_acks(&mut pipe, acks);
        let cmd = pipe
            .cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.member)
            .arg("COUNT")
            .arg(count);
        if block {
            cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
        }
        cmd.arg("STREAMS");
        for a in asks {
            cmd.arg(&a.key);
        }
        for a in asks {
            cmd.arg(&a.id);
        }
        let mut replies: Vec<Value> = pipe.query_async(&mut self.conn).await?;
        Ok(replies.pop().unwrap_or(Value::Nil))
    }

    /// Turns a reply into deliveries, dropping what a nack or a revocation overtook
    /// while the read was on the wire (those entries stay pending and are read again).
    fn accept(&self, asks: &[Ask], reply: Value, count: usize) -> Vec<Delivery> {
        let mut by_key: HashMap<Vec<u8>, Vec<Value>> = HashMap::new();
        for (key, entries) in streams(reply) {
            by_key.insert(key, entries);
        }
        let mut out = Vec::with_capacity(by_key.values().map(Vec::len).sum());
        let mut parts = self.shared.parts();
        for a in asks {
            let entries = by_key.remove(a.key.as_bytes()).unwrap_or_default();
            let Some(p) = parts.get_mut(&a.tp) else {
                continue;
            };
            p.in_read = false;
            if p.epoch != a.epoch || p.revoking.is_some() {
                continue;
            }
            let got = entries.len();
            let packed = Packed::of(&entries);
            drop(entries);
            let epoch = p.epoch;
            let part_acker = p.acker.clone();
            let acker: Arc<dyn Acker> = part_acker.clone();
            let mut book = part_acker.book();
            for (offset, fields) in packed.items {
                p.next = p.next.max(offset + 1);
                if let Mode::History { from } = &mut p.mode {
                    *from = offset + 1;
                }
                let Some((meta, value)) = fields else {
                    // Pending but trimmed away by retention: nothing to deliver.
                    book.acked.push(offset);
                    continue;
                };
                let slice = |r: Option<Range<usize>>| r.map(|r| packed.buf.slice(r));
                let d = slice(meta).and_then(|meta| {
                    let value = slice(value).unwrap_or_default();
                    let attempt = book.attempts.get(&offset).copied().unwrap_or(1);
                    delivery(&a.tp, offset, meta, value, epoch, attempt, &acker)
                });
                let Some(d) = d else {
                    tracing::warn!(stream = %a.key, offset, "skipping an entry Courier did not write");
                    book.acked.push(offset);
                    continue;
                };
                book.outstanding.insert(offset, epoch);
                out.push(d);
            }
            drop(book);
            if a.history && got < count {
                p.mode = Mode::New;
            }
        }
        drop(parts);
        self.shared
            .flow
            .outstanding
            .fetch_add(out.len(), Ordering::AcqRel);
        self.shared.flow.wake_coordinator.notify_one();
        out
    }
}

/// Adds one `XACK` of `offsets` on stream `key` to `pipe`, its reply ignored.
pub(crate) fn push_xack(pipe: &mut redis::Pipeline, key: &str, group: &str, offsets: &[u64]) {
    let cmd = pipe.cmd("XACK").arg(key).arg(group);
    let mut id = codec::IdBuf::default();
    for o in offsets {
        cmd.arg(codec::write_id(&mut id, *o));
    }
    cmd.ignore();
}

/// `(stream key, entries)` of an `XREADGROUP` reply (RESP2 array or RESP3 map).
fn streams(reply: Value) -> Vec<(Vec<u8>, Vec<Value>)> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Map(m) => m,
        Value::Array(a) => a
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    let key = kv.pop()?;
                    Some((key, entries))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, e)| {
            let key = match k {
                Value::BulkString(b) => b,
                Value::SimpleString(s) => s.into_bytes(),
                _ => return None,
            };
            let entries = match e {
                Value::Array(a) => a,
                _ => Vec::new(),
            };
            Some((key, entries))
        })
        .collect()
}

/// The fields of one entry that Courier reads: `None` for a pending entry whose data
/// was deleted.
pub(crate) type Fields<'a> = Option<(Option<&'a [u8]>, Option<&'a [u8]>)>;

/// `(offset, (m, v))` of one entry, borrowed from the reply.
pub(crate) fn entry_view(entry: &Value) -> Option<(u64, Fields<'_>)> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let [id, fields] = parts.as_slice() else {
        return None;
    };
    let offset = codec::offset_of(resp::bytes(id)?)?;
    // Walked in place: `resp::pairs` would allocate a vector per entry.
    let fields = match fields {
        Value::Array(a) => meta_and_value(a.chunks_exact(2).map(|c| (&c[0], &c[1]))),
        Value::Map(m) => meta_and_value(m.iter().map(|(k, v)| (k, v))),
        _ => return Some((offset, None)),
    };
    Some((offset, Some(fields)))
}

fn meta_and_value<'a>(
    pairs: impl Iterator<Item = (&'a Value, &'a Value)>,
) -> (Option<&'a [u8]>, Option<&'a [u8]>) {
    let mut meta = None;
    let mut value = None;
    for (k, v) in pairs {
        match resp::bytes(k) {
            Some(b) if b == FIELD_META.as_bytes() => meta = resp::bytes(v),
            Some(b) if b == FIELD_VALUE.as_bytes() => value = resp::bytes(v),
            _ => {}
        }
    }
    (meta, value)
}

/// The record of one entry's fields (`None` when they are not in Courier's format).
pub(crate) fn record_of(
    topic: &str,
    partition: u32,
    (meta, value): (Option<&[u8]>, Option<&[u8]>),
) -> Option<Record> {
    let meta = codec::decode_meta(&Bytes::copy_from_slice(meta?)).ok()?;
    Some(Record {
        topic: topic.to_string(),
        partition: Some(partition),
        id: meta.id.to_string(),
        key: meta.key,
        value: value.map(Bytes::copy_from_slice).unwrap_or_default(),
        headers: meta.headers,
        timestamp: meta.timestamp,
    })
}

/// One partition's entries of a reply with their `m` and `v` fields copied into one
/// buffer. The deliveries then share that buffer (one allocation, freed once, on
/// whichever thread drops the last of them) instead of each keeping the reply's own
/// buffers alive, which the handlers' threads freed one by one (profiled: cross-thread
/// `free` was the largest single cost of consuming).
struct Packed {
    buf: Bytes,
    /// `(offset, (m range, v range))`; `None` for entries whose data was deleted.
    items: Vec<(u64, Option<FieldRanges>)>,
}

/// Where an entry's `m` and `v` are in [`Packed::buf`].
type FieldRanges = (Option<Range<usize>>, Option<Range<usize>>);

impl Packed {
    fn of(entries: &[Value]) -> Self {
        let views: Vec<_> = entries.iter().filter_map(entry_view).collect();
        let size = views
            .iter()
            .filter_map(|(_, f)| *f)
            .map(|(m, v)| m.map_or(0, <[u8]>::len) + v.map_or(0, <[u8]>::len))
            .sum();
        let mut buf = BytesMut::with_capacity(size);
        let mut copy = |b: Option<&[u8]>| {
            b.map(|b| {
                let start = buf.len();
                buf.extend_from_slice(b);
                start..buf.len()
            })
        };
        let items = views
            .into_iter()
            .map(|(offset, f)| (offset, f.map(|(m, v)| (copy(m), copy(v)))))
            .collect();
        Self {
            buf: buf.freeze(),
            items,
        }
    }
}

fn delivery(
    tp: &Tp,
    offset: u64,
    meta: Bytes,
    value: Bytes,
    epoch: u64,
    attempt: u32,
    acker: &Arc<dyn Acker>,
) -> Option<Delivery> {
    let meta = codec::decode_meta(&meta).ok()?;
    let token = AckToken {
        topic: tp.0.clone(),
        partition: tp.1,
        offset,
        epoch,
        extra: None,
    };
    Some(Delivery::new(
        tp.0.clone(),
        tp.1,
        offset,
        meta.key,
        value,
        meta.headers,
        meta.id,
        meta.timestamp,
        attempt,
        Some(AckHandle::new(acker.clone(), token)),
    ))
}
