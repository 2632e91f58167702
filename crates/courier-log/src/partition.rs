//! A topic-partition: an ordered list of segments, one writer, many readers.

use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{oneshot, watch};

use crate::codec::{self, DecodeError, PendingBatch, Record};
use crate::config::{FsyncPolicy, TopicConfig};
use crate::error::{IoContext, LogError, Result};
use crate::segment::{read_lock, write_lock, Segment};
use crate::writer::{AppendRequest, WriterHandle};

/// A record as stored: its offset plus the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Offset in the partition (dense, starting at 0).
    pub offset: u64,
    /// The record, exactly as appended.
    pub record: Record,
}

/// Outcome of a successful append: the records got offsets
/// `base_offset .. base_offset + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// Offset of the first appended record.
    pub base_offset: u64,
    /// Number of records appended.
    pub count: u32,
    /// Largest timestamp among the appended records.
    pub timestamp: i64,
}

/// Outcome of a read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadResult {
    /// Records in offset order, with no duplicates. Offsets can skip only over
    /// data that was lost to damage.
    pub records: Vec<StoredRecord>,
    /// Offset to read next.
    pub next_offset: u64,
    /// `Some(requested)` when the requested offset was below the start offset
    /// (deleted by retention) and reading began at the earliest available one.
    pub reset_from: Option<u64>,
}

/// Writer-side state; only the writer thread (and close) lock it.
pub(crate) struct WriterState {
    pub active: Arc<Segment>,
    /// Bytes written to `active`, possibly not yet visible.
    pub written: u64,
    pub next_offset: u64,
    pub last_index_pos: u64,
    /// Largest timestamp written to `active` so far.
    pub ts_max: i64,
    pub last_time_ts: i64,
}

pub(crate) struct PartitionInner {
    pub topic: String,
    pub id: u32,
    pub dir: PathBuf,
    pub config: Arc<RwLock<TopicConfig>>,
    pub index_interval: u32,
    pub segments: RwLock<Vec<Arc<Segment>>>,
    pub writer: Mutex<WriterState>,
    /// End offset visible to readers; bumped after data is written (and, under
    /// `Always`, synced) so consumers never see data that could be lost.
    pub end: watch::Sender<u64>,
    pub start: std::sync::atomic::AtomicU64,
    pub dirty: AtomicBool,
    pub last_sync_ms: AtomicI64,
    pub deleted: AtomicBool,
}

impl PartitionInner {
    pub fn config(&self) -> TopicConfig {
        read_lock(&self.config).clone()
    }

