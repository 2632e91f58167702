//! Courier's core: the types every backend and every user share, and the driver SPI.
//!
//! This crate does no I/O. It defines [`Message`] (what a producer sends), [`Record`]
//! (a message after the producer pipeline, as a driver receives it), [`Receipt`] (what a
//! send returns), [`Delivery`] (what a consumer handles), the one [`Error`] enum, the
//! configuration types ([`Config`]) and the [`Driver`] trait that backends implement.

pub mod config;
pub mod delivery;
pub mod driver;
pub mod error;
pub mod message;
pub mod partitioner;

pub use config::{
    Acks, Config, ConsumerConfig, Env, OffsetReset, ProducerConfig, SaslMechanism, SecurityProtocol,
};
pub use delivery::{AckHandle, AckToken, Acker, Delivery};
pub use driver::{
    Capabilities, Driver, GroupInfo, GroupOffset, MemberInfo, PartitionInfo, ResetTo,
    SubscribeSpec, Subscription, TopicInfo, TopicPartition, TopicSpec,
};
pub use error::{BoxError, Error, Result};
pub use message::{now_millis, ulid_millis, Headers, Message, Receipt, Record};
pub use partitioner::{murmur2, partition_for_key};

/// Header asking a backend that declares [`Capabilities::store_once`] to store the
/// record at most once per message id (within its de-duplication window); such a
/// driver consumes it, so it is never delivered.
pub const HEADER_STORE_ONCE: &str = "x-courier-store-once";

/// Header carrying the message id on backends without a native id field.
pub const HEADER_MESSAGE_ID: &str = "x-message-id";
