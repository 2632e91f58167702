//! Listing and re-driving dead letters (SPEC R3, seed 004 `GET /dead-letters`,
//! `POST /dead-letters/retry`).
//!
//! A dead-letter topic is an append-only log, so "removing" a re-driven letter is
//! done with a marker: after a letter was re-published to its original topic, a
//! marker record (empty value, header `x-redriven-id: <letter id>`) is appended to the
//! dead-letter topic, and listings hide marked letters and the markers themselves.
//!
//! Listing reads the topic from the start to the end offsets it had when the call
//! began, through a throwaway consumer group (`courier.dead-letters.browse.<ulid>`)
//! that nobody else uses; the groups the letters came from are not touched.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier_core::{Delivery, Error, Headers, Message, OffsetReset, Record, Result, SubscribeSpec};
use serde::{Deserialize, Serialize};

use crate::pipeline::dead_letter as dl;
use crate::validate::validate_topic;
use crate::Client;

/// Header of a marker record: the id of the letter that was re-driven.
pub const HEADER_REDRIVEN_ID: &str = "x-redriven-id";

/// How long a listing waits for the backend before returning what it has.
const LIST_PATIENCE: Duration = Duration::from_secs(60);
/// On backends without dense offsets, a listing ends after this long without news.
const LIST_IDLE: Duration = Duration::from_secs(2);

/// One dead letter: the original message and why it failed. Serializable as the REST
/// API returns it (camelCase; bytes as arrays of numbers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Id of the letter (its message id in the dead-letter topic); what
    /// [`Selection::Ids`] matches.
    pub id: String,
    /// Dead-letter topic it is stored in.
    pub dlq_topic: String,
    /// Partition in the dead-letter topic.
    pub dlq_partition: u32,
    /// Offset in the dead-letter topic.
    pub dlq_offset: u64,
    /// `x-original-topic`.
    pub original_topic: String,
    /// `x-original-partition`.
    pub original_partition: Option<u32>,
    /// `x-original-offset`.
    pub original_offset: Option<u64>,
    /// `x-original-id`: the message id it had (and gets again on re-drive).
    pub original_id: Option<String>,
    /// `x-error-message`.
    pub error: String,
    /// `x-consumer-group`.
    pub group: String,
    /// `x-retry-count`.
    pub retry_count: u32,
    /// `x-failed-at`, ms since the epoch.
    pub failed_at: i64,
    /// Original key.
    pub key: Option<Bytes>,
    /// Original value, byte for byte (still compressed if it was).
    pub value: Bytes,
    /// Original headers (without the dead-letter headers).
    pub headers: Headers,
}

impl DeadLetter {
    fn from_delivery(d: &Delivery) -> Option<Self> {
        let h = &d.headers;
        let original_topic = h.get_str(dl::ORIGINAL_TOPIC)?.to_string();
        let mut headers = Headers::new();
        for (n, v) in h.iter() {
            if !dl::HEADERS.contains(&n) {
                headers.insert(n, v.clone());
            }
        }
        Some(Self {
            id: d.id.to_string(),
            dlq_topic: d.topic.to_string(),
            dlq_partition: d.partition,
            dlq_offset: d.offset,
            original_topic,
            original_partition: h
                .get_str(dl::ORIGINAL_PARTITION)
                .and_then(|s| s.parse().ok()),
            original_offset: h.get_str(dl::ORIGINAL_OFFSET).and_then(|s| s.parse().ok()),
            original_id: h.get_str(dl::ORIGINAL_ID).map(str::to_string),
            error: h.get_str(dl::ERROR_MESSAGE).unwrap_or_default().to_string(),
            group: h
                .get_str(dl::CONSUMER_GROUP)
                .unwrap_or_default()
                .to_string(),
            retry_count: h
                .get_str(dl::RETRY_COUNT)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            failed_at: h
                .get_str(dl::FAILED_AT)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            key: d.key.clone(),
            value: d.value.clone(),
            headers,
        })
    }
}

/// A filter over letters that can travel as JSON (every given field must match).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LetterFilter {
    /// Only letters from this original topic.
    pub original_topic: Option<String>,
    /// Only letters given up by this group.
    pub group: Option<String>,
    /// Only letters whose error message contains this text.
    pub error_contains: Option<String>,
}

impl LetterFilter {
    /// True when `l` matches every given field.
    pub fn matches(&self, l: &DeadLetter) -> bool {
        self.original_topic
            .as_ref()
            .is_none_or(|t| *t == l.original_topic)
            && self.group.as_ref().is_none_or(|g| *g == l.group)
            && self
                .error_contains
                .as_ref()
                .is_none_or(|e| l.error.contains(e.as_str()))
    }
}

/// Which letters to re-drive.
#[derive(Clone)]
pub enum Selection {
    /// Every letter listed.
    All,
    /// Letters with these ids.
    Ids(Vec<String>),
    /// Letters matching a [`LetterFilter`].
    Matching(LetterFilter),
    /// Letters for which the function is true.
    Filter(Arc<dyn Fn(&DeadLetter) -> bool + Send + Sync>),
}

impl fmt::Debug for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selection::All => f.write_str("All"),
            Selection::Ids(ids) => f.debug_tuple("Ids").field(ids).finish(),
            Selection::Matching(m) => f.debug_tuple("Matching").field(m).finish(),
            Selection::Filter(_) => f.write_str("Filter(..)"),
        }
    }
}

impl Selection {
    fn selects(&self, l: &DeadLetter) -> bool {
        match self {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&l.id),
            Selection::Matching(m) => m.matches(l),
            Selection::Filter(f) => f(l),
        }
    }
}