    pub fn lock_writer(&self) -> std::sync::MutexGuard<'_, WriterState> {
        // The writer state is only mutated by the writer thread, field by field
        // after each successful I/O; a panic there leaves the last consistent values.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open (recovering) or create the partition directory.
    pub fn open(
        topic: &str,
        id: u32,
        dir: PathBuf,
        config: Arc<RwLock<TopicConfig>>,
        index_interval: u32,
    ) -> Result<PartitionInner> {
        std::fs::create_dir_all(&dir).ctx(&dir)?;
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(&dir).ctx(&dir)? {
            let entry = entry.ctx(&dir)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(stem) = name.strip_suffix(".log") {
                if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
                    if let Ok(b) = stem.parse::<u64>() {
                        bases.push(b);
                    }
                }
            }
        }
        bases.sort_unstable();
        let mut segments = Vec::with_capacity(bases.len().max(1));
        for (i, &b) in bases.iter().enumerate() {
            let tail = i + 1 == bases.len();
            segments.push(Segment::open(&dir, b, tail, index_interval)?);
        }
        if segments.is_empty() {
            segments.push(Segment::create(&dir, 0)?);
            sync_dir(&dir)?;
        }
        let active = segments[segments.len() - 1].clone();
        active.preallocate(read_lock(&config).segment_bytes);
        let start = segments[0].base;
        let next_offset = active.next_offset.load(Ordering::Acquire);
        let written = active.len.load(Ordering::Acquire);
        let (last_index_pos, last_time_ts) = {
            let idx = read_lock(&active.index);
            let t = read_lock(&active.time_index);
            (
                idx.last().map_or(0, |e| u64::from(e.pos)),
                t.last().map_or(i64::MIN, |e| e.ts),
            )
        };
        let ts_max = active.max_ts.load(Ordering::Acquire);
        tracing::debug!(
            topic,
            partition = id,
            start,
            end = next_offset,
            segments = segments.len(),
            "opened partition"
        );
        Ok(PartitionInner {
            topic: topic.to_string(),
            id,
            dir,
            config,
            index_interval,
            segments: RwLock::new(segments),
            writer: Mutex::new(WriterState {
                active,
                written,
                next_offset,
                last_index_pos,
                ts_max,
                last_time_ts,
            }),
            end: watch::channel(next_offset).0,
            start: std::sync::atomic::AtomicU64::new(start),
            dirty: AtomicBool::new(false),
            last_sync_ms: AtomicI64::new(codec::now_ms()),
            deleted: AtomicBool::new(false),
        })
    }

    pub fn end_offset(&self) -> u64 {
        *self.end.borrow()
    }

    pub fn start_offset(&self) -> u64 {
        self.start.load(Ordering::Acquire)
    }

    /// Segments that may hold `offset` or later data.
    fn segments_from(&self, offset: u64) -> Vec<Arc<Segment>> {
        let segs = read_lock(&self.segments);
        let i = segs.partition_point(|s| s.base <= offset).saturating_sub(1);
        segs[i..].to_vec()
    }

    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Result<ReadResult> {
        let end = self.end_offset();
        let start = self.start_offset();
        if from > end {
            return Err(LogError::OffsetOutOfRange {
                requested: from,
                end,
            });
        }
        let (from, reset_from) = if from < start {
            (start, Some(from))
        } else {
            (from, None)
        };
        let mut out = ReadResult {
            records: Vec::new(),
            next_offset: from,
            reset_from,
        };
        if from >= end || max_records == 0 {
            return Ok(out);
        }
        let segs = self.segments_from(from);
        let mut bytes = 0usize;
        for (si, seg) in segs.iter().enumerate() {
            if out.next_offset >= end || out.records.len() >= max_records {
                break;
            }
            if seg.base > out.next_offset {
                // Data between segments was lost to damage; skip the hole.
                out.next_offset = seg.base;
            }
            let resume_at = segs.get(si + 1).map(|s| s.base);
            let full = read_segment(seg, &mut out, end, max_records, max_bytes, &mut bytes)
                .map_err(|(offset, reason)| LogError::Corrupt {
                    path: seg.log_path.clone(),
                    offset,
                    reason,
                    resume_at,
                });
            match full {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) if out.records.is_empty() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "stopping read at damaged batch");
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<u64>> {
        let end = self.end_offset();
        let segs: Vec<Arc<Segment>> = read_lock(&self.segments).clone();
        for seg in segs {
            if seg.max_ts.load(Ordering::Acquire) < ts {
                continue;
            }
            let limit = seg.len.load(Ordering::Acquire);
            let mut pos = seg.lookup_time(ts);
            while pos < limit {
                let hdr = seg
                    .read_at(pos, codec::BATCH_HEADER_LEN.min((limit - pos) as usize))
                    .ctx(&seg.log_path)?;
                let h = codec::parse_header(&hdr).map_err(|e| corrupt(&seg, e))?;
                if h.base_offset >= end {
                    break;
                }
                if h.max_ts >= ts {
                    let batch = seg.read_at(pos, h.total_len).ctx(&seg.log_path)?;
                    let mut found = None;
                    codec::decode_batch_with(&batch, 0, 0, |off, r| {
                        if r.timestamp >= ts {
                            found = Some(off);
                            return false;
                        }
                        true
                    })
                    .map_err(|e| corrupt(&seg, e))?;
                    if let Some(o) = found.filter(|&o| o < end) {
                        return Ok(Some(o));
                    }
                }
                pos += h.total_len as u64;
            }
        }
        Ok(None)
    }

    pub fn size_bytes(&self) -> u64 {
        read_lock(&self.segments)
            .iter()
            .map(|s| s.len.load(Ordering::Acquire))
            .sum()
    }

    /// Delete sealed segments violating retention; returns how many were deleted.
    pub fn enforce_retention(&self, now_ms: i64) -> usize {
        let cfg = self.config();
        let mut victims = Vec::new();
        {
            let mut segs = write_lock(&self.segments);
            let mut total: u64 = segs.iter().map(|s| s.len.load(Ordering::Acquire)).sum();
            // Never delete the active (last) segment: the writer appends to it.
            while segs.len() > 1 {
                let s = &segs[0];
                let size = s.len.load(Ordering::Acquire);
                let max_ts = s.max_ts.load(Ordering::Acquire);
                let by_age = cfg
                    .retention_ms
                    .is_some_and(|ms| max_ts < now_ms.saturating_sub(ms as i64));
                let by_size = cfg
                    .retention_bytes
                    .is_some_and(|limit| total.saturating_sub(size) >= limit);
                if !(by_age || by_size) {
                    break;
                }
                total -= size;
                victims.push(segs.remove(0));
            }
            if let Some(first) = segs.first() {
                self.start.store(first.base, Ordering::Release);
            }
        }
        for v in &victims {
            tracing::info!(topic = %self.topic, partition = self.id, base = v.base, "retention: deleting segment");
            // Readers still holding the Arc keep the unlinked file readable.
            v.delete_files(&self.dir);
        }
        victims.len()
    }

    /// Make everything written so far durable and persist the active index.
    pub fn flush(&self, write_index: bool) -> Result<()> {
        let st = self.lock_writer();
        st.active.file.sync_data().ctx(&st.active.log_path)?;
        self.dirty.store(false, Ordering::Release);
        if write_index {
            st.active.write_indexes(&self.dir);
        }
        Ok(())
    }
}

