//! In-process Courier drivers.
//!
//! [`LogDriver`] turns any partitioned log ([`LogStore`]) into a full Courier
//! [`Driver`](courier_core::Driver): key hashing, consumer groups with assignment and
//! rebalance, per-message acks with contiguous-prefix commits, nack with rewind, and
//! admin. [`MemoryStore`] is the `memory://` backend; the `file://` backend plugs the
//! embedded durable log into the same driver.

mod driver;
mod group;
mod memory;
mod store;
mod subscription;

pub use driver::LogDriver;
pub use group::Coordinator;
pub use memory::{MemoryPartition, MemoryStore};
pub use store::{LogStore, PartitionLog, StoredRecord, Topic};

/// A `memory://` driver: [`LogDriver`] over [`MemoryStore`].
pub type MemoryDriver = LogDriver<MemoryStore>;
