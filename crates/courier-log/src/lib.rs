//! `courier-log`: Courier's embedded durable log storage engine.
//!
//! Kafka's design, small. A [`Log`] is a directory holding topics; each topic
//! has partitions; each partition is a directory of segment files named by
//! their base offset (`00000000000000000000.log`) with a sparse offset index
//! (`.index`) and a time index (`.timeindex`). Records are stored in
//! CRC-32C-checked batches ([`codec`]). One writer thread serialises appends
//! and implements group commit; readers use `pread` and never block it.
//! Consumer group offsets and small key/value side state live in `redb`.
//!
//! Layout of a log directory:
//!
//! ```text
//! DIR/LOCK                         flock'ed while open (second open fails)
//! DIR/state.redb                   group offsets + kv side state
//! DIR/topics/NAME/topic.json       topic config (partitions, retention, fsync, ...)
//! DIR/topics/NAME/P/<base>.log     segment data
//! DIR/topics/NAME/P/<base>.index   offset index (rel offset -> position)
//! DIR/topics/NAME/P/<base>.timeindex
//! ```

#![deny(missing_docs)]

pub mod codec;
mod config;
mod error;
mod log;
mod partition;
mod segment;
mod store;
mod writer;

pub use bytes::Bytes;
pub use codec::Record;
pub use config::{FsyncPolicy, LogOptions, TopicConfig};
pub use error::{LogError, Result};
pub use log::{validate_topic_name, Log};
pub use partition::{AppendResult, Partition, ReadResult, StoredRecord};
pub use store::{CommittedOffset, Kv, KvOp, OffsetCommit, Offsets};