fn corrupt(seg: &Segment, e: DecodeError) -> LogError {
    LogError::Corrupt {
        path: seg.log_path.clone(),
        offset: seg.base,
        reason: e.to_string(),
        resume_at: None,
    }
}

/// Read from one segment into `out`. `Ok(true)` when a limit was reached;
/// `Err((offset, reason))` at damage.
fn read_segment(
    seg: &Segment,
    out: &mut ReadResult,
    end: u64,
    max_records: usize,
    max_bytes: usize,
    bytes: &mut usize,
) -> std::result::Result<bool, (u64, String)> {
    const MIN_CHUNK: usize = 64 * 1024;
    const MAX_CHUNK: usize = 16 << 20;
    let limit = seg.len.load(Ordering::Acquire);
    let mut pos = seg.lookup(out.next_offset);
    let full = |out: &ReadResult, bytes: usize| {
        out.records.len() >= max_records
            || out.next_offset >= end
            || (bytes >= max_bytes && !out.records.is_empty())
    };
    while pos < limit {
        if full(out, *bytes) {
            return Ok(true);
        }
        let want = (max_bytes.saturating_sub(*bytes) + codec::BATCH_HEADER_LEN)
            .clamp(MIN_CHUNK, MAX_CHUNK)
            .min((limit - pos) as usize);
        let err = |reason: String, next: u64| (next, reason);
        let mut buf = seg
            .read_at(pos, want)
            .map_err(|e| err(format!("read failed: {e}"), out.next_offset))?;
        let first = codec::parse_header(&buf).map_err(|e| err(e.to_string(), out.next_offset))?;
        if first.total_len > buf.len() {
            if pos + first.total_len as u64 > limit {
                return Err(err("batch overruns segment".into(), out.next_offset));
            }
            buf = seg
                .read_at(pos, first.total_len)
                .map_err(|e| err(format!("read failed: {e}"), out.next_offset))?;
        }
        let mut at = 0usize;
        let mut stop = false;
        while at < buf.len() && !stop {
            let h = match codec::parse_header(&buf[at..]) {
                Ok(h) if at + h.total_len <= buf.len() => h,
                Ok(_) | Err(DecodeError::Short { .. }) if at > 0 => break,
                Ok(_) => return Err(err("batch overruns segment".into(), out.next_offset)),
                Err(e) => return Err(err(e.to_string(), out.next_offset)),
            };
            if h.next_offset() <= out.next_offset {
                at += h.total_len;
                continue;
            }
            let skip_below = out.next_offset;
            codec::decode_batch_with(&buf, at, skip_below, |off, record| {
                if full(out, *bytes) || off >= end {
                    stop = true;
                    return false;
                }
                *bytes += record.encoded_len();
                out.records.push(StoredRecord {
                    offset: off,
                    record,
                });
                out.next_offset = off + 1;
                true
            })
            .map_err(|e| err(e.to_string(), out.next_offset))?;
            if !stop {
                out.next_offset = out.next_offset.max(h.next_offset());
            }
            at += h.total_len;
        }
        if stop {
            return Ok(true);
        }
        pos += at as u64;
    }
    Ok(full(out, *bytes))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).ctx(dir)
}

