//! Side state in `redb` (an embedded ACID store): consumer group offsets and a
//! generic key/value table. Every write is one redb transaction, durable
//! (fsynced) when the returned future resolves.

use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition};
use std::sync::Arc;

use crate::error::{store_err, LogError, Result};

const OFFSETS: TableDefinition<(&str, &str, u32), (u64, &str)> =
    TableDefinition::new("group_offsets");
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// The redb file, opened on first use: most logs (and all tests of the data
/// path) never touch side state, and opening/closing redb costs fsyncs.
pub(crate) struct StateDb {
    path: std::path::PathBuf,
    db: std::sync::Mutex<Option<Arc<Database>>>,
}

impl StateDb {
    pub fn new(path: std::path::PathBuf) -> Self {
        StateDb {
            path,
            db: std::sync::Mutex::new(None),
        }
    }

    fn get(&self) -> Result<Arc<Database>> {
        let mut g = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = &*g {
            return Ok(db.clone());
        }
        let db = open_db(&self.path)?;
        *g = Some(db.clone());
        Ok(db)
    }
}

/// Keeps the owning log (and its lock) alive while a handle exists.
pub(crate) type LogRef = Arc<dyn std::any::Any + Send + Sync>;

fn open_db(path: &std::path::Path) -> Result<Arc<Database>> {
    let db = Database::create(path).map_err(store_err)?;
    // Create the tables up front so read transactions never see them missing.
    let tx = db.begin_write().map_err(store_err)?;
    tx.open_table(OFFSETS).map_err(store_err)?;
    tx.open_table(KV).map_err(store_err)?;
    tx.commit().map_err(store_err)?;
    Ok(Arc::new(db))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| LogError::Closed)?
}

/// One offset to commit for a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommit {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// Next offset the group will consume.
    pub offset: u64,
    /// Free-form metadata stored with the offset.
    pub metadata: String,
}

impl OffsetCommit {
    /// A commit with empty metadata.
    pub fn new(topic: impl Into<String>, partition: u32, offset: u64) -> Self {
        OffsetCommit {
            topic: topic.into(),
            partition,
            offset,
            metadata: String::new(),
        }
    }
}

/// A committed offset and its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    /// Committed offset.
    pub offset: u64,
    /// Metadata stored with it.
    pub metadata: String,
}

/// Consumer group offsets. Cheap to clone.
#[derive(Clone)]
pub struct Offsets {
    pub(crate) db: Arc<StateDb>,
    pub(crate) _log: LogRef,
}

impl std::fmt::Debug for Offsets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Offsets")
    }
}

impl Offsets {
    /// Commit all `commits` for `group` atomically (all or none), durably.
    pub async fn commit(&self, group: &str, commits: &[OffsetCommit]) -> Result<()> {
        let db = self.db.clone();
        let group = group.to_string();
        let commits = commits.to_vec();
        blocking(move || {
            let db = db.get()?;
            let tx = db.begin_write().map_err(store_err)?;
            {
                let mut t = tx.open_table(OFFSETS).map_err(store_err)?;
                for c in &commits {
                    t.insert(
                        (group.as_str(), c.topic.as_str(), c.partition),
                        (c.offset, c.metadata.as_str()),
                    )
                    .map_err(store_err)?;
                }
            }
            tx.commit().map_err(store_err)
        })
        .await
    }

    /// The committed offset of `group` for one partition, if any.
    pub async fn committed(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<CommittedOffset>> {
        let db = self.db.clone();
        let (group, topic) = (group.to_string(), topic.to_string());
        blocking(move || {
            let db = db.get()?;
            let tx = db.begin_read().map_err(store_err)?;
            let t = tx.open_table(OFFSETS).map_err(store_err)?;
            let v = t
                .get((group.as_str(), topic.as_str(), partition))
                .map_err(store_err)?;
            Ok(v.map(|g| {
                let (offset, metadata) = g.value();
                CommittedOffset {
                    offset,
                    metadata: metadata.to_string(),
                }
            }))
        })
        .await
    }

    /// All committed offsets of `group` as `(topic, partition, offset)`, sorted.
    pub async fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, CommittedOffset)>> {
        let db = self.db.clone();
        let group = group.to_string();
        blocking(move || {
            let db = db.get()?;
            let tx = db.begin_read().map_err(store_err)?;
            let t = tx.open_table(OFFSETS).map_err(store_err)?;
            let mut out = Vec::new();
            for item in t.range((group.as_str(), "", 0u32)..).map_err(store_err)? {
                let (k, v) = item.map_err(store_err)?;
                let (g, topic, p) = k.value();
                if g != group {
                    break;
                }
                let (offset, metadata) = v.value();
                out.push((
                    topic.to_string(),
                    p,
                    CommittedOffset {
                        offset,
                        metadata: metadata.to_string(),
                    },
                ));
            }
            Ok(out)
        })
        .await
    }

