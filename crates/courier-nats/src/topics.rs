//! Topics as JetStream streams: one stream per topic (`COURIER_<token>`), one subject
//! per partition (`courier.<token>.<p>`), retention from the topic spec.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;
use courier_core::{Error, PartitionInfo, Record, Result, TopicInfo, TopicSpec};
use futures::TryStreamExt;

use crate::names;
use crate::BACKEND;

/// Builds the stream configuration of `spec`. `retentionBytes` is per partition in
/// Courier and stream-wide in JetStream, so it is multiplied by the partition count.
pub(crate) fn stream_config(spec: &TopicSpec) -> Result<stream::Config> {
    if spec.partitions == 0 {
        return Err(Error::InvalidArgument(
            "a topic needs at least 1 partition".into(),
        ));
    }
    let max_age = match spec.retention_ms {
        Some(ms) if ms > 0 => Duration::from_millis(ms as u64),
        _ => Duration::ZERO,
    };
    let max_bytes = spec
        .retention_bytes
        .map(|b| {
            b.saturating_mul(u64::from(spec.partitions))
                .min(i64::MAX as u64) as i64
        })
        .unwrap_or(-1);
    let max_message_size = spec
        .max_message_size
        .map(|m| m.min(i32::MAX as usize) as i32)
        .unwrap_or(-1);
    Ok(stream::Config {
        name: names::stream(&spec.name),
        description: Some(format!("{}{}", names::TOPIC_DESCRIPTION, spec.name)),
        subjects: names::subjects(&spec.name, spec.partitions),
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        max_age,
        max_bytes,
        max_messages: -1,
        max_messages_per_subject: -1,
        max_message_size,
        max_consumers: -1,
        num_replicas: usize::from(spec.replication_factor.max(1)),
        allow_direct: true,
        ..Default::default()
    })
}

/// The topic a Courier stream holds, from its description.
pub(crate) fn topic_of(info: &stream::Info) -> Option<String> {
    if !info.config.name.starts_with(names::STREAM_PREFIX) {
        return None;
    }
    info.config
        .description
        .as_deref()?
        .strip_prefix(names::TOPIC_DESCRIPTION)
        .map(str::to_string)
}

/// The stream of `topic`, `None` if it does not exist.
pub(crate) async fn get(js: &Context, topic: &str) -> Result<Option<stream::Stream>> {
    match js.get_stream(names::stream(topic)).await {
        Ok(s) => Ok(Some(s)),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                Ok(None)
            }
            _ => Err(Error::backend(BACKEND, e)),
        },
    }
}

/// Creates the stream of `spec`. With `exclusive`, an existing topic is an error;
/// otherwise creating an existing identical topic succeeds (JetStream's create is
/// idempotent), which lets concurrent implicit creations race safely.
pub(crate) async fn create(js: &Context, spec: &TopicSpec, exclusive: bool) -> Result<()> {
    if exclusive && get(js, &spec.name).await?.is_some() {
        return Err(Error::TopicExists(spec.name.clone()));
    }
    let config = stream_config(spec)?;
    match js.create_stream(config).await {
        Ok(_) => Ok(()),
        Err(e) => match e.kind() {
            CreateStreamErrorKind::JetStream(j)
                if j.error_code() == ErrorCode::STREAM_NAME_EXIST =>
            {
                if exclusive {
                    Err(Error::TopicExists(spec.name.clone()))
                } else {
                    Ok(())
                }
            }
            _ => Err(Error::backend(BACKEND, e)),
        },
    }
}

/// Partition count of a stream (its subject count).
pub(crate) fn partition_count(info: &stream::Info) -> u32 {
    info.config.subjects.len() as u32
}

pub(crate) async fn delete(js: &Context, topic: &str) -> Result<()> {
    if get(js, topic).await?.is_none() {
        return Err(Error::TopicNotFound(topic.to_string()));
    }
    js.delete_stream(names::stream(topic))
        .await
        .map_err(|e| Error::backend(BACKEND, e))?;
    Ok(())
}

/// Every Courier stream's info.
pub(crate) async fn all(js: &Context) -> Result<Vec<stream::Info>> {
    js.streams()
        .try_filter(|i| futures::future::ready(topic_of(i).is_some()))
        .try_collect()
        .await
        .map_err(|e| Error::backend(BACKEND, e))
}

