//! The consumer pipeline as `tower` middleware around the user's handler (DESIGN §1).
//!
//! Outside in: [`TraceLayer`] (extract context, handler span) → [`DeadLetterLayer`]
//! (publish the exhausted message, then let it be committed) → [`DedupLayer`] (skip ids
//! seen within the window) → [`RetryLayer`] (in-place retries with backoff) →
//! [`DecompressLayer`] (undo lz4) → [`MetricsLayer`] (per-attempt counts, e2e
//! latency) → the user's own tower layers → the handler. `Ok` from the stack commits
//! the message; `Err` leaves it uncommitted (redelivered). [`DefaultStack`] is that
//! stack with a fused path for plain deliveries (same behaviour, fewer futures).

pub(crate) mod dead_letter;
mod decompress;
mod dedup;
mod handler;
mod metrics;
#[cfg(feature = "redis-dedup")]
mod redis_dedup;
mod retry;
mod stack;
mod trace;

pub use dead_letter::{DeadLetterLayer, DeadLetterService, HEADERS as DEAD_LETTER_HEADERS};
pub use decompress::{DecompressLayer, DecompressService};
pub use dedup::{DedupLayer, DedupService, DedupStore, MemoryDedupStore};
pub use handler::{BoxedHandler, Handler, HandlerFn};
pub use metrics::{MetricsLayer, MetricsService};
#[cfg(feature = "redis-dedup")]
pub use redis_dedup::RedisDedupStore;
pub use retry::{Backoff, Exhausted, Interrupted, Permanent, RetryLayer, RetryService};
pub(crate) use stack::StackParts;
pub use stack::{DefaultStack, FusedFuture};
pub use trace::{TraceLayer, TraceService};