    /// Names of all groups with at least one committed offset, sorted.
    pub async fn list_groups(&self) -> Result<Vec<String>> {
        let db = self.db.clone();
        blocking(move || {
            let db = db.get()?;
            let tx = db.begin_read().map_err(store_err)?;
            let t = tx.open_table(OFFSETS).map_err(store_err)?;
            let mut out: Vec<String> = Vec::new();
            for item in t.iter().map_err(store_err)? {
                let (k, _) = item.map_err(store_err)?;
                let g = k.value().0;
                if out.last().map(String::as_str) != Some(g) {
                    out.push(g.to_string());
                }
            }
            Ok(out)
        })
        .await
    }

    /// Delete every offset of `group` atomically; returns how many were removed.
    pub async fn delete_group(&self, group: &str) -> Result<usize> {
        let db = self.db.clone();
        let group = group.to_string();
        blocking(move || {
            let db = db.get()?;
            let tx = db.begin_write().map_err(store_err)?;
            let n;
            {
                let mut t = tx.open_table(OFFSETS).map_err(store_err)?;
                let mut keys = Vec::new();
                for item in t.range((group.as_str(), "", 0u32)..).map_err(store_err)? {
                    let (k, _) = item.map_err(store_err)?;
                    let (g, topic, p) = k.value();
                    if g != group {
                        break;
                    }
                    keys.push((topic.to_string(), p));
                }
                for (topic, p) in &keys {
                    t.remove((group.as_str(), topic.as_str(), *p))
                        .map_err(store_err)?;
                }
                n = keys.len();
            }
            tx.commit().map_err(store_err)?;
            Ok(n)
        })
        .await
    }
}

/// One operation of an atomic [`Kv::batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Insert or overwrite.
    Put(Bytes, Bytes),
    /// Remove (no-op if absent).
    Delete(Bytes),
}

/// A generic ordered key/value table for small side state. Cheap to clone.
#[derive(Clone)]
pub struct Kv {
    pub(crate) db: Arc<StateDb>,
    pub(crate) _log: LogRef,
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kv")
    }
}

impl Kv {
    /// Insert or overwrite `key`, durably.
    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<()> {
        self.batch(vec![KvOp::Put(key.into(), value.into())]).await
    }

    /// Remove `key`, durably (no-op if absent).
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<()> {
        self.batch(vec![KvOp::Delete(key.into())]).await
    }

    /// Apply all `ops` in order in one transaction: all or none, durably.
    pub async fn batch(&self, ops: Vec<KvOp>) -> Result<()> {
        let db = self.db.clone();
        blocking(move || {
            let db = db.get()?;
            let tx = db.begin_write().map_err(store_err)?;
            {
                let mut t = tx.open_table(KV).map_err(store_err)?;
                for op in &ops {
                    match op {
                        KvOp::Put(k, v) => {
                            t.insert(&k[..], &v[..]).map_err(store_err)?;
                        }
                        KvOp::Delete(k) => {
                            t.remove(&k[..]).map_err(store_err)?;
                        }
                    }
                }
            }
            tx.commit().map_err(store_err)
        })
        .await
    }

    /// The value of `key`, if present.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>> {
        let db = self.db.clone();
        let key = key.into();
        blocking(move || {
            let db = db.get()?;
            let tx = db.begin_read().map_err(store_err)?;
            let t = tx.open_table(KV).map_err(store_err)?;
            let v = t.get(&key[..]).map_err(store_err)?;
            Ok(v.map(|g| Bytes::copy_from_slice(g.value())))
        })
        .await
    }

    /// All entries whose key starts with `prefix`, in key order.
    pub async fn scan_prefix(&self, prefix: impl Into<Bytes>) -> Result<Vec<(Bytes, Bytes)>> {
        let db = self.db.clone();
        let prefix = prefix.into();
        blocking(move || {
            let db = db.get()?;
            let tx = db.begin_read().map_err(store_err)?;
            let t = tx.open_table(KV).map_err(store_err)?;
            let mut out = Vec::new();
            for item in t.range(&prefix[..]..).map_err(store_err)? {
                let (k, v) = item.map_err(store_err)?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                out.push((
                    Bytes::copy_from_slice(k.value()),
                    Bytes::copy_from_slice(v.value()),
                ));
            }
            Ok(out)
        })
        .await
    }
}
