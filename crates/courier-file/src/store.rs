//! [`FileStore`]: [`LogStore`] over [`courier_log::Log`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use courier_core::{Error, Headers, Record, Result, TopicPartition, TopicSpec, HEADER_MESSAGE_ID};
use courier_local::{Coordinator, LogStore, PartitionLog, StoredRecord, Topic};
use courier_log::{FsyncPolicy, Log, LogError, LogOptions, OffsetCommit, TopicConfig};
use parking_lot::RwLock;
use tokio::sync::watch;

const BACKEND: &str = "file";
/// Bytes read from a partition per fetch, at most.
const READ_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Bytes budgeted per wanted record: the engine reads (and zero-fills) its whole
/// byte budget, so asking for 4 MiB to return 512 small records wastes most of it.
const READ_BYTES_PER_RECORD: usize = 256;
/// Side-state key prefix of topic settings the engine does not interpret.
const TOPIC_EXTRA_PREFIX: &str = "topic-config/";

fn map_err(e: LogError) -> Error {
    match e {
        LogError::TopicExists(t) => Error::TopicExists(t),
        LogError::TopicNotFound(t) => Error::TopicNotFound(t),
        LogError::InvalidTopicName(t) => Error::InvalidTopic {
            topic: t,
            reason: "not a valid topic name".into(),
        },
        LogError::MessageTooLarge { size, max } => Error::MessageTooLarge { size, max },
        LogError::InvalidConfig(m) => Error::Config(m),
        other => Error::backend(BACKEND, other),
    }
}

/// `always`, `never`, `interval:MS` (or a bare number of ms).
pub(crate) fn parse_fsync(v: &str) -> Result<FsyncPolicy> {
    let bad = || {
        Error::Config(format!(
            "fsync {v:?}: expected always, never or interval:MS"
        ))
    };
    match v {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        _ => {
            let ms = v.strip_prefix("interval:").unwrap_or(v);
            match ms.parse::<u64>() {
                Ok(ms) if ms > 0 => Ok(FsyncPolicy::Interval(ms)),
                _ => Err(bad()),
            }
        }
    }
}

fn fsync_name(p: FsyncPolicy) -> String {
    match p {
        FsyncPolicy::Always => "always".into(),
        FsyncPolicy::Never => "never".into(),
        FsyncPolicy::Interval(ms) => format!("interval:{ms}"),
    }
}

/// One partition of the embedded log.
pub struct FilePartition {
    inner: Arc<courier_log::Partition>,
}

