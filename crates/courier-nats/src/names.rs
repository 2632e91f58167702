//! How Courier names map onto JetStream names. Stream, consumer and bucket names
//! allow only `[A-Za-z0-9_-]`, so other characters become `_` and a hash of the
//! original name is appended whenever that changed anything, which keeps distinct
//! Courier names distinct. The real names travel in descriptions.

use courier_core::partitioner::murmur2;

/// Prefix of every stream that holds a Courier topic.
pub(crate) const STREAM_PREFIX: &str = "COURIER_";
/// Prefix of a stream description; the topic name follows.
pub(crate) const TOPIC_DESCRIPTION: &str = "courier topic: ";
/// Prefix of a consumer description; the group name follows.
pub(crate) const GROUP_DESCRIPTION: &str = "courier group: ";
/// Prefix of a group's coordination bucket.
pub(crate) const BUCKET_PREFIX: &str = "COURIER_GROUP_";

/// `name` with every character outside `[A-Za-z0-9_-]` replaced, plus a hash suffix
/// when anything was replaced.
pub(crate) fn token(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == name {
        clean
    } else {
        format!("{clean}_{:08x}", murmur2(name.as_bytes()) as u32)
    }
}

/// The stream holding `topic`.
pub(crate) fn stream(topic: &str) -> String {
    format!("{STREAM_PREFIX}{}", token(topic))
}

/// The subject of one partition of `topic`.
pub(crate) fn subject(topic: &str, partition: u32) -> String {
    format!("courier.{}.{partition}", token(topic))
}

/// Every partition subject of `topic`.
pub(crate) fn subjects(topic: &str, partitions: u32) -> Vec<String> {
    (0..partitions).map(|p| subject(topic, p)).collect()
}

/// The durable consumer of `group` on one partition.
pub(crate) fn consumer(group: &str, partition: u32) -> String {
    format!("{}_p{partition}", token(group))
}

/// The partition a durable consumer of `group` reads, if the name is one of its.
pub(crate) fn consumer_partition(group: &str, name: &str) -> Option<u32> {
    name.strip_prefix(&token(group))?
        .strip_prefix("_p")?
        .parse()
        .ok()
}

/// The KV bucket holding `group`'s members and partition leases.
pub(crate) fn bucket(group: &str) -> String {
    format!("{BUCKET_PREFIX}{}", token(group))
}

/// The heartbeat key of `member` for `topic`.
pub(crate) fn member_key(topic: &str, member: &str) -> String {
    format!("m.{}.{member}", token(topic))
}

/// Prefix of every member key of `topic`.
pub(crate) fn member_prefix(topic: &str) -> String {
    format!("m.{}.", token(topic))
}

/// The lease key of one partition of `topic`.
pub(crate) fn lease_key(topic: &str, partition: u32) -> String {
    format!("l.{}.{partition}", token(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_names_stay_and_dirty_names_get_a_hash() {
        assert_eq!(token("orders_v2-x"), "orders_v2-x");
        let t = token("user.events");
        assert!(t.starts_with("user_events_"), "{t}");
        assert_ne!(token("user.events"), token("user_events"));
        assert_ne!(token("a.b"), token("a,b"));
    }

    #[test]
    fn subjects_and_consumers_round_trip_partitions() {
        assert_eq!(subject("t", 3), "courier.t.3");
        assert!(subject("user.events", 12).ends_with(".12"));
        let c = consumer("svc.g", 7);
        assert_eq!(consumer_partition("svc.g", &c), Some(7));
        assert_eq!(consumer_partition("other", &c), None);
        assert!(stream("a.b").starts_with(STREAM_PREFIX));
    }
}
