//! Transactional (half) messages, RocketMQ's two-phase model (SPEC P4).
//!
//! [`Producer::prepare`](crate::Producer::prepare) stores a half message: durable, but
//! invisible to consumers. [`Half::commit`] makes it visible (once, with its id),
//! [`Half::rollback`] discards it. A half still undecided at its check time is handed
//! to the [`TxnChecker`] registered with [`Transactions::set_checker`], which answers
//! from the application's own state.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use courier_core::{Headers, Receipt, Result};

use crate::schedule::Scheduler;

/// A check-back's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnDecision {
    /// The local transaction committed: deliver the half.
    Commit,
    /// The local transaction failed: discard the half.
    Rollback,
    /// Not known yet: ask again after the check interval (up to the check limit, then
    /// the half is rolled back and a warning logged).
    Unknown,
}

/// A half message as shown to a [`TxnChecker`].
#[derive(Clone, Debug)]
pub struct HalfMessage {
    /// The half's id (also the id the message is delivered with).
    pub id: String,
    /// Destination topic.
    pub topic: String,
    /// Key.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Bytes,
    /// Headers as given to `prepare`.
    pub headers: Headers,
    /// When it was prepared, ms since the epoch.
    pub timestamp: i64,
    /// How many times it was checked before (0 on the first check).
    pub checks: u32,
}

/// Answers check-backs for halves left undecided: the application looks up whether
/// its local transaction for `half` committed.
#[async_trait]
pub trait TxnChecker: Send + Sync + 'static {
    /// Commit, roll back, or ask again later.
    async fn check(&self, half: &HalfMessage) -> TxnDecision;
}

#[async_trait]
impl<F> TxnChecker for F
where
    F: Fn(&HalfMessage) -> TxnDecision + Send + Sync + 'static,
{
    async fn check(&self, half: &HalfMessage) -> TxnDecision {
        self(half)
    }
}

/// Decides halves by id (after a restart, or from another process sharing the
/// scheduler scope, e.g. the REST server). Cheap to clone.
#[derive(Clone)]
pub struct Transactions {
    pub(crate) sched: Arc<Scheduler>,
}

impl Transactions {
    /// Makes half `id` visible. Durable when this returns; delivery follows as soon as
    /// the scheduler member owning the half processes the decision.
    /// [`Error::TxnNotFound`](courier_core::Error::TxnNotFound) when this client's
    /// member owns the half and holds no such undecided half (never prepared, already
    /// decided, rolled back by check-back). A decision for a half owned by another
    /// member is written and applied by that member (ignored there when unknown).
    pub async fn commit(&self, id: &str) -> Result<()> {
        self.sched.decide(id, true).await
    }

    /// Discards half `id`; it is never delivered. Same rules as [`Transactions::commit`].
    pub async fn rollback(&self, id: &str) -> Result<()> {
        self.sched.decide(id, false).await
    }

    /// Registers the check-back callback for halves this client's scheduler member
    /// owns. Without one, every check answers [`TxnDecision::Unknown`].
    pub fn set_checker(&self, checker: impl TxnChecker) {
        *self.sched.checker.write() = Some(Arc::new(checker));
    }
}

/// A prepared half message: stored, not visible until committed.
#[must_use = "a half is rolled back by check-back unless committed"]
pub struct Half {
    pub(crate) id: String,
    pub(crate) receipt: Receipt,
    pub(crate) txns: Transactions,
}

impl Half {
    /// The half's id: the id the message is delivered with, and the id to decide it by
    /// via [`Transactions`].
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the half is stored (a schedule-log position, not the target's).
    pub fn receipt(&self) -> &Receipt {
        &self.receipt
    }

    /// Makes the message visible (exactly this id, once).
    pub async fn commit(self) -> Result<()> {
        self.txns.commit(&self.id).await
    }

    /// Discards the message.
    pub async fn rollback(self) -> Result<()> {
        self.txns.rollback(&self.id).await
    }
}
