//! Error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong in `courier-log`. Operations never panic on bad
/// input or damaged files; they return one of these.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Another `Log` (in this or another process) holds the directory's lock file.
    #[error("log directory is locked by another open Log: {path}")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// An I/O error, with the file it happened on.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `create_topic` on an existing topic.
    #[error("topic already exists: {0}")]
    TopicExists(String),
    /// The topic does not exist (or was deleted).
    #[error("topic not found: {0}")]
    TopicNotFound(String),
    /// The partition index is out of range.
    #[error("partition {partition} of topic {topic} not found")]
    PartitionNotFound {
        /// Topic name.
        topic: String,
        /// Requested partition.
        partition: u32,
    },
    /// Topic names are 1..=249 chars of `[A-Za-z0-9._-]`, not `.` or `..`.
    #[error("invalid topic name: {0:?}")]
    InvalidTopicName(String),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A record is larger than the topic's `max_message_bytes`.
    #[error("record of {size} bytes exceeds max message size {max}")]
    MessageTooLarge {
        /// Encoded size of the record.
        size: usize,
        /// Configured limit.
        max: usize,
    },
    /// `append` with no records.
    #[error("cannot append an empty batch")]
    EmptyBatch,
    /// A read beyond the end of the partition.
    #[error("offset {requested} is beyond the end offset {end}")]
    OffsetOutOfRange {
        /// Requested offset.
        requested: u64,
        /// Current end offset.
        end: u64,
    },
    /// Stored data failed validation where it could not be repaired on open
    /// (e.g. a bit flip inside an already sealed segment). Data before it is
    /// still served; `resume_at` is the first offset known to be readable after it.
    #[error("corrupt data in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// First offset that cannot be read.
        offset: u64,
        /// What failed.
        reason: String,
        /// Next readable offset (base of the next segment), if any.
        resume_at: Option<u64>,
    },
    /// The topic metadata file is unreadable.
    #[error("bad topic metadata in {path}: {reason}")]
    Metadata {
        /// Metadata file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The log was closed (or its topic deleted) while the operation was pending.
    #[error("log is closed")]
    Closed,
    /// The side-state store (redb) failed. Boxed: redb's error is large and
    /// would bloat every `Result` of the data path.
    #[error("side-state store error: {0}")]
    Store(Box<redb::Error>),
}

/// Result alias for this crate.
pub type Result<T, E = LogError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn ctx(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

pub(crate) fn store_err(e: impl Into<redb::Error>) -> LogError {
    LogError::Store(Box::new(e.into()))
}
