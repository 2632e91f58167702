//! One segment: a `.log` data file plus its sparse `.index` and `.timeindex`.
//!
//! Index files are only written for complete views of the data (when a segment
//! is sealed or the log is closed) and end with a CRC'd footer that records the
//! data length they describe. On open an index is trusted only if its footer
//! matches the data file exactly; otherwise it is rebuilt by scanning the data,
//! so a damaged or stale index can cost time but never return wrong data.

use bytes::{Bytes, BytesMut};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::codec::{self, BATCH_HEADER_LEN};
use crate::error::{IoContext, Result};

/// Sparse offset index entry: batch starting at `base + rel` is at byte `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub rel: u32,
    pub pos: u32,
}

/// Time index entry: every record before offset `base + rel` has a timestamp
/// `<= ts`, so a search for the first record with timestamp `>= t` (where
/// `ts < t`) may start at `rel`. Entries are also offset-index entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub ts: i64,
    pub rel: u32,
}

const INDEX_MAGIC: u32 = 0x434c_4958; // "CLIX"
const TIME_MAGIC: u32 = 0x434c_5458; // "CLTX"
const FOOTER_LEN: usize = 36;

/// File name stem for a base offset: 20 digits, zero padded (Kafka style).
pub(crate) fn stem(base: u64) -> String {
    format!("{base:020}")
}

pub(crate) struct Segment {
    pub base: u64,
    pub log_path: PathBuf,
    pub file: File,
    /// Bytes visible to readers (everything before is complete, valid batches).
    pub len: AtomicU64,
    /// Offset after the last visible record.
    pub next_offset: AtomicU64,
    /// Largest visible record timestamp (`i64::MIN` when empty).
    pub max_ts: AtomicI64,
    /// When the segment got its first data (ms), for age-based rolling.
    pub created_ms: AtomicI64,
    pub index: RwLock<Vec<IndexEntry>>,
    pub time_index: RwLock<Vec<TimeEntry>>,
}

/// Result of scanning a data file from the start.
pub(crate) struct Scan {
    pub valid_len: u64,
    pub file_len: u64,
    pub next_offset: u64,
    pub max_ts: i64,
    pub first_ts: Option<i64>,
    pub index: Vec<IndexEntry>,
    pub time_index: Vec<TimeEntry>,
    /// Why scanning stopped before the end of the file.
    pub damage: Option<String>,
}

impl Segment {
    pub fn paths(dir: &Path, base: u64) -> (PathBuf, PathBuf, PathBuf) {
        let s = stem(base);
        (
            dir.join(format!("{s}.log")),
            dir.join(format!("{s}.index")),
            dir.join(format!("{s}.timeindex")),
        )
    }

    fn open_file(path: &Path, create_new: bool) -> Result<File> {
        let mut o = OpenOptions::new();
        o.read(true).append(true);
        if create_new {
            o.create_new(true);
        }
        o.open(path).ctx(path)
    }

    /// Create a new, empty segment file.
    pub fn create(dir: &Path, base: u64) -> Result<Arc<Segment>> {
        let (log_path, _, _) = Self::paths(dir, base);
        let file = Self::open_file(&log_path, true)?;
        Ok(Arc::new(Segment {
            base,
            log_path,
            file,
            len: AtomicU64::new(0),
            next_offset: AtomicU64::new(base),
            max_ts: AtomicI64::new(i64::MIN),
            created_ms: AtomicI64::new(codec::now_ms()),
            index: RwLock::new(Vec::new()),
            time_index: RwLock::new(Vec::new()),
        }))
    }