/// Handle to one topic-partition. Cheap to clone via `Arc`; all methods take
/// `&self` and may be called concurrently.
pub struct Partition {
    pub(crate) inner: Arc<PartitionInner>,
    pub(crate) writer: WriterHandle,
    /// Keeps the log (lock, writer thread) alive while handles exist.
    pub(crate) _log: Arc<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("topic", &self.inner.topic)
            .field("id", &self.inner.id)
            .finish()
    }
}

impl Partition {
    /// Topic name.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// Partition index.
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// Append records as one batch with consecutive offsets. Appends to one
    /// partition are applied in call order by a single writer; the future
    /// resolves once the batch is written and made as durable as the topic's
    /// [`FsyncPolicy`] promises, and only then becomes visible to readers.
    pub async fn append(&self, records: Vec<Record>) -> Result<AppendResult> {
        if records.is_empty() {
            return Err(LogError::EmptyBatch);
        }
        if self.inner.deleted.load(Ordering::Acquire) {
            return Err(LogError::TopicNotFound(self.inner.topic.clone()));
        }
        let max = read_lock(&self.inner.config).max_message_bytes;
        for r in &records {
            let size = r.encoded_len();
            if size > max {
                return Err(LogError::MessageTooLarge { size, max });
            }
        }
        let batch = PendingBatch::encode(&records);
        if batch.len() > codec::MAX_BATCH_LEN {
            return Err(LogError::MessageTooLarge {
                size: batch.len(),
                max: codec::MAX_BATCH_LEN,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(AppendRequest {
                part: self.inner.clone(),
                batch,
                reply,
            })
            .await?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Read up to `max_records` records / about `max_bytes` bytes (at least one
    /// record if any is available) starting at `from`. Never blocks the writer
    /// and never waits for data: it returns what is visible now (possibly
    /// nothing). Offsets below the start offset read from the start offset and
    /// set [`ReadResult::reset_from`]. Performs synchronous `pread`s (page cache).
    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Result<ReadResult> {
        self.inner.read(from, max_records, max_bytes)
    }

    /// [`Partition::read`] on the blocking thread pool, for cold data.
    pub async fn read_async(
        self: &Arc<Self>,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadResult> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.read(from, max_records, max_bytes))
            .await
            .map_err(|_| LogError::Closed)?
    }

    /// Resolve once `end_offset() > offset` (push notification, no polling);
    /// returns the new end offset. Errors with `TopicNotFound` if the topic is
    /// deleted meanwhile.
    pub async fn wait_for(&self, offset: u64) -> Result<u64> {
        let mut rx = self.inner.end.subscribe();
        let deleted = &self.inner.deleted;
        let r = rx
            .wait_for(|&e| e > offset || deleted.load(Ordering::Acquire))
            .await
            .map(|v| *v);
        match r {
            Ok(_) if deleted.load(Ordering::Acquire) => {
                Err(LogError::TopicNotFound(self.inner.topic.clone()))
            }
            Ok(e) => Ok(e),
            Err(_) => Err(LogError::Closed),
        }
    }

    /// A watch receiver of the end offset, for select loops.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.end.subscribe()
    }

    /// Earliest readable offset (grows as retention deletes segments).
    pub fn start_offset(&self) -> u64 {
        self.inner.start_offset()
    }

    /// Next offset to be written; everything below it (and at or above the
    /// start offset) is readable.
    pub fn end_offset(&self) -> u64 {
        self.inner.end_offset()
    }

    /// Earliest offset whose record timestamp is `>= ts_ms`, using the time
    /// index; `None` if no such record exists.
    pub fn offset_for_timestamp(&self, ts_ms: i64) -> Result<Option<u64>> {
        self.inner.offset_for_timestamp(ts_ms)
    }

    /// Bytes of visible data across all segments.
    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        read_lock(&self.inner.segments).len()
    }

    /// `fdatasync` the active segment now, whatever the policy.
    pub async fn flush(&self) -> Result<()> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.flush(false))
            .await
            .map_err(|_| LogError::Closed)?
    }
}

impl FsyncPolicy {
    pub(crate) fn syncs_on_roll(self) -> bool {
        !matches!(self, FsyncPolicy::Never)
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Partition>();
    f::<Bytes>();
}
