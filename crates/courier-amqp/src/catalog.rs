//! Courier's catalog: a stream of JSON records (topic created / deleted, group seen).
//! AMQP 0-9-1 cannot list exchanges or queues, so topics and groups are listed from
//! here. A reader appends a marker of its own and reads from the first record until
//! it meets that marker: it knows where the end is without guessing with timeouts,
//! and concurrent readers never disturb each other (streams are non-destructive).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier_core::{Error, Result, TopicSpec};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};

use crate::config::ExchangeKind;
use crate::conn::{attach, declare_stream, err, stream_args, Shared, StreamStart};
use crate::names::CATALOG;
use crate::BACKEND;

const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// One catalog record.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Entry {
    /// A topic was created.
    Topic {
        /// Topic settings as created.
        spec: TopicSpec,
        /// Exchange type.
        exchange: ExchangeKind,
    },
    /// A topic was deleted.
    Delete {
        /// Topic name.
        name: String,
    },
    /// A group subscribed to topics.
    Group {
        /// Group id.
        group: String,
        /// Topics.
        topics: Vec<String>,
    },
    /// A reader's end marker.
    Mark {
        /// Unique per read.
        id: String,
    },
}

/// A topic as the catalog knows it.
#[derive(Clone, Debug)]
pub struct TopicMeta {
    /// Settings as created.
    pub spec: TopicSpec,
    /// Exchange type.
    pub exchange: ExchangeKind,
}

/// The catalog folded into current state.
#[derive(Default, Debug)]
pub struct State {
    /// Live topics.
    pub topics: BTreeMap<String, TopicMeta>,
    /// Groups and the topics they subscribed to (topics may since be deleted).
    pub groups: BTreeMap<String, BTreeSet<String>>,
}

impl State {
    fn apply(&mut self, e: Entry) {
        match e {
            Entry::Topic { spec, exchange } => {
                self.topics
                    .insert(spec.name.clone(), TopicMeta { spec, exchange });
            }
            Entry::Delete { name } => {
                self.topics.remove(&name);
            }
            Entry::Group { group, topics } => {
                self.groups.entry(group).or_default().extend(topics);
            }
            Entry::Mark { .. } => {}
        }
    }
}

/// Declares the catalog stream (idempotent).
pub async fn declare(ch: &Channel) -> Result<()> {
    declare_stream(ch, CATALOG, stream_args(None, None)).await
}

/// Appends `e` and waits for the broker's confirm.
pub async fn append(shared: &Shared, e: &Entry) -> Result<()> {
    let body = serde_json::to_vec(e)?;
    let ch = shared.channel().await?;
    ch.confirm_select(Default::default()).await.map_err(err)?;
    let confirm = ch
        .basic_publish(
            "".into(),
            CATALOG.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(err)?
        .await
        .map_err(err)?;
    let _ = ch.close(200, "done".into()).await;
    if confirm.is_nack() {
        return Err(Error::backend(BACKEND, "catalog write was not confirmed"));
    }
    Ok(())
}

/// Reads the whole catalog. Connection-level failures are retried (bounded by
/// [`READ_TIMEOUT`]): right after a broker restart a stream that exists may not have
/// started yet, and the broker answers a consume with a hard error
/// (`stream_not_found`) that closes the connection.
pub async fn read(shared: &Shared) -> Result<State> {
    let attempts = async {
        let mut wait = Duration::from_millis(100);
        loop {
            match read_inner(shared).await {
                Err(e @ Error::Connection { .. }) if wait <= READ_RETRY_MAX_WAIT => {
                    tracing::debug!(error = %e, ?wait, "catalog read failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                r => return r,
            }
        }
    };
    tokio::time::timeout(READ_TIMEOUT, attempts)
        .await
        .map_err(|_| Error::Timeout(READ_TIMEOUT))?
}

/// Longest wait between catalog read attempts (100 ms doubling: 5 retries, ≈ 3 s).
const READ_RETRY_MAX_WAIT: Duration = Duration::from_millis(1600);

async fn read_inner(shared: &Shared) -> Result<State> {
    let ch = shared.channel().await?;
    let mut consumer = attach(&ch, CATALOG, "courier-catalog", 2000, StreamStart::First).await?;
    let mark = ulid::Ulid::new().to_string();
    append(shared, &Entry::Mark { id: mark.clone() }).await?;
    let mut state = State::default();
    let mut unacked = 0u32;
    while let Some(d) = consumer.next().await {
        let d = d.map_err(err)?;
        unacked += 1;
        if unacked >= 500 {
            d.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .map_err(err)?;
            unacked = 0;
        }
        match serde_json::from_slice::<Entry>(&d.data) {
            Ok(Entry::Mark { id }) if id == mark => {
                let _ = ch.close(200, "done".into()).await;
                return Ok(state);
            }
            Ok(e) => state.apply(e),
            Err(e) => tracing::warn!(error = %e, "skipping unreadable catalog record"),
        }
    }
    Err(Error::connection(BACKEND, "catalog consumer ended early"))
}