#[async_trait]
impl PartitionLog for FilePartition {
    async fn append(&self, records: Vec<Record>) -> Result<u64> {
        let records = records
            .into_iter()
            .map(|r| {
                let mut headers: Vec<(String, bytes::Bytes)> = r.headers.into_iter().collect();
                // The id travels as the last header and is taken off again on read.
                headers.push((HEADER_MESSAGE_ID.to_string(), bytes::Bytes::from(r.id)));
                courier_log::Record {
                    key: r.key,
                    value: r.value,
                    headers,
                    timestamp: r.timestamp,
                }
            })
            .collect();
        let res = self.inner.append(records).await.map_err(map_err)?;
        Ok(res.base_offset)
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<StoredRecord>> {
        let res = self
            .inner
            .read_async(
                from,
                max,
                max.saturating_mul(READ_BYTES_PER_RECORD)
                    .clamp(64 * 1024, READ_MAX_BYTES),
            )
            .await
            .map_err(map_err)?;
        Ok(res
            .records
            .into_iter()
            .map(|s| {
                let mut headers = s.record.headers;
                let id = match headers.last() {
                    Some((n, v)) if n == HEADER_MESSAGE_ID => {
                        let id = Arc::<str>::from(String::from_utf8_lossy(v));
                        headers.pop();
                        id
                    }
                    _ => format!("{}-{}-{}", self.inner.topic(), self.inner.id(), s.offset).into(),
                };
                StoredRecord {
                    offset: s.offset,
                    id,
                    key: s.record.key,
                    value: s.record.value,
                    headers: headers.into_iter().collect::<Headers>(),
                    timestamp: s.record.timestamp,
                }
            })
            .collect())
    }

    fn start_offset(&self) -> u64 {
        self.inner.start_offset()
    }

    fn end_offset(&self) -> u64 {
        self.inner.end_offset()
    }

    fn watch_end(&self) -> watch::Receiver<u64> {
        self.inner.subscribe()
    }

    async fn offset_for_timestamp(&self, ts_ms: i64) -> Result<Option<u64>> {
        self.inner.offset_for_timestamp(ts_ms).map_err(map_err)
    }
}

/// The embedded log as a [`LogStore`]. Shared per directory within a process.
pub struct FileStore {
    log: Log,
    path: PathBuf,
    default_fsync: FsyncPolicy,
    max_message_size: usize,
    topics: RwLock<BTreeMap<String, Arc<Topic<FilePartition>>>>,
    coordinator: Coordinator,
}

impl FileStore {
    /// Opens the log at `path` (creating it), or returns the one this process already
    /// has open there. A directory held by another process fails with a clear error.
    pub async fn open_shared(
        path: &str,
        fsync: Option<FsyncPolicy>,
        max_message_size: usize,
    ) -> Result<Arc<FileStore>> {
        static OPEN: OnceLock<tokio::sync::Mutex<HashMap<PathBuf, Weak<FileStore>>>> =
            OnceLock::new();
        std::fs::create_dir_all(path)
            .map_err(|e| Error::backend(BACKEND, format!("cannot create {path}: {e}")))?;
        let key = std::fs::canonicalize(path)
            .map_err(|e| Error::backend(BACKEND, format!("cannot resolve {path}: {e}")))?;
        let mut open = OPEN.get_or_init(Default::default).lock().await;
        if let Some(store) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(store);
        }
        let log = Log::open(&key, LogOptions::default())
            .await
            .map_err(|e| match e {
                LogError::Locked { path } => Error::backend(
                    BACKEND,
                    format!(
                        "{} is in use by another process (lock file {})",
                        key.display(),
                        path.display()
                    ),
                ),
                other => map_err(other),
            })?;
        let store = Arc::new(FileStore {
            log,
            path: key.clone(),
            default_fsync: fsync.unwrap_or(FsyncPolicy::Interval(1000)),
            max_message_size,
            topics: RwLock::new(BTreeMap::new()),
            coordinator: Coordinator::default(),
        });
        store.load_topics().await?;
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(key, Arc::downgrade(&store));
        Ok(store)
    }

    /// The directory this store owns.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn load_topics(&self) -> Result<()> {
        for name in self.log.list_topics() {
            self.refresh_topic(&name).await?;
        }
        Ok(())
    }

    /// Re-reads one topic's config and partitions into the cache.
    async fn refresh_topic(&self, name: &str) -> Result<()> {
        let config = self.log.topic_config(name).map_err(map_err)?;
        let extra = self
            .log
            .kv()
            .get(format!("{TOPIC_EXTRA_PREFIX}{name}"))
            .await
            .map_err(map_err)?;
        let extra: BTreeMap<String, String> = extra
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let partitions = (0..config.partitions)
            .map(|p| {
                self.log
                    .partition(name, p)
                    .map(|inner| Arc::new(FilePartition { inner }))
                    .map_err(map_err)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut config_map = extra;
        config_map.insert("fsync".into(), fsync_name(config.fsync));
        config_map.insert("segment.bytes".into(), config.segment_bytes.to_string());
        let spec = TopicSpec {
            name: name.to_string(),
            partitions: config.partitions,
            replication_factor: 1,
            retention_ms: config.retention_ms.map(|v| v as i64),
            retention_bytes: config.retention_bytes,
            max_message_size: Some(config.max_message_bytes),
            config: config_map,
        };
        self.topics
            .write()
            .insert(name.to_string(), Arc::new(Topic { spec, partitions }));
        Ok(())
    }

    /// Engine config from a Courier topic spec, plus the settings the engine keeps
    /// nowhere (stored beside it).
    fn engine_config(&self, spec: &TopicSpec) -> Result<(TopicConfig, BTreeMap<String, String>)> {
        let mut c = TopicConfig {
            partitions: spec.partitions,
            fsync: self.default_fsync,
            max_message_bytes: self.max_message_size,
            ..TopicConfig::default()
        };
        if let Some(ms) = spec.retention_ms {
            c.retention_ms = if ms < 0 { None } else { Some(ms as u64) };
        }
        if spec.retention_bytes.is_some() {
            c.retention_bytes = spec.retention_bytes;
        }
        if let Some(m) = spec.max_message_size {
            c.max_message_bytes = m;
        }
        let mut extra = BTreeMap::new();
        for (k, v) in &spec.config {
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|e| Error::Config(format!("{k}: {e}")))
            };
            match k.as_str() {
                "fsync" => c.fsync = parse_fsync(v)?,
                "segment.bytes" => c.segment_bytes = num(v)?,
                "segment.ms" => c.segment_ms = Some(num(v)?),
                "retention.ms" => c.retention_ms = Some(num(v)?),
                "retention.bytes" => c.retention_bytes = Some(num(v)?),
                "max.message.bytes" => c.max_message_bytes = num(v)? as usize,
                _ => {
                    extra.insert(k.clone(), v.clone());
                }
            }
        }
        c.validate().map_err(map_err)?;
        Ok((c, extra))
    }

    async fn save_extra(&self, name: &str, extra: &BTreeMap<String, String>) -> Result<()> {
        let key = format!("{TOPIC_EXTRA_PREFIX}{name}");
        if extra.is_empty() {
            return self.log.kv().delete(key).await.map_err(map_err);
        }
        let value = serde_json::to_vec(extra)?;
        self.log.kv().put(key, value).await.map_err(map_err)
    }
}

