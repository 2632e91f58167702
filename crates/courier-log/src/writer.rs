//! The single writer thread of a [`crate::Log`].
//!
//! All appends of all partitions go through one bounded queue. The thread
//! drains whatever is queued, writes each partition's batches with one
//! `writev`, then issues one `fdatasync` per touched `Always` partition and
//! only then publishes the new end offsets and completes the waiters. That is
//! group commit: N concurrent appenders pay for one sync round, not N.

use std::io::{IoSlice, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{self, PendingBatch};
use crate::config::FsyncPolicy;
use crate::error::{IoContext, LogError, Result};
use crate::partition::{sync_dir, AppendResult, PartitionInner, WriterState};
use crate::segment::{write_lock, IndexEntry, Segment, TimeEntry};

pub(crate) struct AppendRequest {
    pub part: Arc<PartitionInner>,
    pub batch: PendingBatch,
    pub reply: oneshot::Sender<Result<AppendResult>>,
}

#[derive(Clone)]
pub(crate) struct WriterHandle {
    tx: mpsc::Sender<AppendRequest>,
}

impl WriterHandle {
    pub async fn send(&self, req: AppendRequest) -> Result<()> {
        self.tx.send(req).await.map_err(|_| LogError::Closed)
    }
}

/// Most requests handled in one drain; bounds latency of the first waiter.
const MAX_DRAIN: usize = 4096;
/// Upper bound on waiting for more appends before a group-commit sync.
const MAX_LINGER: Duration = Duration::from_micros(500);

pub(crate) fn spawn(queue: usize) -> Result<(WriterHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let h = std::thread::Builder::new()
        .name("courier-log-writer".into())
        .spawn(move || run(rx))
        .map_err(|source| LogError::Io {
            path: "courier-log-writer thread".into(),
            source,
        })?;
    Ok((WriterHandle { tx }, h))
}

fn drain(rx: &mut mpsc::Receiver<AppendRequest>, reqs: &mut Vec<AppendRequest>) {
    while reqs.len() < MAX_DRAIN {
        match rx.try_recv() {
            Ok(r) => reqs.push(r),
            Err(_) => break,
        }
    }
}

fn run(mut rx: mpsc::Receiver<AppendRequest>) {
    let mut reqs = Vec::with_capacity(MAX_DRAIN);
    // Size and sync time of the previous round that ended in an fdatasync.
    let mut prev: Option<(usize, Duration)> = None;
    while let Some(first) = rx.blocking_recv() {
        reqs.push(first);
        drain(&mut rx, &mut reqs);
        // Waiters of the last sync round are still waking up and re-sending;
        // starting the next sync now would split them into two half-full
        // rounds forever. Linger briefly (bounded by a fraction of the sync
        // time, so it never costs more than it can save) to re-gather them.
        if let Some((n, sync_time)) = prev {
            let deadline = Instant::now() + (sync_time / 4).min(MAX_LINGER);
            while reqs.len() < n && reqs.len() < MAX_DRAIN && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(20));
                drain(&mut rx, &mut reqs);
            }
        }
        let n = reqs.len();
        prev = process(&mut reqs).map(|t| (n, t));
    }
    tracing::debug!("writer thread exiting");
}

struct Group {
    part: Arc<PartitionInner>,
    reqs: Vec<AppendRequest>,
    results: Vec<AppendResult>,
    error: Option<LogError>,
    sync: Option<Arc<Segment>>,
}

