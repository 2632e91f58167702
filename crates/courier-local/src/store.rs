//! The storage SPI of [`LogDriver`](crate::LogDriver): what a partitioned log must
//! offer.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use courier_core::{Headers, Record, Result, TopicPartition, TopicSpec};
use tokio::sync::watch;

/// A record as stored in a partition.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRecord {
    /// Dense offset within the partition.
    pub offset: u64,
    /// Message id (shared, so every read of the record hands it out without a copy).
    pub id: Arc<str>,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Bytes,
    /// Headers.
    pub headers: Headers,
    /// Timestamp, ms since the epoch.
    pub timestamp: i64,
}

/// One partition: an append-only sequence of records with dense offsets.
#[async_trait]
pub trait PartitionLog: Send + Sync + 'static {
    /// Appends `records` in order and returns the offset of the first. When this
    /// returns, the records are stored as durably as the store promises.
    async fn append(&self, records: Vec<Record>) -> Result<u64>;
    /// Up to `max` records starting at `from` (or at the start offset when `from` was
    /// deleted by retention). Never waits for new records.
    async fn read(&self, from: u64, max: usize) -> Result<Vec<StoredRecord>>;
    /// First available offset.
    fn start_offset(&self) -> u64;
    /// Offset the next appended record gets.
    fn end_offset(&self) -> u64;
    /// Changes whenever `end_offset` grows.
    fn watch_end(&self) -> watch::Receiver<u64>;
    /// First offset whose timestamp is ≥ `ts_ms`, if any.
    async fn offset_for_timestamp(&self, ts_ms: i64) -> Result<Option<u64>>;
}

/// A topic: its settings and partitions.
pub struct Topic<P> {
    /// Settings as created or updated.
    pub spec: TopicSpec,
    /// Partitions, indexed by number.
    pub partitions: Vec<Arc<P>>,
}

/// A set of topics plus the consumer groups' committed positions.
#[async_trait]
pub trait LogStore: Send + Sync + 'static {
    /// The partition type.
    type Partition: PartitionLog;
    /// Backend name (`memory`, `file`).
    fn name(&self) -> &'static str;
    /// True when stored data survives a restart.
    fn durable(&self) -> bool;
    /// Creates a topic; `TopicExists` if present.
    async fn create_topic(&self, spec: &TopicSpec) -> Result<()>;
    /// Deletes a topic; `TopicNotFound` if absent.
    async fn delete_topic(&self, name: &str) -> Result<()>;
    /// Topic names, sorted.
    fn list_topics(&self) -> Vec<String>;
    /// A topic, if present.
    fn topic(&self, name: &str) -> Option<Arc<Topic<Self::Partition>>>;
    /// Grows a topic to `total` partitions.
    async fn add_partitions(&self, name: &str, total: u32) -> Result<()>;
    /// Replaces a topic's settings (retention, max message size, config).
    async fn update_topic(&self, spec: &TopicSpec) -> Result<()>;
    /// Atomically records `group`'s next offsets.
    async fn commit_offsets(&self, group: &str, offsets: &[(TopicPartition, u64)]) -> Result<()>;
    /// `group`'s committed next offset for `tp`.
    async fn committed(&self, group: &str, tp: &TopicPartition) -> Result<Option<u64>>;
    /// Groups that have committed anything, sorted.
    async fn groups(&self) -> Result<Vec<String>>;
    /// Group coordination shared by every driver over this store.
    fn coordinator(&self) -> &crate::Coordinator;
    /// Flushes and releases the store.
    async fn close(&self) -> Result<()>;
}
