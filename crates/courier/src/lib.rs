//! Courier: one small producer/consumer API over an embedded durable log and the
//! brokers teams grow into, chosen by URL.
//!
//! ```
//! use courier::{Client, Message};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> courier::Result<()> {
//! let client = Client::connect("memory://doc").await?;
//! let receipt = client
//!     .producer()
//!     .send(Message::new("user.events", "hello").key("user-1"))
//!     .await?;
//! assert_eq!(receipt.topic, "user.events");
//! client.shutdown(std::time::Duration::from_secs(5)).await?;
//! # Ok(())
//! # }
//! ```

/// The README's code blocks, compiled as doc-tests so the README never lies.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub mod alerts;
mod client;
mod compress;
mod connect;
mod consumer;
mod dead_letters;
pub mod live;
pub mod pipeline;
mod producer;
mod schedule;
pub mod stats;
pub mod trace;
mod txn;
mod validate;

pub use alerts::{Alert, AlertEvaluator, AlertRules, AlertState};
pub use client::{Admin, Client};
pub use compress::{DEFAULT_THRESHOLD as COMPRESSION_THRESHOLD, HEADER_CONTENT_ENCODING};
pub use connect::supported_schemes;
pub use consumer::{ConsumerBuilder, ConsumerHandle, FailurePolicy};
pub use courier_core::{
    config, murmur2, now_millis, partition_for_key, Acks, BoxError, Capabilities, Config,
    ConsumerConfig, Delivery, Driver, Env, Error, GroupInfo, GroupOffset, Headers, MemberInfo,
    Message, OffsetReset, PartitionInfo, ProducerConfig, Receipt, Record, ResetTo, Result,
    TopicInfo, TopicPartition, TopicSpec,
};
pub use dead_letters::{
    DeadLetter, DeadLetters, LetterFilter, RedriveReport, Selection, HEADER_REDRIVEN_ID,
};
pub use live::{ConfigSource, FileConfigSource};
#[cfg(feature = "redis-dedup")]
pub use pipeline::RedisDedupStore;
pub use pipeline::{Backoff, DedupStore, MemoryDedupStore, Permanent};
pub use producer::{Producer, SendHandle};
pub use schedule::{ScheduleOptions, HEADER_DELAY_UNTIL, SCHEDULE_PREFIX};
pub use stats::{install_prometheus_recorder, StatsSnapshot, TopicStats};
pub use trace::{TraceContext, TraceScope};
pub use txn::{Half, HalfMessage, Transactions, TxnChecker, TxnDecision};
pub use validate::validate_topic;
