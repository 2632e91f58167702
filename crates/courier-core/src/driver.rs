//! The driver SPI: what a backend implements so that Courier's client, pipeline and
//! conformance suite work on it unchanged (DESIGN §4).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::OffsetReset;
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::message::{Receipt, Record};

/// What a backend does natively. Features that are not native are either built above
/// the driver by `courier` (so behaviour is the same) or reported as unsupported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Topics have partitions with per-partition order.
    pub partitions: bool,
    /// Messages with one key are delivered in send order within a group.
    pub per_key_order: bool,
    /// Consumer groups split partitions and rebalance on join/leave.
    pub group_rebalance: bool,
    /// Stored messages survive a restart of the backend.
    pub durable: bool,
    /// The backend offers idempotent produce (no duplicates on retry).
    pub idempotent_produce: bool,
    /// The backend delays messages natively.
    pub delayed_delivery: bool,
    /// The backend compresses natively (so Courier need not).
    pub native_compression: bool,
    /// Offsets are dense (0, 1, 2 …) per partition, so lag = end − committed.
    pub dense_offsets: bool,
    /// How many `publish` calls a producer may have in flight without breaking per-key
    /// order (1 unless the driver preserves order across concurrent calls).
    pub max_in_flight_publishes: usize,
    /// [`Driver::read_records`] works: a crash of Courier's scheduler between moving
    /// due messages and recording the move repeats nothing (it looks the interrupted
    /// batch up in the targets). Without it a crash in that window delivers those
    /// messages again, same id.
    pub read_by_position: bool,
    /// [`Driver::read_records`] is cheap enough (a local read or one round trip) to
    /// read every due delayed message back by position: the scheduler then keeps only
    /// a 24-byte index entry per pending delayed message instead of its payload. Only
    /// meaningful with `read_by_position`.
    pub index_by_position: bool,
    /// A record published with the header [`HEADER_STORE_ONCE`](crate::HEADER_STORE_ONCE)
    /// is stored at most once per message id within the backend's de-duplication
    /// window (the header itself is not stored). Courier's scheduler sets it on every
    /// move there, so a move repeated within that window (after a crash or a
    /// hand-over between the move and its record) is not stored twice.
    pub store_once: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            partitions: true,
            per_key_order: true,
            group_rebalance: true,
            durable: false,
            idempotent_produce: false,
            delayed_delivery: false,
            native_compression: false,
            dense_offsets: true,
            max_in_flight_publishes: 1,
            read_by_position: false,
            index_by_position: false,
            store_once: false,
        }
    }
}

/// One partition of one topic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
}

impl TopicPartition {
    /// `topic`/`partition`.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// What to subscribe to and how.
#[derive(Clone, Debug)]
pub struct SubscribeSpec {
    /// Consumer group id (non-empty).
    pub group: String,
    /// Topics (non-empty).
    pub topics: Vec<String>,
    /// Where to start when the group has no committed position.
    pub auto_offset_reset: OffsetReset,
    /// A member silent this long is considered dead and its partitions move.
    pub session_timeout: Duration,
    /// How often acknowledged positions are committed in the background.
    pub commit_interval: Duration,
    /// Most deliveries handed out and not yet settled, per member. The default, 8192,
    /// lets a member of a few partitions keep reading full batches (Redis: 1000 per
    /// partition) while the previous half is still being handled.
    pub prefetch: usize,
    /// A partition taken over while deliveries of it are still unsettled (the last
    /// owner crashed, or gave them back at the hand-over) is read again in log order
    /// from its oldest unsettled message, messages settled after it included — what
    /// log backends (committed prefix) do anyway. Backends that settle each message
    /// on its own otherwise redeliver only the unsettled ones, late and out of order.
    /// Courier's scheduler needs it so its catch-up sees moved markers and intents
    /// before the entries they settle. Default off.
    pub replay_after_takeover: bool,
}

impl SubscribeSpec {
    /// A spec with Courier's defaults for `group` and `topics`.
    pub fn new(group: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            group: group.into(),
            topics,
            auto_offset_reset: OffsetReset::Latest,
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            prefetch: 8192,
            replay_after_takeover: false,
        }
    }
}

/// A live group membership handing out deliveries.
#[async_trait]
pub trait Subscription: Send {
    /// Up to `max` deliveries; waits until at least one is available. `Ok(None)` once
    /// the subscription is closed.
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Delivery>>>;
    /// Partitions this member currently owns.
    fn assignment(&self) -> Vec<TopicPartition>;
    /// True while the member is connected to its backend.
    fn is_connected(&self) -> bool {
        true
    }
    /// Commits every acknowledged contiguous prefix and leaves the group.
    async fn close(&mut self) -> Result<()>;
}

/// Topic settings for creation (SPEC A1). Missing fields deserialize to one
/// partition, replication factor 1 and backend defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Number of partitions (≥ 1).
    pub partitions: u32,
    /// Replicas per partition, where the backend replicates.
    pub replication_factor: u16,
    /// Keep messages this long (ms); `None` = backend default.
    pub retention_ms: Option<i64>,
    /// Keep at most this many bytes per partition.
    pub retention_bytes: Option<u64>,
    /// Largest accepted message (key + value + headers).
    pub max_message_size: Option<usize>,
    /// Other settings (`cleanup.policy`, `compression.type` …).
    pub config: BTreeMap<String, String>,
}