    /// Open an existing segment. `tail` segments are always scanned (they may
    /// end in a torn write); others trust a valid index footer. Damage is
    /// truncated away and logged.
    pub fn open(dir: &Path, base: u64, tail: bool, index_interval: u32) -> Result<Arc<Segment>> {
        let (log_path, _, _) = Self::paths(dir, base);
        let file = Self::open_file(&log_path, false)?;
        let file_len = file.metadata().ctx(&log_path)?.len();
        let loaded = if tail {
            None
        } else {
            load_indexes(dir, base, file_len)
        };
        let rebuilt = loaded.is_none();
        let (index, time_index, next_offset, max_ts, first_ts, len) = match loaded {
            Some(l) => (
                l.index,
                l.time_index,
                l.next_offset,
                l.max_ts,
                None,
                file_len,
            ),
            None => {
                let s = scan(&file, base, index_interval).ctx(&log_path)?;
                if let Some(why) = &s.damage {
                    tracing::warn!(
                        path = %log_path.display(),
                        valid_len = s.valid_len,
                        file_len = s.file_len,
                        reason = %why,
                        "truncating damaged segment tail"
                    );
                    file.set_len(s.valid_len).ctx(&log_path)?;
                    file.sync_all().ctx(&log_path)?;
                }
                (
                    s.index,
                    s.time_index,
                    s.next_offset,
                    s.max_ts,
                    s.first_ts,
                    s.valid_len,
                )
            }
        };
        let seg = Arc::new(Segment {
            base,
            log_path,
            file,
            len: AtomicU64::new(len),
            next_offset: AtomicU64::new(next_offset),
            max_ts: AtomicI64::new(max_ts),
            created_ms: AtomicI64::new(first_ts.unwrap_or_else(codec::now_ms)),
            index: RwLock::new(index),
            time_index: RwLock::new(time_index),
        });
        if rebuilt && !tail {
            // Persist the rebuilt index so the next open is fast again.
            seg.write_indexes(dir);
        }
        Ok(seg)
    }

    /// Byte position to start reading at for `offset` (floor index entry).
    pub fn lookup(&self, offset: u64) -> u64 {
        let rel = offset.saturating_sub(self.base).min(u64::from(u32::MAX)) as u32;
        let idx = read_lock(&self.index);
        let i = idx.partition_point(|e| e.rel <= rel);
        if i == 0 {
            0
        } else {
            u64::from(idx[i - 1].pos)
        }
    }

    /// Where to start searching for the first record with timestamp `>= ts`.
    pub fn lookup_time(&self, ts: i64) -> u64 {
        let rel = {
            let t = read_lock(&self.time_index);
            let i = t.partition_point(|e| e.ts < ts);
            if i == 0 {
                return 0;
            }
            t[i - 1].rel
        };
        self.lookup(self.base + u64::from(rel))
    }

    /// `pread` exactly `len` bytes at `pos`.
    pub fn read_at(&self, pos: u64, len: usize) -> std::io::Result<Bytes> {
        let mut buf = BytesMut::zeroed(len);
        self.file.read_exact_at(&mut buf, pos)?;
        Ok(buf.freeze())
    }

    /// Write both index files describing the currently visible data. Failure
    /// is only logged: indexes are rebuilt from data when missing or stale.
    pub fn write_indexes(&self, dir: &Path) {
        let (_, ipath, tpath) = Self::paths(dir, self.base);
        let len = self.len.load(Ordering::Acquire);
        let next = self.next_offset.load(Ordering::Acquire);
        let max_ts = self.max_ts.load(Ordering::Acquire);
        let idx: Vec<u8> = {
            let idx = read_lock(&self.index);
            let mut v = Vec::with_capacity(idx.len() * 8 + FOOTER_LEN);
            for e in idx.iter().filter(|e| u64::from(e.pos) < len) {
                v.extend_from_slice(&e.rel.to_le_bytes());
                v.extend_from_slice(&e.pos.to_le_bytes());
            }
            footer(&mut v, INDEX_MAGIC, 8, len, next, max_ts);
            v
        };
        let tix: Vec<u8> = {
            let t = read_lock(&self.time_index);
            let mut v = Vec::with_capacity(t.len() * 12 + FOOTER_LEN);
            for e in t.iter().filter(|e| self.base + u64::from(e.rel) < next) {
                v.extend_from_slice(&e.ts.to_le_bytes());
                v.extend_from_slice(&e.rel.to_le_bytes());
            }
            footer(&mut v, TIME_MAGIC, 12, len, next, max_ts);
            v
        };
        for (p, bytes) in [(ipath, idx), (tpath, tix)] {
            if let Err(e) = std::fs::write(&p, bytes) {
                tracing::warn!(path = %p.display(), error = %e, "failed to write index file");
            }
        }
    }