#[async_trait]
impl LogStore for FileStore {
    type Partition = FilePartition;

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn durable(&self) -> bool {
        true
    }

    async fn create_topic(&self, spec: &TopicSpec) -> Result<()> {
        let (config, extra) = self.engine_config(spec)?;
        self.log
            .create_topic(&spec.name, config)
            .await
            .map_err(map_err)?;
        self.save_extra(&spec.name, &extra).await?;
        self.refresh_topic(&spec.name).await
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.log.delete_topic(name).await.map_err(map_err)?;
        self.topics.write().remove(name);
        self.save_extra(name, &BTreeMap::new()).await?;
        let offsets = self.log.offsets();
        for group in offsets.list_groups().await.map_err(map_err)? {
            let mine = offsets.group_offsets(&group).await.map_err(map_err)?;
            if !mine.is_empty() && mine.iter().all(|(t, _, _)| t == name) {
                offsets.delete_group(&group).await.map_err(map_err)?;
            }
        }
        Ok(())
    }

    fn list_topics(&self) -> Vec<String> {
        self.topics.read().keys().cloned().collect()
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic<FilePartition>>> {
        self.topics.read().get(name).cloned()
    }

    async fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        self.log
            .add_partitions(name, total)
            .await
            .map_err(map_err)?;
        self.refresh_topic(name).await
    }

    async fn update_topic(&self, spec: &TopicSpec) -> Result<()> {
        let current = self.log.topic_config(&spec.name).map_err(map_err)?;
        let mut wanted = spec.clone();
        wanted.partitions = current.partitions;
        let (mut config, extra) = self.engine_config(&wanted)?;
        if !spec.config.contains_key("fsync") {
            config.fsync = current.fsync;
        }
        self.log
            .update_topic_config(&spec.name, config)
            .await
            .map_err(map_err)?;
        self.save_extra(&spec.name, &extra).await?;
        self.refresh_topic(&spec.name).await
    }

    async fn commit_offsets(&self, group: &str, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        let commits: Vec<OffsetCommit> = offsets
            .iter()
            .map(|(tp, o)| OffsetCommit::new(tp.topic.clone(), tp.partition, *o))
            .collect();
        self.log
            .offsets()
            .commit(group, &commits)
            .await
            .map_err(map_err)
    }

    async fn committed(&self, group: &str, tp: &TopicPartition) -> Result<Option<u64>> {
        Ok(self
            .log
            .offsets()
            .committed(group, &tp.topic, tp.partition)
            .await
            .map_err(map_err)?
            .map(|c| c.offset))
    }

    async fn groups(&self) -> Result<Vec<String>> {
        self.log.offsets().list_groups().await.map_err(map_err)
    }

    fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    async fn close(&self) -> Result<()> {
        self.log.flush().await.map_err(map_err)
    }
}
