//! `memory://`: topics and group offsets held in process memory. Nothing survives the
//! process; everything else behaves as the durable backends do.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use courier_core::{Error, Record, Result, TopicPartition, TopicSpec};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::group::Coordinator;
use crate::store::{LogStore, PartitionLog, StoredRecord, Topic};

/// One in-memory partition.
pub struct MemoryPartition {
    records: RwLock<Vec<StoredRecord>>,
    end: watch::Sender<u64>,
}

impl MemoryPartition {
    fn new() -> Self {
        Self {
            records: RwLock::new(Vec::new()),
            end: watch::Sender::new(0),
        }
    }
}

#[async_trait]
impl PartitionLog for MemoryPartition {
    async fn append(&self, records: Vec<Record>) -> Result<u64> {
        let mut log = self.records.write();
        let base = log.len() as u64;
        log.extend(records.into_iter().enumerate().map(|(i, r)| StoredRecord {
            offset: base + i as u64,
            id: r.id.into(),
            key: r.key,
            value: r.value,
            headers: r.headers,
            timestamp: r.timestamp,
        }));
        let end = log.len() as u64;
        drop(log);
        self.end.send_replace(end);
        Ok(base)
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<StoredRecord>> {
        let log = self.records.read();
        let start = (from as usize).min(log.len());
        let stop = start.saturating_add(max).min(log.len());
        Ok(log[start..stop].to_vec())
    }

    fn start_offset(&self) -> u64 {
        0
    }

    fn end_offset(&self) -> u64 {
        *self.end.borrow()
    }

    fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    async fn offset_for_timestamp(&self, ts_ms: i64) -> Result<Option<u64>> {
        let log = self.records.read();
        Ok(log.iter().find(|r| r.timestamp >= ts_ms).map(|r| r.offset))
    }
}

/// The `memory://` store. Stores are shared by name within a process, so two clients
/// connecting to `memory://name` see the same topics (useful for tests that restart a
/// client).
#[derive(Default)]
pub struct MemoryStore {
    topics: RwLock<BTreeMap<String, Arc<Topic<MemoryPartition>>>>,
    offsets: Mutex<BTreeMap<String, HashMap<TopicPartition, u64>>>,
    coordinator: Coordinator,
}

impl MemoryStore {
    /// The process-wide store called `name`, created on first use.
    pub fn named(name: &str) -> Arc<MemoryStore> {
        static STORES: std::sync::OnceLock<Mutex<HashMap<String, Arc<MemoryStore>>>> =
            std::sync::OnceLock::new();
        STORES
            .get_or_init(Default::default)
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

#[async_trait]
impl LogStore for MemoryStore {
    type Partition = MemoryPartition;

    fn name(&self) -> &'static str {
        "memory"
    }

    fn durable(&self) -> bool {
        false
    }

    async fn create_topic(&self, spec: &TopicSpec) -> Result<()> {
        let mut topics = self.topics.write();
        if topics.contains_key(&spec.name) {
            return Err(Error::TopicExists(spec.name.clone()));
        }
        let partitions = (0..spec.partitions)
            .map(|_| Arc::new(MemoryPartition::new()))
            .collect();
        topics.insert(
            spec.name.clone(),
            Arc::new(Topic {
                spec: spec.clone(),
                partitions,
            }),
        );
        Ok(())
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.topics
            .write()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))?;
        for offsets in self.offsets.lock().values_mut() {
            offsets.retain(|tp, _| tp.topic != name);
        }
        Ok(())
    }

    fn list_topics(&self) -> Vec<String> {
        self.topics.read().keys().cloned().collect()
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic<MemoryPartition>>> {
        self.topics.read().get(name).cloned()
    }

    async fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        let mut topics = self.topics.write();
        let old = topics
            .get(name)
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))?;
        let mut partitions = old.partitions.clone();
        while partitions.len() < total as usize {
            partitions.push(Arc::new(MemoryPartition::new()));
        }
        let mut spec = old.spec.clone();
        spec.partitions = partitions.len() as u32;
        topics.insert(name.to_string(), Arc::new(Topic { spec, partitions }));
        Ok(())
    }

    async fn update_topic(&self, spec: &TopicSpec) -> Result<()> {
        let mut topics = self.topics.write();
        let old = topics
            .get(&spec.name)
            .ok_or_else(|| Error::TopicNotFound(spec.name.clone()))?;
        let mut spec = spec.clone();
        spec.partitions = old.spec.partitions;
        let partitions = old.partitions.clone();
        topics.insert(spec.name.clone(), Arc::new(Topic { spec, partitions }));
        Ok(())
    }

    async fn commit_offsets(&self, group: &str, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        let mut all = self.offsets.lock();
        let g = all.entry(group.to_string()).or_default();
        for (tp, o) in offsets {
            g.insert(tp.clone(), *o);
        }
        Ok(())
    }

    async fn committed(&self, group: &str, tp: &TopicPartition) -> Result<Option<u64>> {
        Ok(self
            .offsets
            .lock()
            .get(group)
            .and_then(|g| g.get(tp).copied()))
    }

    async fn groups(&self) -> Result<Vec<String>> {
        Ok(self.offsets.lock().keys().cloned().collect())
    }

    fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