    /// Reserve disk blocks for `bytes` of future appends without changing the
    /// file length (`FALLOC_FL_KEEP_SIZE`), so the length still marks the end
    /// of written data for recovery. Appends into reserved blocks skip ext4's
    /// per-append block allocation, which measured 2-4x faster for streaming
    /// writes. Best effort: unsupported filesystems just skip it.
    pub fn preallocate(&self, bytes: u64) {
        let Ok(len) = libc::off_t::try_from(bytes) else {
            return;
        };
        // SAFETY: plain syscall on a file descriptor we own for the call's duration.
        let r =
            unsafe { libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
        if r != 0 {
            tracing::debug!(path = %self.log_path.display(), error = %std::io::Error::last_os_error(), "preallocation skipped");
        }
    }

    /// Give back blocks reserved past the end of the data (sealed or closed).
    pub fn release_preallocation(&self) {
        let end = self.len.load(Ordering::Acquire);
        let Ok(start) = libc::off_t::try_from(end) else {
            return;
        };
        let Ok(reserved) = self.file.metadata().map(|m| m.blocks() * 512) else {
            return;
        };
        if reserved <= end + 64 * 1024 {
            return;
        }
        let Ok(len) = libc::off_t::try_from(reserved - end + 4096) else {
            return;
        };
        // SAFETY: plain syscall on a file descriptor we own; punching past EOF
        // with KEEP_SIZE never touches data below `end`.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                len,
            )
        };
        if r != 0 {
            tracing::debug!(path = %self.log_path.display(), error = %std::io::Error::last_os_error(), "releasing preallocation failed");
        }
    }

    /// Remove this segment's files.
    pub fn delete_files(&self, dir: &Path) {
        let (l, i, t) = Self::paths(dir, self.base);
        for p in [l, i, t] {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "failed to delete segment file");
                }
            }
        }
    }
}

pub(crate) fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data (plain vectors) is
    // still consistent because every mutation is a single push/assignment.
    l.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn footer(v: &mut Vec<u8>, magic: u32, entry: usize, len: u64, next: u64, max_ts: i64) {
    let count = (v.len() / entry) as u32;
    v.extend_from_slice(&magic.to_le_bytes());
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&next.to_le_bytes());
    v.extend_from_slice(&max_ts.to_le_bytes());
    let crc = crc32c::crc32c(v);
    v.extend_from_slice(&crc.to_le_bytes());
}

struct Footer {
    count: usize,
    len: u64,
    next: u64,
    max_ts: i64,
}