/// What a re-drive did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedriveReport {
    /// Ids of letters published back to their original topic.
    pub redriven: Vec<String>,
    /// Ids of letters that could not be re-published, with the error.
    pub failed: Vec<(String, String)>,
}

/// Dead-letter operations over one client's backend. Made by
/// [`Client::dead_letters`].
#[derive(Clone)]
pub struct DeadLetters {
    client: Client,
}

impl DeadLetters {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Every letter in `dlq_topic` that was not re-driven yet, oldest first per
    /// partition. A missing topic has no letters. Nothing is consumed away: the
    /// letters stay for the next listing.
    pub async fn list(&self, dlq_topic: &str) -> Result<Vec<DeadLetter>> {
        validate_topic(dlq_topic)?;
        let driver = self.client.driver().clone();
        let info = match driver.describe_topic(dlq_topic).await {
            Ok(i) => i,
            Err(Error::TopicNotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let dense = driver.capabilities().dense_offsets;
        let mut remaining: HashMap<u32, u64> = info
            .partitions
            .iter()
            .filter(|p| p.end_offset > p.start_offset)
            .map(|p| (p.partition, p.end_offset))
            .collect();
        if remaining.is_empty() {
            return Ok(Vec::new());
        }
        let group = format!(
            "courier.dead-letters.browse.{}",
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let mut spec = SubscribeSpec::new(group, vec![dlq_topic.to_string()]);
        spec.auto_offset_reset = OffsetReset::Earliest;
        let mut sub = driver.subscribe(spec).await?;
        let mut letters = Vec::new();
        let mut redriven = HashSet::new();
        let deadline = tokio::time::Instant::now() + LIST_PATIENCE;
        let mut last_news = tokio::time::Instant::now();
        let outcome = loop {
            if dense && remaining.is_empty() {
                break Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                tracing::warn!(
                    dlq = dlq_topic,
                    "dead-letter listing incomplete: backend too slow"
                );
                break Ok(());
            }
            if !dense && !letters.is_empty() && now.duration_since(last_news) >= LIST_IDLE {
                break Ok(());
            }
            let batch =
                match tokio::time::timeout(Duration::from_millis(500), sub.next_batch(512)).await {
                    Err(_) => continue,
                    Ok(Ok(Some(b))) => b,
                    Ok(Ok(None)) => break Ok(()),
                    Ok(Err(e)) => break Err(e),
                };
            for d in batch {
                last_news = tokio::time::Instant::now();
                if let Some(end) = remaining.get(&d.partition).copied() {
                    if d.offset + 1 >= end {
                        remaining.remove(&d.partition);
                    }
                    if !dense || d.offset < end {
                        if let Some(id) = d.headers.get_str(HEADER_REDRIVEN_ID) {
                            redriven.insert(id.to_string());
                        } else if let Some(l) = DeadLetter::from_delivery(&d) {
                            letters.push(l);
                        }
                    }
                }
                // Acked so the throwaway group never rewinds; it is not reused.
                d.ack();
            }
        };
        if let Err(e) = sub.close().await {
            tracing::warn!(error = %e, "closing the dead-letter browser failed");
        }
        outcome?;
        letters.retain(|l| !redriven.contains(&l.id));
        Ok(letters)
    }

    /// Re-publishes the letters of `dlq_topic` that `selection` picks to their
    /// original topics (original key, value, headers and message id), at most
    /// `per_second` per second (0 = no limit), and marks each as re-driven.
    pub async fn redrive(
        &self,
        dlq_topic: &str,
        selection: &Selection,
        per_second: u32,
    ) -> Result<RedriveReport> {
        let letters: Vec<DeadLetter> = self
            .list(dlq_topic)
            .await?
            .into_iter()
            .filter(|l| selection.selects(l))
            .collect();
        self.redrive_letters(&letters, per_second).await
    }

    /// Re-publishes exactly these letters (e.g. from an earlier [`list`](Self::list))
    /// to their original topics and marks them as re-driven, at most `per_second`
    /// per second (0 = no limit). A letter whose publish fails is not marked.
    pub async fn redrive_letters(
        &self,
        letters: &[DeadLetter],
        per_second: u32,
    ) -> Result<RedriveReport> {
        let driver = self.client.driver().clone();
        let mut report = RedriveReport::default();
        let mut pace = (per_second > 0).then(|| {
            let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_second)));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        for l in letters {
            if let Some(p) = pace.as_mut() {
                p.tick().await;
            }
            let mut msg = Message::new(l.original_topic.clone(), l.value.clone());
            msg.key = l.key.clone();
            msg.headers = l.headers.clone();
            msg.id = l.original_id.clone();
            let back = Record::from_message(msg);
            let mut marker = Message::new(l.dlq_topic.clone(), Bytes::new());
            marker.headers.insert(HEADER_REDRIVEN_ID, l.id.clone());
            marker.partition = Some(l.dlq_partition);
            let marker = Record::from_message(marker);
            // Original first, marker second: a crash in between re-drives the letter
            // again later (at-least-once), never loses it.
            let result = async {
                driver.publish(vec![back]).await?;
                driver.publish(vec![marker]).await
            }
            .await;
            match result {
                Ok(_) => {
                    tracing::info!(id = %l.id, topic = %l.original_topic, "dead letter re-driven");
                    report.redriven.push(l.id.clone());
                }
                Err(e) => {
                    tracing::warn!(id = %l.id, error = %e, "dead letter re-drive failed");
                    report.failed.push((l.id.clone(), e.to_string()));
                }
            }
        }
        Ok(report)
    }
}