impl Default for TopicSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            partitions: 1,
            replication_factor: 1,
            retention_ms: None,
            retention_bytes: None,
            max_message_size: None,
            config: BTreeMap::new(),
        }
    }
}

impl TopicSpec {
    /// A topic with `partitions` partitions and defaults otherwise.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        Self {
            name: name.into(),
            partitions,
            ..Default::default()
        }
    }
}

/// One partition's extent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionInfo {
    /// Partition number.
    pub partition: u32,
    /// First available offset.
    pub start_offset: u64,
    /// Offset the next message will get (high watermark).
    pub end_offset: u64,
}

/// A topic as the backend reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Partitions with their extents.
    pub partitions: Vec<PartitionInfo>,
    /// Replication factor.
    pub replication_factor: u16,
    /// Effective settings.
    pub config: BTreeMap<String, String>,
}

impl TopicInfo {
    /// Messages currently stored (sum of partition extents).
    pub fn message_count(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.end_offset.saturating_sub(p.start_offset))
            .sum()
    }
}

/// A group member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberInfo {
    /// Member id.
    pub member_id: String,
    /// Partitions it owns.
    pub assignment: Vec<TopicPartition>,
}

/// A group's position in one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Next offset the group will read, if it committed one.
    pub committed: Option<u64>,
    /// End of the partition.
    pub end_offset: u64,
    /// Messages not yet consumed (`end − committed`), where computable.
    pub lag: u64,
    /// Delivered but not yet acknowledged (queue backends).
    pub pending: Option<u64>,
}

/// A consumer group as the backend reports it (SPEC A2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupInfo {
    /// Group id.
    pub group: String,
    /// Live members.
    pub members: Vec<MemberInfo>,
    /// Per-partition positions.
    pub offsets: Vec<GroupOffset>,
}

impl GroupInfo {
    /// Sum of lag over all partitions.
    pub fn total_lag(&self) -> u64 {
        self.offsets.iter().map(|o| o.lag).sum()
    }
}

/// Where to move a group's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ResetTo {
    /// First available offset.
    Earliest,
    /// End of the partition.
    Latest,
    /// First offset with a timestamp ≥ this (ms since the epoch).
    Timestamp(i64),
    /// This exact offset.
    Offset(u64),
}

/// A backend. Implementations are cheap to share (`Arc<dyn Driver>`) and safe to call
/// concurrently. Admin calls a backend cannot serve return [`Error::Unsupported`].
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Short backend name (`memory`, `file`, `kafka` …).
    fn name(&self) -> &'static str;

    /// What is native on this backend.
    fn capabilities(&self) -> Capabilities;

    /// Stores a batch. On success every record is stored and the receipts are in input
    /// order. On error, [`Error::BatchSendFailed`] says how many were not stored.
    async fn publish(&self, batch: Vec<Record>) -> Result<Vec<Receipt>>;

    /// Joins `spec.group` and starts handing out deliveries.
    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>>;

    /// Round trip to the backend proving it serves requests.
    async fn health(&self) -> Result<()>;

    /// Releases connections; pending work of this driver is finished first.
    async fn close(&self) -> Result<()>;

    /// Number of partitions of `topic`, if it exists.
    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        match self.describe_topic(topic).await {
            Ok(t) => Ok(Some(t.partitions.len() as u32)),
            Err(Error::TopicNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a topic; [`Error::TopicExists`] if it exists.
    async fn create_topic(&self, spec: TopicSpec) -> Result<()>;

    /// Deletes a topic and its data; [`Error::TopicNotFound`] if absent.
    async fn delete_topic(&self, name: &str) -> Result<()>;

    /// Names of all topics, sorted.
    async fn list_topics(&self) -> Result<Vec<String>>;

    /// A topic's partitions and config; [`Error::TopicNotFound`] if absent.
    async fn describe_topic(&self, name: &str) -> Result<TopicInfo>;

    /// Changes topic settings.
    async fn update_topic_config(
        &self,
        _name: &str,
        _config: BTreeMap<String, String>,
    ) -> Result<()> {
        Err(Error::Unsupported {
            feature: "update topic config",
            backend: self.name(),
        })
    }

    /// Grows a topic to `total` partitions.
    async fn add_partitions(&self, _name: &str, _total: u32) -> Result<()> {
        Err(Error::Unsupported {
            feature: "add partitions",
            backend: self.name(),
        })
    }

    /// Known consumer groups, sorted.
    async fn list_groups(&self) -> Result<Vec<String>>;

    /// Members and per-partition positions of a group.
    async fn describe_group(&self, group: &str) -> Result<GroupInfo>;

    /// Up to `max` records of `tp` from `from` on, with their offsets (starting at the
    /// first available offset when `from` was deleted; empty past the end), on backends
    /// that read by position (the embedded logs). Lets Courier's scheduler keep only an
    /// index entry per pending delayed message instead of its payload.
    async fn read_records(
        &self,
        _tp: &TopicPartition,
        _from: u64,
        _max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        Err(Error::Unsupported {
            feature: "read by position",
            backend: self.name(),
        })
    }

    /// Moves a group's committed position on `topic` (all partitions).
    async fn reset_offsets(&self, _group: &str, _topic: &str, _to: ResetTo) -> Result<()> {
        Err(Error::Unsupported {
            feature: "reset offsets",
            backend: self.name(),
        })
    }
}