fn parse_footer(v: &[u8], magic: u32, entry: usize) -> Option<Footer> {
    if v.len() < FOOTER_LEN {
        return None;
    }
    let (body, crc) = v.split_at(v.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let f = &body[body.len() - (FOOTER_LEN - 4)..];
    let le4 = |b: &[u8]| -> Option<u32> { Some(u32::from_le_bytes(b.try_into().ok()?)) };
    let le8 = |b: &[u8]| -> Option<u64> { Some(u64::from_le_bytes(b.try_into().ok()?)) };
    if le4(&f[0..4])? != magic {
        return None;
    }
    let count = le4(&f[4..8])? as usize;
    if count.checked_mul(entry)? != v.len() - FOOTER_LEN {
        return None;
    }
    Some(Footer {
        count,
        len: le8(&f[8..16])?,
        next: le8(&f[16..24])?,
        max_ts: le8(&f[24..32])? as i64,
    })
}

struct Loaded {
    index: Vec<IndexEntry>,
    time_index: Vec<TimeEntry>,
    next_offset: u64,
    max_ts: i64,
}

/// Load and validate both index files; `None` means "rebuild from data".
fn load_indexes(dir: &Path, base: u64, file_len: u64) -> Option<Loaded> {
    let (_, ipath, tpath) = Segment::paths(dir, base);
    let iv = std::fs::read(&ipath).ok()?;
    let tv = std::fs::read(&tpath).ok()?;
    let fi = parse_footer(&iv, INDEX_MAGIC, 8)?;
    let ft = parse_footer(&tv, TIME_MAGIC, 12)?;
    if fi.len != file_len || ft.len != file_len || fi.next != ft.next || fi.max_ts != ft.max_ts {
        return None;
    }
    if fi.next < base || (file_len > 0) != (fi.next > base) {
        return None;
    }
    let count = fi.next - base;
    let mut index = Vec::with_capacity(fi.count);
    for c in iv[..fi.count * 8].chunks_exact(8) {
        let rel = u32::from_le_bytes(c[0..4].try_into().ok()?);
        let pos = u32::from_le_bytes(c[4..8].try_into().ok()?);
        if u64::from(rel) >= count || u64::from(pos) >= file_len {
            return None;
        }
        if let Some(last) = index.last() {
            let last: &IndexEntry = last;
            if rel <= last.rel || pos <= last.pos {
                return None;
            }
        }
        index.push(IndexEntry { rel, pos });
    }
    let mut time_index = Vec::with_capacity(ft.count);
    for c in tv[..ft.count * 12].chunks_exact(12) {
        let ts = i64::from_le_bytes(c[0..8].try_into().ok()?);
        let rel = u32::from_le_bytes(c[8..12].try_into().ok()?);
        if u64::from(rel) >= count {
            return None;
        }
        if let Some(last) = time_index.last() {
            let last: &TimeEntry = last;
            if rel <= last.rel || ts < last.ts {
                return None;
            }
        }
        time_index.push(TimeEntry { ts, rel });
    }
    Some(Loaded {
        index,
        time_index,
        next_offset: fi.next,
        max_ts: fi.max_ts,
    })
}

/// Read the data file forward from 0 and stop at the first torn or corrupt
/// batch (bad length, CRC mismatch, short read, non-contiguous offsets),
/// rebuilding both indexes on the way.
pub(crate) fn scan(file: &File, base: u64, index_interval: u32) -> std::io::Result<Scan> {
    const CHUNK: usize = 4 << 20;
    let file_len = file.metadata()?.len();
    let mut s = Scan {
        valid_len: 0,
        file_len,
        next_offset: base,
        max_ts: i64::MIN,
        first_ts: None,
        index: Vec::new(),
        time_index: Vec::new(),
        damage: None,
    };
    let mut last_index_pos = 0u64;
    let mut last_time_ts = i64::MIN;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_start = 0u64; // file position of buf[0]
    let mut at = 0usize; // position inside buf
    loop {
        let pos = buf_start + at as u64;
        if pos == file_len {
            break;
        }
        // Make sure the header (and then the whole batch) is in the buffer.
        let need_hdr = BATCH_HEADER_LEN.min((file_len - pos) as usize);
        if buf.len() - at < need_hdr {
            refill(
                file,
                &mut buf,
                &mut buf_start,
                &mut at,
                CHUNK.max(need_hdr),
                file_len,
            )?;
        }
        let h = match codec::parse_header(&buf[at..]) {
            Ok(h) => h,
            Err(e) => {
                s.damage = Some(e.to_string());
                break;
            }
        };
        if pos + h.total_len as u64 > file_len {
            s.damage = Some(format!(
                "torn batch: {} bytes past end of file",
                pos + h.total_len as u64 - file_len
            ));
            break;
        }
        if buf.len() - at < h.total_len {
            refill(
                file,
                &mut buf,
                &mut buf_start,
                &mut at,
                CHUNK.max(h.total_len),
                file_len,
            )?;
        }
        if let Err(e) = codec::verify_batch(&buf[at..at + h.total_len]) {
            s.damage = Some(e.to_string());
            break;
        }
        if h.base_offset != s.next_offset {
            s.damage = Some(format!(
                "batch base offset {} where {} was expected",
                h.base_offset, s.next_offset
            ));
            break;
        }
        if h.next_offset() - base > u64::from(u32::MAX) || pos > u64::from(u32::MAX) {
            s.damage = Some("segment exceeds addressable size".into());
            break;
        }
        if pos > 0 && pos - last_index_pos >= u64::from(index_interval) {
            let rel = (h.base_offset - base) as u32;
            s.index.push(IndexEntry {
                rel,
                pos: pos as u32,
            });
            last_index_pos = pos;
            if s.max_ts > last_time_ts {
                s.time_index.push(TimeEntry { ts: s.max_ts, rel });
                last_time_ts = s.max_ts;
            }
        }
        s.first_ts.get_or_insert(h.first_ts);
        s.max_ts = s.max_ts.max(h.max_ts);
        s.next_offset = h.next_offset();
        at += h.total_len;
        s.valid_len = buf_start + at as u64;
    }
    Ok(s)
}

fn refill(
    file: &File,
    buf: &mut Vec<u8>,
    buf_start: &mut u64,
    at: &mut usize,
    want: usize,
    file_len: u64,
) -> std::io::Result<()> {
    // Drop consumed bytes, then read up to `want` bytes from the file.
    buf.drain(..*at);
    *buf_start += *at as u64;
    *at = 0;
    let from = *buf_start + buf.len() as u64;
    let n = (want.saturating_sub(buf.len()) as u64).min(file_len - from) as usize;
    let old = buf.len();
    buf.resize(old + n, 0);
    file.read_exact_at(&mut buf[old..], from)
}
