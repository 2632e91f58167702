//! Publishing: one pipeline per batch, several batches in flight on one connection
//! in order (see [`crate::lane`]), partitions by Courier's murmur2, resends of
//! connection failures up to `retry_max`, `WAIT` for replicas when `acks = -1` and the
//! server has replicas.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_core::{partition_for_key, Acks, Error, Receipt, Record, Result};
use redis::Value;

use crate::admin::{Admin, TopicMeta};
use crate::codec::{self, FIELD_META, FIELD_VALUE, NEXT_ID};
use crate::lane::Lane;
use crate::{redis_error, resp, BACKEND};

/// How long a topic's partition count and retention are trusted before they are read
/// again (so partitions added elsewhere are noticed).
const META_TTL: Duration = Duration::from_secs(30);
/// How long `WAIT` waits for replicas (acks = -1).
const WAIT_REPLICAS: Duration = Duration::from_secs(5);
/// Most commands in one pipeline: a batch larger than this goes as several pipelines
/// in a row, so Redis works on the first while the rest is encoded (the bare-client
/// benchmark's batch size).
const CHUNK: usize = 1000;
/// Least time between two time-based trims of one partition.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Trims a partition stream to the entries whose stored timestamp (bytes 2–9 of the
/// `m` field, big-endian ms) is at least ARGV[1]: binary search over the dense
/// sequence numbers, then `XTRIM MINID`. Timestamps are assumed to grow with offsets
/// (they do for messages stamped on send).
const TRIM_BY_TIME: &str = r"
local function seq(id) return tonumber(string.match(id, '^0%-(%d+)$')) end
local function ts(entry)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'm' then
      local m, t = f[i + 1], 0
      for j = 2, 9 do t = t * 256 + string.byte(m, j) end
      return t
    end
  end
  return nil
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #first == 0 or #last == 0 then return 0 end
local lo, hi = seq(first[1][1]), seq(last[1][1]) + 1
if lo == nil or hi == nil then return 0 end
local cutoff = tonumber(ARGV[1])
while lo < hi do
  local mid = math.floor((lo + hi) / 2)
  local e = redis.call('XRANGE', KEYS[1], '0-' .. mid, '+', 'COUNT', 1)
  if #e == 0 then
    hi = mid
  else
    local t = ts(e[1])
    if t == nil or t >= cutoff then hi = mid else lo = seq(e[1][1]) + 1 end
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '0-' .. lo)
";

struct Cached {
    meta: TopicMeta,
    /// The partition stream keys, built once rather than per message.
    streams: Arc<[String]>,
    fetched: Instant,
    /// Keyless records stick to one partition per publish call, rotating between calls.
    sticky: Arc<AtomicU32>,
}

/// A topic's settings as one publish call uses them.
struct Chosen {
    meta: TopicMeta,
    streams: Arc<[String]>,
    sticky: Arc<AtomicU32>,
    /// This call's partition for keyless records.
    start: u32,
}

impl Chosen {
    fn of(c: &Cached) -> Self {
        Self {
            meta: c.meta.clone(),
            streams: c.streams.clone(),
            sticky: c.sticky.clone(),
            start: 0,
        }
    }
}

/// The producing half of the driver.
pub(crate) struct Publisher {
    lane: Lane,
    admin: Arc<Admin>,
    topics: Mutex<HashMap<String, Cached>>,
    /// When each partition was last trimmed by time.
    trimmed: Mutex<HashMap<(String, u32), Instant>>,
    acks: Acks,
    default_partitions: u32,
    /// Replicas to `WAIT` for (acks = -1), found at connect.
    replicas: usize,
}

impl Publisher {
    pub(crate) fn new(
        lane: Lane,
        admin: Arc<Admin>,
        config: &courier_core::Config,
        replicas: usize,
    ) -> Self {
        Self {
            lane,
            admin,
            topics: Mutex::new(HashMap::new()),
            trimmed: Mutex::new(HashMap::new()),
            acks: config.producer.acks,
            default_partitions: config.default_partitions.max(1),
            replicas,
        }
    }

    /// Forgets a topic's cached settings (after delete / add partitions / config).
    pub(crate) fn forget(&self, topic: &str) {
        if let Ok(mut t) = self.topics.lock() {
            t.remove(topic);
        }
    }