/// Handle one drained round; returns how long its fdatasync took, if it had one.
fn process(reqs: &mut Vec<AppendRequest>) -> Option<Duration> {
    let mut groups: Vec<Group> = Vec::new();
    for r in reqs.drain(..) {
        match groups.iter_mut().find(|g| Arc::ptr_eq(&g.part, &r.part)) {
            Some(g) => g.reqs.push(r),
            None => groups.push(Group {
                part: r.part.clone(),
                reqs: vec![r],
                results: Vec::new(),
                error: None,
                sync: None,
            }),
        }
    }
    for g in &mut groups {
        let part = g.part.clone();
        if part.deleted.load(Ordering::Acquire) {
            g.error = Some(LogError::TopicNotFound(part.topic.clone()));
            continue;
        }
        let mut st = part.lock_writer();
        if let Err(e) = write_group(&part, &mut st, g) {
            tracing::error!(topic = %part.topic, partition = part.id, error = %e, "append failed");
            rollback(&mut st);
            g.error = Some(e);
        }
    }
    // One sync per touched file, after all writes: the group commit. Files
    // are synced in parallel so the filesystem can merge the journal commits
    // of different partitions instead of paying for them one after another.
    let to_sync: Vec<(usize, Arc<Segment>)> = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| g.error.is_none())
        .filter_map(|(i, g)| g.sync.clone().map(|s| (i, s)))
        .collect();
    let sync_started = Instant::now();
    let failures = sync_all(&to_sync);
    let sync_time = (!to_sync.is_empty()).then(|| sync_started.elapsed());
    for (i, e) in failures {
        let seg = &to_sync[i].1;
        tracing::error!(path = %seg.log_path.display(), error = %e, "fdatasync failed");
        groups[to_sync[i].0].error = Some(LogError::Io {
            path: seg.log_path.clone(),
            source: e,
        });
    }
    for g in groups {
        if g.error.is_none() {
            publish(&g.part);
        }
        match g.error {
            None => {
                for (r, res) in g.reqs.into_iter().zip(g.results) {
                    let _ = r.reply.send(Ok(res));
                }
            }
            Some(e) => {
                for r in g.reqs {
                    let _ = r.reply.send(Err(clone_err(&e)));
                }
            }
        }
    }
    sync_time
}

/// `fdatasync` every segment, in parallel when there are several; returns the
/// failures as `(index into segs, error)`.
fn sync_all(segs: &[(usize, Arc<Segment>)]) -> Vec<(usize, std::io::Error)> {
    match segs {
        [] => Vec::new(),
        [(_, one)] => one
            .file
            .sync_data()
            .err()
            .map(|e| (0, e))
            .into_iter()
            .collect(),
        many => std::thread::scope(|scope| {
            let handles: Vec<_> = many[1..]
                .iter()
                .map(|(_, s)| scope.spawn(move || s.file.sync_data()))
                .collect();
            let mut out = Vec::new();
            if let Err(e) = many[0].1.file.sync_data() {
                out.push((0, e));
            }
            for (i, h) in handles.into_iter().enumerate() {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => out.push((i + 1, e)),
                    Err(_) => out.push((i + 1, std::io::Error::other("sync thread panicked"))),
                }
            }
            out
        }),
    }
}

/// Make what the writer wrote visible to readers and wake waiters.
fn publish(part: &PartitionInner) {
    let st = part.lock_writer();
    let seg = &st.active;
    seg.len.store(st.written, Ordering::Release);
    seg.next_offset.store(st.next_offset, Ordering::Release);
    seg.max_ts.fetch_max(st.ts_max, Ordering::AcqRel);
    drop(st);
    let next = part.lock_writer().next_offset;
    part.end.send_if_modified(|e| {
        if *e != next {
            *e = next;
            true
        } else {
            false
        }
    });
}

