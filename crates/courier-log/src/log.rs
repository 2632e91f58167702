//! The [`Log`]: a directory of topics, the lock, the writer and background tasks.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use crate::codec::now_ms;
use crate::config::{FsyncPolicy, LogOptions, TopicConfig};
use crate::error::{IoContext, LogError, Result};
use crate::partition::{sync_dir, Partition, PartitionInner};
use crate::segment::{read_lock, write_lock};
use crate::store::{self, Kv, Offsets};
use crate::writer::{self, WriterHandle};

const LOCK_FILE: &str = "LOCK";
const TOPICS_DIR: &str = "topics";
const META_FILE: &str = "topic.json";
const STATE_FILE: &str = "state.redb";
/// Prefix of a topic directory being deleted; `~` cannot occur in topic names.
const DELETED_PREFIX: &str = "~deleted~";

#[derive(Serialize, Deserialize)]
struct TopicMeta {
    version: u32,
    config: TopicConfig,
}

struct Topic {
    dir: PathBuf,
    config: Arc<RwLock<TopicConfig>>,
    partitions: RwLock<Vec<Arc<PartitionInner>>>,
}

struct Shared {
    root: PathBuf,
    opts: LogOptions,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises topic creation/deletion/reconfiguration (metadata files).
    admin: Mutex<()>,
    writer: Mutex<Option<WriterHandle>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    db: Arc<store::StateDb>,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    // Last field: dropped (unlocked) only after everything above is closed.
    _lock: File,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for h in self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
        // No Partition handle exists any more (they keep Shared alive), so this
        // drops the last sender: the writer drains what is queued and exits.
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self
            .writer_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            if h.join().is_err() {
                tracing::error!("writer thread panicked");
            }
        }
        let topics = read_lock(&self.topics);
        for t in topics.values() {
            for p in read_lock(&t.partitions).iter() {
                let sync = !matches!(read_lock(&t.config).fsync, FsyncPolicy::Never);
                // The writer may still be running for in-flight appends of
                // dropped futures; flush() takes the writer lock, so it is safe.
                if sync {
                    if let Err(e) = p.flush(true) {
                        tracing::warn!(error = %e, "flush on close failed");
                    }
                }
                if let Some(s) = read_lock(&p.segments).last() {
                    if !sync {
                        s.write_indexes(&p.dir);
                    }
                    s.release_preallocation();
                }
            }
        }
        tracing::debug!(root = %self.root.display(), "log closed");
    }
}

/// An open log directory. Dropping the last `Log` and [`Partition`] handle
/// flushes (per policy), writes the active indexes and releases the lock.
#[derive(Clone)]
pub struct Log {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("root", &self.shared.root)
            .finish()
    }
}

/// Topic names: 1..=249 chars of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LogError::InvalidTopicName(name.to_string()))
    }
}