    fn cached(&self, topic: &str) -> Option<Chosen> {
        let t = self.topics.lock().ok()?;
        let c = t.get(topic)?;
        (c.fetched.elapsed() < META_TTL).then(|| Chosen::of(c))
    }

    /// The topic's settings; a topic not yet known is created with the default
    /// partition count (as on every Courier backend).
    async fn topic(&self, topic: &str) -> Result<Chosen> {
        if let Some(c) = self.cached(topic) {
            return Ok(c);
        }
        let meta = self
            .admin
            .meta_or_create(topic, self.default_partitions)
            .await?;
        let keys = self.admin.keys();
        let cached = Cached {
            streams: (0..meta.partitions.max(1))
                .map(|p| keys.stream(topic, p))
                .collect(),
            meta,
            fetched: Instant::now(),
            sticky: Arc::new(AtomicU32::new(rand_start())),
        };
        let chosen = Chosen::of(&cached);
        if let Ok(mut t) = self.topics.lock() {
            t.insert(topic.to_string(), cached);
        }
        Ok(chosen)
    }

    /// Publishes `batch` as pipelines of up to [`CHUNK`] commands; receipts in input
    /// order. Calls started one after another are written to Redis in that order,
    /// whatever their awaits do.
    pub(crate) async fn publish(&self, batch: Vec<Record>) -> Result<Vec<Receipt>> {
        let total = batch.len();
        // Before any await: this fixes the batch's place among concurrent calls.
        let mut tickets = self.lane.tickets(total.div_ceil(CHUNK));
        if total == 0 {
            return Ok(Vec::new());
        }
        let fail = |e: Error| Error::BatchSendFailed {
            failed: total,
            total,
            source: Box::new(e),
        };
        let mut chosen: HashMap<&str, Chosen> = HashMap::new();
        for r in &batch {
            if !chosen.contains_key(r.topic.as_str()) {
                let mut c = self.topic(&r.topic).await.map_err(fail)?;
                c.start = c.sticky.fetch_add(1, Ordering::Relaxed) % c.meta.partitions.max(1);
                chosen.insert(r.topic.as_str(), c);
            }
        }
        // Every partition is checked before the first pipeline goes: a bad one fails
        // the call with nothing stored.
        let mut partitions = Vec::with_capacity(total);
        let mut last: Option<(&str, &Chosen)> = None;
        for r in &batch {
            let c = match last {
                Some((t, c)) if t == r.topic => c,
                _ => {
                    let c = &chosen[r.topic.as_str()];
                    last = Some((r.topic.as_str(), c));
                    c
                }
            };
            let n = c.meta.partitions.max(1);
            partitions.push(match (r.partition, &r.key) {
                (Some(p), _) => {
                    if p >= n {
                        return Err(fail(Error::InvalidArgument(format!(
                            "partition {p} of topic {:?} does not exist ({n} partitions)",
                            r.topic
                        ))));
                    }
                    p
                }
                (None, Some(k)) => partition_for_key(k, n),
                (None, None) => c.start,
            });
        }
        let wait = self.acks == Acks::All && self.replicas > 0;
        let mut meta_buf = Vec::with_capacity(64);
        let mut pending = Vec::with_capacity(tickets.len());
        let mut trims = 0;
        let mut start = 0;
        while start < total {
            let end = (start + CHUNK).min(total);
            let mut pipe = redis::Pipeline::with_capacity(end - start + 1);
            pipe.ignore_errors();
            for (r, &partition) in batch[start..end].iter().zip(&partitions[start..end]) {
                let c = match last {
                    Some((t, c)) if t == r.topic => c,
                    _ => {
                        let c = &chosen[r.topic.as_str()];
                        last = Some((r.topic.as_str(), c));
                        c
                    }
                };
                meta_buf.clear();
                codec::encode_meta_into(&mut meta_buf, r);
                let stream = &c.streams[partition as usize];
                // Sized up front: growing the argument buffer step by step was a good
                // part of the client's time per message.
                let mut cmd = redis::Cmd::with_capacity(
                    10,
                    32 + stream.len() + meta_buf.len() + r.value.len(),
                );
                cmd.arg("XADD").arg(stream.as_str());
                if let Some(max) = c.meta.max_len {
                    cmd.arg("MAXLEN").arg("~").arg(max);
                }
                cmd.arg(NEXT_ID)
                    .arg(FIELD_META)
                    .arg(meta_buf.as_slice())
                    .arg(FIELD_VALUE)
                    .arg(r.value.as_ref());
                pipe.add_command(cmd);
            }
            if end == total {
                trims = self.push_trims(&mut pipe, &batch, &partitions, &chosen);
                if wait {
                    pipe.cmd("WAIT")
                        .arg(self.replicas)
                        .arg(WAIT_REPLICAS.as_millis() as u64);
                }
            }
            // Sent now, while the next chunk is built: the server starts on this one.
            let ticket = tickets.pop_front().ok_or_else(|| {
                fail(Error::backend(BACKEND, "fewer publish tickets than chunks"))
            })?;
            pending.push(ticket.send(pipe));
            start = end;
        }
        let mut replies = Vec::with_capacity(total + trims + usize::from(wait));
        for rx in pending {
            let part = rx
                .await
                .map_err(|_| Error::connection(BACKEND, "the publishing task stopped"))
                .and_then(|r| r.map_err(redis_error))
                .map_err(fail)?;
            replies.extend(part);
        }
        if wait {
            let acked = replies.last().and_then(resp::int).unwrap_or(0);
            if (acked as usize) < self.replicas {
                tracing::warn!(
                    acked,
                    wanted = self.replicas,
                    "not every replica confirmed the batch in time"
                );
            }
        }
        if trims > 0 {
            for reply in &replies[total..total + trims] {
                if let Value::ServerError(e) = reply {
                    tracing::warn!(error = ?e, "retention trim failed");
                }
            }
        }
        let mut receipts = Vec::with_capacity(total);
        let mut failed = 0;
        let mut first_error = None;
        for ((r, partition), reply) in batch.into_iter().zip(partitions).zip(replies) {
            match resp::check(reply).and_then(|v| {
                resp::bytes(&v)
                    .and_then(codec::offset_of)
                    .ok_or_else(|| Error::backend(BACKEND, format!("unexpected XADD reply {v:?}")))
            }) {
                Ok(offset) => receipts.push(Receipt {
                    topic: r.topic,
                    partition,
                    offset,
                    id: r.id,
                    timestamp: r.timestamp,
                }),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(Error::SendFailed {
                        topic: r.topic,
                        source: Box::new(e),
                    });
                }
            }
        }
        match first_error {
            None => Ok(receipts),
            Some(e) => Err(Error::BatchSendFailed {
                failed,
                total,
                source: Box::new(e),
            }),
        }
    }

    /// Adds a time-based trim of every touched partition of a topic with `retentionMs`
    /// whose last trim is older than [`TRIM_EVERY`]; returns how many were added.
    fn push_trims(
        &self,
        pipe: &mut redis::Pipeline,
        batch: &[Record],
        partitions: &[u32],
        chosen: &HashMap<&str, Chosen>,
    ) -> usize {
        if chosen.values().all(|c| c.meta.retention_ms.is_none()) {
            return 0;
        }
        let Ok(mut trimmed) = self.trimmed.lock() else {
            return 0;
        };
        let now = Instant::now();
        let mut added = 0;
        for (r, p) in batch.iter().zip(partitions) {
            let Some(ms) = chosen[r.topic.as_str()].meta.retention_ms else {
                continue;
            };
            let due = trimmed
                .get(&(r.topic.clone(), *p))
                .is_none_or(|t| now.duration_since(*t) >= TRIM_EVERY);
            if !due {
                continue;
            }
            trimmed.insert((r.topic.clone(), *p), now);
            pipe.cmd("EVAL")
                .arg(TRIM_BY_TIME)
                .arg(1)
                .arg(self.admin.keys().stream(&r.topic, *p))
                .arg(courier_core::now_millis().saturating_sub(ms));
            added += 1;
        }
        added
    }
}

/// A start for keyless rotation that differs between processes.
fn rand_start() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}
