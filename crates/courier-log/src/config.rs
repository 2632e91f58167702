//! Log and topic configuration.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::error::{LogError, Result};

/// When appended data is forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Group commit: an append's future resolves only after an `fdatasync`
    /// covering it; concurrent appends (on any partitions of the log) share one
    /// sync round. An acknowledged append survives `kill -9` and power loss.
    Always,
    /// A background flusher `fdatasync`s dirty partitions every this many
    /// milliseconds. An acknowledged append is in the page cache, so it
    /// survives `kill -9`; power loss loses at most about the last interval.
    Interval(u64),
    /// Never sync explicitly (the OS writes back when it likes). An
    /// acknowledged append survives `kill -9`; power loss may lose anything
    /// not yet written back.
    Never,
}

/// Per-topic configuration, persisted in the topic's metadata file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TopicConfig {
    /// Number of partitions (> 0). Only grows (`add_partitions`).
    pub partitions: u32,
    /// Delete sealed segments whose newest record is older than this; `None` = keep.
    pub retention_ms: Option<u64>,
    /// Delete oldest sealed segments while the partition exceeds this size; `None` = keep.
    pub retention_bytes: Option<u64>,
    /// Roll the active segment before it would exceed this many bytes.
    pub segment_bytes: u64,
    /// Roll the active segment once it is this old (ms since its first append).
    pub segment_ms: Option<u64>,
    /// Largest accepted encoded record in bytes.
    pub max_message_bytes: usize,
    /// Durability policy of appends.
    pub fsync: FsyncPolicy,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            // Smaller than Kafka's 1 GiB: the tail segment is re-scanned on every
            // open, so its size bounds recovery time.
            segment_bytes: 64 * 1024 * 1024,
            segment_ms: Some(7 * 24 * 3600 * 1000),
            max_message_bytes: 1024 * 1024,
            fsync: FsyncPolicy::Interval(1000),
        }
    }
}

impl TopicConfig {
    /// Check ranges; returns `InvalidConfig` describing the first problem.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: &str| Err(LogError::InvalidConfig(s.to_string()));
        if self.partitions == 0 {
            return bad("partitions must be > 0");
        }
        // Index positions are u32 and a segment may overshoot by one batch (<= 1 GiB).
        if self.segment_bytes < 1024 || self.segment_bytes > 1 << 31 {
            return bad("segment_bytes must be in 1 KiB ..= 2 GiB");
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > 256 * 1024 * 1024 {
            return bad("max_message_bytes must be in 1 ..= 256 MiB");
        }
        if let FsyncPolicy::Interval(0) = self.fsync {
            return bad("fsync interval must be > 0 ms");
        }
        Ok(())
    }
}

/// Options of a whole [`crate::Log`].
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Bytes of log data between sparse offset/time index entries.
    pub index_interval_bytes: u32,
    /// How often the background task enforces retention; `None` disables it
    /// (call [`crate::Log::enforce_retention`] yourself).
    pub retention_check_interval: Option<Duration>,
    /// Bound on queued appends before `append` waits (back-pressure).
    pub write_queue: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            index_interval_bytes: 4096,
            retention_check_interval: Some(Duration::from_secs(30)),
            write_queue: 8192,
        }
    }
}