fn write_meta(dir: &Path, config: &TopicConfig) -> Result<()> {
    let path = dir.join(META_FILE);
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(&TopicMeta {
        version: 1,
        config: config.clone(),
    })
    .map_err(|e| LogError::Metadata {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // Write-then-rename so a crash leaves either the old or the new file.
    {
        use std::io::Write;
        let mut f = File::create(&tmp).ctx(&tmp)?;
        f.write_all(&json).ctx(&tmp)?;
        f.sync_all().ctx(&tmp)?;
    }
    std::fs::rename(&tmp, &path).ctx(&path)?;
    sync_dir(dir)
}

fn read_meta(dir: &Path) -> Result<TopicConfig> {
    let path = dir.join(META_FILE);
    let bytes = std::fs::read(&path).ctx(&path)?;
    let meta: TopicMeta = serde_json::from_slice(&bytes).map_err(|e| LogError::Metadata {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    meta.config.validate().map_err(|e| LogError::Metadata {
        path,
        reason: e.to_string(),
    })?;
    Ok(meta.config)
}

fn open_topic(name: &str, dir: PathBuf, config: TopicConfig, opts: &LogOptions) -> Result<Topic> {
    let n = config.partitions;
    let config = Arc::new(RwLock::new(config));
    let mut parts = Vec::with_capacity(n as usize);
    for p in 0..n {
        parts.push(Arc::new(PartitionInner::open(
            name,
            p,
            dir.join(p.to_string()),
            config.clone(),
            opts.index_interval_bytes,
        )?));
    }
    Ok(Topic {
        dir,
        config,
        partitions: RwLock::new(parts),
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| LogError::Closed)?
}

impl Log {
    /// Open (creating if needed) the log in `dir`, recovering every partition:
    /// the tail segment is scanned and truncated at the first torn or corrupt
    /// batch, damaged indexes are rebuilt. Fails with [`LogError::Locked`] if
    /// another `Log` has the directory open. Must run inside a tokio runtime
    /// (it starts the flusher and retention tasks).
    pub async fn open(dir: impl AsRef<Path>, opts: LogOptions) -> Result<Log> {
        let root = dir.as_ref().to_path_buf();
        let opts2 = opts.clone();
        let (lock, topics, db) = blocking(move || {
            let opts = opts2;
            std::fs::create_dir_all(root.join(TOPICS_DIR)).ctx(&root)?;
            let lock_path = root.join(LOCK_FILE);
            let lock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .ctx(&lock_path)?;
            match lock.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(LogError::Locked { path: lock_path })
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(LogError::Io {
                        path: lock_path,
                        source: e,
                    })
                }
            }
            let db = Arc::new(store::StateDb::new(root.join(STATE_FILE)));
            let tdir = root.join(TOPICS_DIR);
            let mut topics = HashMap::new();
            for entry in std::fs::read_dir(&tdir).ctx(&tdir)? {
                let entry = entry.ctx(&tdir)?;
                let path = entry.path();
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if name.starts_with(DELETED_PREFIX) {
                    // A delete that crashed half way: finish it.
                    let _ = std::fs::remove_dir_all(&path);
                    continue;
                }
                if validate_topic_name(&name).is_err() || !path.is_dir() {
                    continue;
                }
                if !path.join(META_FILE).exists() {
                    // create_topic writes the metadata file last, so this is a
                    // create that crashed half way: nothing was acknowledged.
                    tracing::warn!(topic = %name, "removing incompletely created topic");
                    std::fs::remove_dir_all(&path).ctx(&path)?;
                    continue;
                }
                let config = read_meta(&path)?;
                topics.insert(
                    name.clone(),
                    Arc::new(open_topic(&name, path, config, &opts)?),
                );
            }
            Ok((lock, topics, db))
        })
        .await?;
        let (writer, writer_thread) = writer::spawn(opts.write_queue)?;
        let shared = Arc::new(Shared {
            root: dir.as_ref().to_path_buf(),
            opts,
            topics: RwLock::new(topics),
            admin: Mutex::new(()),
            writer: Mutex::new(Some(writer)),
            writer_thread: Mutex::new(Some(writer_thread)),
            db,
            background: Mutex::new(Vec::new()),
            _lock: lock,
        });
        let mut bg = Vec::new();
        bg.push(tokio::spawn(flusher(Arc::downgrade(&shared))));
        if let Some(every) = shared.opts.retention_check_interval {
            bg.push(tokio::spawn(retention_task(Arc::downgrade(&shared), every)));
        }
        *shared.background.lock().unwrap_or_else(|p| p.into_inner()) = bg;
        tracing::info!(root = %shared.root.display(), "log opened");
        Ok(Log { shared })
    }

    /// The directory this log lives in.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        read_lock(&self.shared.topics)
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::TopicNotFound(name.to_string()))
    }

    /// Create a topic with `config.partitions` empty partitions; its metadata
    /// is durable when this returns. Errors with `TopicExists` if present.
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        validate_topic_name(name)?;
        config.validate()?;
        let shared = self.shared.clone();
        let name = name.to_string();
        blocking(move || {
            let _g = shared.admin.lock().unwrap_or_else(|p| p.into_inner());
            if read_lock(&shared.topics).contains_key(&name) {
                return Err(LogError::TopicExists(name));
            }
            let tdir = shared.root.join(TOPICS_DIR);
            let dir = tdir.join(&name);
            if dir.exists() {
                // Unregistered leftovers (e.g. a crash during create): start clean.
                std::fs::remove_dir_all(&dir).ctx(&dir)?;
            }
            std::fs::create_dir_all(&dir).ctx(&dir)?;
            let topic = open_topic(&name, dir.clone(), config.clone(), &shared.opts)?;
            // The metadata file is written last: it is what makes the topic exist.
            write_meta(&dir, &config)?;
            sync_dir(&tdir)?;
            write_lock(&shared.topics).insert(name.clone(), Arc::new(topic));
            tracing::info!(topic = %name, partitions = config.partitions, "created topic");
            Ok(())
        })
        .await
    }

    /// Delete a topic and all its data. Outstanding [`Partition`] handles
    /// fail further appends with `TopicNotFound`.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let shared = self.shared.clone();
        let name = name.to_string();
        blocking(move || {
            let _g = shared.admin.lock().unwrap_or_else(|p| p.into_inner());
            let topic = write_lock(&shared.topics)
                .remove(&name)
                .ok_or_else(|| LogError::TopicNotFound(name.clone()))?;
            for p in read_lock(&topic.partitions).iter() {
                p.deleted.store(true, Ordering::Release);
                // Hold the writer lock so no append is mid-write while we move the dir.
                drop(p.lock_writer());
                // Wake wait_for() callers so they observe the deletion.
                p.end.send_modify(|_| {});
            }
            // A short unique tombstone: prefixing the name could exceed the file
            // system's 255-byte name limit for long (valid, ≤ 249) topic names.
            static TOMBS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let tomb = shared.root.join(TOPICS_DIR).join(format!(
                "{DELETED_PREFIX}{nanos:x}-{:x}",
                TOMBS.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::rename(&topic.dir, &tomb).ctx(&topic.dir)?;
            sync_dir(&shared.root.join(TOPICS_DIR))?;
            std::fs::remove_dir_all(&tomb).ctx(&tomb)?;
            tracing::info!(topic = %name, "deleted topic");
            Ok(())
        })
        .await
    }

    /// Names of all topics, sorted.
    pub fn list_topics(&self) -> Vec<String> {
        let mut v: Vec<String> = read_lock(&self.shared.topics).keys().cloned().collect();
        v.sort();
        v
    }

    /// Current configuration of a topic.
    pub fn topic_config(&self, name: &str) -> Result<TopicConfig> {
        Ok(read_lock(&self.topic(name)?.config).clone())
    }

    /// Replace a topic's configuration (durably); takes effect for the next
    /// append/retention run. The partition count cannot change here (use
    /// [`Log::add_partitions`]).
    pub async fn update_topic_config(&self, name: &str, config: TopicConfig) -> Result<()> {
        config.validate()?;
        let topic = self.topic(name)?;
        let shared = self.shared.clone();
        blocking(move || {
            let _g = shared.admin.lock().unwrap_or_else(|p| p.into_inner());
            let current = read_lock(&topic.config).partitions;
            if config.partitions != current {
                return Err(LogError::InvalidConfig(format!(
                    "partitions is {current}; change it with add_partitions"
                )));
            }
            write_meta(&topic.dir, &config)?;
            *write_lock(&topic.config) = config;
            Ok(())
        })
        .await
    }

    /// Grow a topic to `new_total` partitions (never shrinks).
    pub async fn add_partitions(&self, name: &str, new_total: u32) -> Result<()> {
        let topic = self.topic(name)?;
        let shared = self.shared.clone();
        let name = name.to_string();
        blocking(move || {
            let _g = shared.admin.lock().unwrap_or_else(|p| p.into_inner());
            let mut cfg = read_lock(&topic.config).clone();
            if new_total <= cfg.partitions {
                return Err(LogError::InvalidConfig(format!(
                    "topic {name} already has {} partitions",
                    cfg.partitions
                )));
            }
            let mut new = Vec::new();
            for p in cfg.partitions..new_total {
                new.push(Arc::new(PartitionInner::open(
                    &name,
                    p,
                    topic.dir.join(p.to_string()),
                    topic.config.clone(),
                    shared.opts.index_interval_bytes,
                )?));
            }
            cfg.partitions = new_total;
            write_meta(&topic.dir, &cfg)?;
            *write_lock(&topic.config) = cfg;
            write_lock(&topic.partitions).extend(new);
            Ok(())
        })
        .await
    }

    /// Handle to partition `p` of `topic`.
    pub fn partition(&self, topic: &str, p: u32) -> Result<Arc<Partition>> {
        let t = self.topic(topic)?;
        let inner = read_lock(&t.partitions)
            .get(p as usize)
            .cloned()
            .ok_or_else(|| LogError::PartitionNotFound {
                topic: topic.to_string(),
                partition: p,
            })?;
        let writer = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(LogError::Closed)?;
        Ok(Arc::new(Partition {
            inner,
            writer,
            _log: self.shared.clone(),
        }))
    }

    /// Delete whole sealed segments that violate their topic's retention (age
    /// of the newest record, or total size). The active segment is kept.
    /// Returns the number of segments deleted.
    pub async fn enforce_retention(&self) -> Result<usize> {
        let shared = self.shared.clone();
        blocking(move || Ok(enforce_retention(&shared))).await
    }

    /// Consumer group offsets (durable, transactional).
    pub fn offsets(&self) -> Offsets {
        Offsets {
            db: self.shared.db.clone(),
            _log: self.shared.clone(),
        }
    }

    /// Generic key/value side state (durable, transactional).
    pub fn kv(&self) -> Kv {
        Kv {
            db: self.shared.db.clone(),
            _log: self.shared.clone(),
        }
    }

    /// Graceful shutdown: `fdatasync` every partition and write all indexes,
    /// reporting errors (dropping the last handle does the same silently).
    /// The lock is released once this and every other handle of the log
    /// (`Partition`, `Offsets`, `Kv`) are dropped.
    pub async fn close(self) -> Result<()> {
        self.flush().await
    }

    /// `fdatasync` every partition and write all active indexes.
    pub async fn flush(&self) -> Result<()> {
        let shared = self.shared.clone();
        blocking(move || {
            for p in all_partitions(&shared) {
                p.flush(true)?;
            }
            Ok(())
        })
        .await
    }
}

fn all_partitions(shared: &Shared) -> Vec<Arc<PartitionInner>> {
    read_lock(&shared.topics)
        .values()
        .flat_map(|t| read_lock(&t.partitions).clone())
        .collect()
}

fn enforce_retention(shared: &Shared) -> usize {
    let now = now_ms();
    all_partitions(shared)
        .iter()
        .map(|p| p.enforce_retention(now))
        .sum()
}

async fn flusher(weak: Weak<Shared>) {
    let mut tick = Duration::from_millis(100);
    loop {
        tokio::time::sleep(tick).await;
        let Some(shared) = weak.upgrade() else { return };
        let now = now_ms();
        let mut min_interval: Option<u64> = None;
        let mut due = Vec::new();
        for p in all_partitions(&shared) {
            let policy = read_lock(&p.config).fsync;
            if let FsyncPolicy::Interval(ms) = policy {
                min_interval = Some(min_interval.map_or(ms, |m| m.min(ms)));
                let last = p.last_sync_ms.load(Ordering::Acquire);
                if p.dirty.load(Ordering::Acquire) && now - last >= ms as i64 {
                    due.push(p);
                }
            }
        }
        drop(shared);
        tick = Duration::from_millis(min_interval.unwrap_or(100).clamp(1, 100));
        if due.is_empty() {
            continue;
        }
        let r = tokio::task::spawn_blocking(move || {
            for p in due {
                // Clear first: appends racing with the sync re-mark it dirty.
                p.dirty.store(false, Ordering::Release);
                p.last_sync_ms.store(now_ms(), Ordering::Release);
                let seg = read_lock(&p.segments).last().cloned();
                if let Some(seg) = seg {
                    if let Err(e) = seg.file.sync_data() {
                        tracing::error!(path = %seg.log_path.display(), error = %e, "interval fdatasync failed");
                        p.dirty.store(true, Ordering::Release);
                    }
                }
            }
        })
        .await;
        if r.is_err() {
            return;
        }
    }
}

async fn retention_task(weak: Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = weak.upgrade() else { return };
        let r = tokio::task::spawn_blocking(move || enforce_retention(&shared)).await;
        match r {
            Ok(n) if n > 0 => tracing::debug!(deleted = n, "retention run"),
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