fn clone_err(e: &LogError) -> LogError {
    match e {
        LogError::Io { path, source } => LogError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        LogError::TopicNotFound(t) => LogError::TopicNotFound(t.clone()),
        LogError::InvalidConfig(s) => LogError::InvalidConfig(s.clone()),
        // write_group produces only the variants above; keep the message.
        other => LogError::Io {
            path: Default::default(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

/// After a failed write, forget bytes that may be partially on disk: truncate
/// to the last published length so the file never holds a torn batch mid-log.
fn rollback(st: &mut WriterState) {
    let seg = st.active.clone();
    let len = seg.len.load(Ordering::Acquire);
    if let Err(e) = seg.file.set_len(len) {
        tracing::error!(path = %seg.log_path.display(), error = %e, "rollback truncate failed");
    }
    st.written = len;
    st.next_offset = seg.next_offset.load(Ordering::Acquire);
    st.ts_max = seg.max_ts.load(Ordering::Acquire);
    let rel_limit = (st.next_offset - seg.base) as u32;
    write_lock(&seg.index).retain(|e| u64::from(e.pos) < len);
    write_lock(&seg.time_index).retain(|e| e.rel < rel_limit);
    st.last_index_pos = seg
        .index
        .read()
        .ok()
        .and_then(|i| i.last().map(|e| u64::from(e.pos)))
        .unwrap_or(0);
}

fn write_group(part: &PartitionInner, st: &mut WriterState, g: &mut Group) -> Result<()> {
    let cfg = part.config();
    let now = codec::now_ms();
    let mut start = 0usize; // first request not yet written to disk
    for i in 0..g.reqs.len() {
        let len = g.reqs[i].batch.len() as u64;
        let too_big = st.written > 0 && st.written + len > cfg.segment_bytes;
        let too_old = st.written > 0
            && cfg.segment_ms.is_some_and(|ms| {
                now.saturating_sub(st.active.created_ms.load(Ordering::Relaxed)) >= ms as i64
            });
        if too_big || too_old {
            write_all(&st.active, &g.reqs[start..i])?;
            start = i;
            roll(part, st, cfg.fsync, cfg.segment_bytes)?;
        }
        if st.written == 0 {
            st.active.created_ms.store(now, Ordering::Relaxed);
        }
        let base = st.next_offset;
        let seg_base = st.active.base;
        if base - seg_base + u64::from(g.reqs[i].batch.count) > u64::from(u32::MAX) {
            return Err(LogError::InvalidConfig(
                "segment offset range exhausted".into(),
            ));
        }
        let b = &mut g.reqs[i].batch;
        b.finalize(base);
        if st.written > 0 && st.written - st.last_index_pos >= u64::from(part.index_interval) {
            let rel = (base - seg_base) as u32;
            write_lock(&st.active.index).push(IndexEntry {
                rel,
                pos: st.written as u32,
            });
            st.last_index_pos = st.written;
            if st.ts_max > st.last_time_ts {
                write_lock(&st.active.time_index).push(TimeEntry { ts: st.ts_max, rel });
                st.last_time_ts = st.ts_max;
            }
        }
        st.written += len;
        st.next_offset += u64::from(b.count);
        st.ts_max = st.ts_max.max(b.max_ts);
        g.results.push(AppendResult {
            base_offset: base,
            count: b.count,
            timestamp: b.max_ts,
        });
    }
    write_all(&st.active, &g.reqs[start..])?;
    match cfg.fsync {
        FsyncPolicy::Always => g.sync = Some(st.active.clone()),
        FsyncPolicy::Interval(_) => part.dirty.store(true, Ordering::Release),
        FsyncPolicy::Never => {}
    }
    Ok(())
}

fn write_all(seg: &Segment, reqs: &[AppendRequest]) -> Result<()> {
    if reqs.is_empty() {
        return Ok(());
    }
    // IOV_MAX is 1024 on Linux.
    for chunk in reqs.chunks(1024) {
        let mut slices: Vec<IoSlice<'_>> = chunk
            .iter()
            .map(|r| IoSlice::new(r.batch.bytes()))
            .collect();
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            let n = (&seg.file).write_vectored(bufs).ctx(&seg.log_path)?;
            if n == 0 {
                return Err(LogError::Io {
                    path: seg.log_path.clone(),
                    source: std::io::ErrorKind::WriteZero.into(),
                });
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
    }
    Ok(())
}

/// Seal the active segment and start a new one at the next offset.
fn roll(
    part: &PartitionInner,
    st: &mut WriterState,
    policy: FsyncPolicy,
    segment_bytes: u64,
) -> Result<()> {
    let old = st.active.clone();
    old.len.store(st.written, Ordering::Release);
    old.next_offset.store(st.next_offset, Ordering::Release);
    old.max_ts.fetch_max(st.ts_max, Ordering::AcqRel);
    if policy.syncs_on_roll() {
        old.file.sync_data().ctx(&old.log_path)?;
    }
    old.write_indexes(&part.dir);
    old.release_preallocation();
    let new = Segment::create(&part.dir, st.next_offset)?;
    new.preallocate(segment_bytes);
    if policy.syncs_on_roll() {
        sync_dir(&part.dir)?;
    }
    write_lock(&part.segments).push(new.clone());
    tracing::debug!(topic = %part.topic, partition = part.id, base = new.base, "rolled segment");
    st.active = new;
    st.written = 0;
    st.last_index_pos = 0;
    st.ts_max = i64::MIN;
    st.last_time_ts = i64::MIN;
    Ok(())
}