pub(crate) async fn list(js: &Context) -> Result<Vec<String>> {
    let mut names: Vec<String> = all(js).await?.iter().filter_map(topic_of).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The sequence the next message of one partition will get at the earliest, and the
/// partition's stored message count.
pub(crate) async fn partition_extent(
    s: &stream::Stream,
    subject: &str,
    counts: &BTreeMap<String, u64>,
) -> Result<(u64, u64)> {
    let count = counts.get(subject).copied().unwrap_or(0);
    if count == 0 {
        return Ok((0, 0));
    }
    let last = s
        .get_last_raw_message_by_subject(subject)
        .await
        .map_err(|e| Error::backend(BACKEND, e))?;
    Ok((last.sequence + 1, count))
}

/// Stored messages per partition subject.
pub(crate) async fn subject_counts(s: &stream::Stream) -> Result<BTreeMap<String, u64>> {
    let prefix = s.cached_info().config.subjects.first().map(|f| {
        let mut parts: Vec<&str> = f.split('.').collect();
        parts.pop();
        format!("{}.*", parts.join("."))
    });
    let Some(filter) = prefix else {
        return Ok(BTreeMap::new());
    };
    let info = s
        .info_with_subjects(filter)
        .await
        .map_err(|e| Error::backend(BACKEND, e))?;
    info.map_ok(|(subject, n)| (subject, n as u64))
        .try_collect()
        .await
        .map_err(|e| Error::backend(BACKEND, e))
}

/// Longest a read-by-position waits for one fetch (the server answers at once when
/// nothing more is stored; this only bounds a stalled reply).
const READ_EXPIRES: Duration = Duration::from_secs(5);
/// Most messages asked for per fetch.
const READ_BATCH: usize = 1024;

/// Up to `max` records of one partition from stream sequence `from` on, through an
/// ephemeral pull consumer filtered to the partition's subject (no acks, removed
/// afterwards): one consumer create plus one fetch per [`READ_BATCH`], instead of
/// a direct get per message.
pub(crate) async fn read_records(
    js: &Context,
    topic: &str,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<(u64, Record)>> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    use futures::StreamExt;

    let s = get(js, topic)
        .await?
        .ok_or_else(|| Error::TopicNotFound(topic.to_string()))?;
    let subject = names::subject(topic, partition);
    if !s.cached_info().config.subjects.contains(&subject) {
        return Ok(Vec::new());
    }
    let consumer = s
        .create_consumer(pull::Config {
            filter_subject: subject,
            // Sequences start at 1; a trimmed `from` starts at the first kept one.
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            ack_policy: AckPolicy::None,
            // Removed below; this only cleans up after a dropped connection.
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::backend(BACKEND, e))?;
    let max = max.max(1);
    let mut out = Vec::with_capacity(max.min(READ_BATCH));
    let res: Result<()> = async {
        while out.len() < max {
            let mut batch = consumer
                .fetch()
                .max_messages((max - out.len()).min(READ_BATCH))
                .expires(READ_EXPIRES)
                .messages()
                .await
                .map_err(|e| Error::backend(BACKEND, e))?;
            let mut more = false;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| Error::backend(BACKEND, e))?;
                let (seq, published, pending) = match m.info() {
                    Ok(i) => (
                        i.stream_sequence,
                        (i.published.unix_timestamp_nanos() / 1_000_000) as i64,
                        i.pending,
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "message without JetStream metadata skipped");
                        continue;
                    }
                };
                more = pending > 0;
                got += 1;
                let msg = m.message;
                let d = crate::codec::decode(msg.headers.as_ref(), seq, published);
                out.push((
                    seq,
                    Record {
                        topic: topic.to_string(),
                        partition: Some(partition),
                        id: d.id,
                        key: d.key,
                        value: msg.payload,
                        headers: d.headers,
                        timestamp: d.timestamp,
                    },
                ));
            }
            if got == 0 || !more {
                break;
            }
        }
        Ok(())
    }
    .await;
    let name = consumer.cached_info().name.clone();
    if let Err(e) = s.delete_consumer(&name).await {
        tracing::debug!(error = %e, "read consumer not removed; it expires on its own");
    }
    res?;
    out.truncate(max);
    Ok(out)
}

pub(crate) async fn describe(js: &Context, topic: &str) -> Result<TopicInfo> {
    let s = get(js, topic)
        .await?
        .ok_or_else(|| Error::TopicNotFound(topic.to_string()))?;
    let info = s.cached_info().clone();
    let counts = subject_counts(&s).await?;
    let mut partitions = Vec::new();
    for (p, subject) in info.config.subjects.iter().enumerate() {
        let (end, count) = partition_extent(&s, subject, &counts).await?;
        // Offsets are stream sequences shared by all partitions, so a partition's
        // first stored sequence says nothing about its size; start is reported as
        // `end − stored` to keep `message_count` exact.
        partitions.push(PartitionInfo {
            partition: p as u32,
            start_offset: end.saturating_sub(count),
            end_offset: end,
        });
    }
    let mut config = BTreeMap::new();
    let c = &info.config;
    if !c.max_age.is_zero() {
        config.insert("retention.ms".into(), c.max_age.as_millis().to_string());
    }
    if c.max_bytes > 0 {
        config.insert("retention.bytes.stream".into(), c.max_bytes.to_string());
    }
    if c.max_message_size > 0 {
        config.insert("max.message.bytes".into(), c.max_message_size.to_string());
    }
    config.insert("nats.stream".into(), c.name.clone());
    config.insert(
        "nats.storage".into(),
        format!("{:?}", c.storage).to_lowercase(),
    );
    config.insert("nats.messages".into(), info.state.messages.to_string());
    config.insert("nats.bytes".into(), info.state.bytes.to_string());
    Ok(TopicInfo {
        name: topic.to_string(),
        partitions,
        replication_factor: c.num_replicas as u16,
        config,
    })
}

/// Grows a topic by adding partition subjects to its stream.
pub(crate) async fn add_partitions(js: &Context, topic: &str, total: u32) -> Result<()> {
    let s = get(js, topic)
        .await?
        .ok_or_else(|| Error::TopicNotFound(topic.to_string()))?;
    let mut config = s.cached_info().config.clone();
    let now = config.subjects.len() as u32;
    if total <= now {
        return Err(Error::InvalidArgument(format!(
            "topic {topic:?} has {now} partitions; can only grow"
        )));
    }
    config.subjects = names::subjects(topic, total);
    js.update_stream(config)
        .await
        .map_err(|e| Error::backend(BACKEND, e))?;
    Ok(())
}
