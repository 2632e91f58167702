//! Group administration: a group is the set of durable consumers described
//! `courier group: <name>` (one per partition) plus its coordination bucket.

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream;
use async_nats::jetstream::Context;
use courier_core::{Error, GroupInfo, GroupOffset, MemberInfo, ResetTo, Result, TopicPartition};
use futures::TryStreamExt;

use crate::subscription::Settings;
use crate::{names, topics, BACKEND};

/// The configuration of `group`'s durable consumer on one partition.
pub(crate) fn consumer_config(
    group: &str,
    topic: &str,
    partition: u32,
    deliver_policy: DeliverPolicy,
    settings: &Settings,
    prefetch: usize,
) -> pull::Config {
    pull::Config {
        durable_name: Some(names::consumer(group, partition)),
        description: Some(format!("{}{group}", names::GROUP_DESCRIPTION)),
        deliver_policy,
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver,
        filter_subject: names::subject(topic, partition),
        max_ack_pending: prefetch.max(settings.pull_batch) as i64,
        ..Default::default()
    }
}

fn group_of(c: &async_nats::jetstream::consumer::Info) -> Option<&str> {
    c.config
        .description
        .as_deref()?
        .strip_prefix(names::GROUP_DESCRIPTION)
}

async fn consumers(
    js: &Context,
    info: &stream::Info,
) -> Result<Vec<async_nats::jetstream::consumer::Info>> {
    let s = js
        .get_stream_no_info(&info.config.name)
        .await
        .map_err(|e| Error::backend(BACKEND, e))?;
    s.consumers()
        .try_collect()
        .await
        .map_err(|e| Error::backend(BACKEND, e))
}

pub(crate) async fn list(js: &Context) -> Result<Vec<String>> {
    let mut groups = BTreeSet::new();
    for info in topics::all(js).await? {
        for c in consumers(js, &info).await? {
            if let Some(g) = group_of(&c) {
                groups.insert(g.to_string());
            }
        }
    }
    Ok(groups.into_iter().collect())
}

/// Live members and the partitions whose leases they hold, from the bucket.
async fn members(js: &Context, group: &str, topics: &[String]) -> Result<Vec<MemberInfo>> {
    let Ok(kv) = js.get_key_value(names::bucket(group)).await else {
        return Ok(Vec::new());
    };
    let keys: Vec<String> = kv
        .keys()
        .await
        .map_err(|e| Error::backend(BACKEND, e))?
        .try_collect()
        .await
        .map_err(|e| Error::backend(BACKEND, e))?;
    let mut out: BTreeMap<String, Vec<TopicPartition>> = BTreeMap::new();
    for t in topics {
        let prefix = names::member_prefix(t);
        for k in &keys {
            if let Some(m) = k.strip_prefix(&prefix) {
                out.entry(m.to_string()).or_default();
            }
        }
        let lease_prefix = format!("l.{}.", names::token(t));
        for k in &keys {
            let Some(p) = k.strip_prefix(&lease_prefix).and_then(|p| p.parse().ok()) else {
                continue;
            };
            if let Ok(Some(owner)) = kv.get(k).await {
                let owner = String::from_utf8_lossy(&owner).into_owned();
                out.entry(owner)
                    .or_default()
                    .push(TopicPartition::new(t, p));
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|(member_id, mut assignment)| {
            assignment.sort();
            MemberInfo {
                member_id,
                assignment,
            }
        })
        .collect())
}

pub(crate) async fn describe(js: &Context, group: &str) -> Result<GroupInfo> {
    let mut offsets = Vec::new();
    let mut topic_names = Vec::new();
    for info in topics::all(js).await? {
        let Some(topic) = topics::topic_of(&info) else {
            continue;
        };
        let mut found = false;
        let s = js
            .get_stream_no_info(&info.config.name)
            .await
            .map_err(|e| Error::backend(BACKEND, e))?;
        for c in consumers(js, &info).await? {
            if group_of(&c) != Some(group) {
                continue;
            }
            let Some(partition) = names::consumer_partition(group, &c.name) else {
                continue;
            };
            found = true;
            let end = match s
                .get_last_raw_message_by_subject(&names::subject(&topic, partition))
                .await
            {
                Ok(m) => m.sequence + 1,
                Err(_) => 0,
            };
            let floor = c.ack_floor.stream_sequence;
            offsets.push(GroupOffset {
                topic: topic.clone(),
                partition,
                committed: (floor > 0).then_some(floor + 1),
                end_offset: end,
                lag: c.num_pending + c.num_ack_pending as u64,
                pending: Some(c.num_ack_pending as u64),
            });
        }
        if found {
            topic_names.push(topic);
        }
    }
    let members = members(js, group, &topic_names).await?;
    if offsets.is_empty() && members.is_empty() {
        return Err(Error::GroupNotFound(group.to_string()));
    }
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(GroupInfo {
        group: group.to_string(),
        members,
        offsets,
    })
}

/// Recreates the group's consumers on `topic` with a start position. Refused while
/// members are live (they would keep reading the old consumers' positions).
pub(crate) async fn reset(
    js: &Context,
    group: &str,
    topic: &str,
    to: ResetTo,
    settings: &Settings,
    prefetch: usize,
) -> Result<()> {
    let s = topics::get(js, topic)
        .await?
        .ok_or_else(|| Error::TopicNotFound(topic.to_string()))?;
    let live = members(js, group, &[topic.to_string()]).await?;
    if !live.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "group {group:?} has {} live member(s); stop them before resetting",
            live.len()
        )));
    }
    let policy = match to {
        ResetTo::Earliest => DeliverPolicy::All,
        ResetTo::Latest => DeliverPolicy::New,
        ResetTo::Offset(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        },
        ResetTo::Timestamp(ms) => DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
        },
    };
    for p in 0..topics::partition_count(s.cached_info()) {
        let name = names::consumer(group, p);
        // Absent consumers are fine: the reset creates them.
        let _ = s.delete_consumer(&name).await;
        s.create_consumer(consumer_config(group, topic, p, policy, settings, prefetch))
            .await
            .map_err(|e| Error::backend(BACKEND, e))?;
    }
    Ok(())
}
