//! How Courier's objects are named on RabbitMQ. `:` cannot appear in a Courier topic
//! name, so these names never collide with each other or with a user's topics.

use courier_core::TopicPartition;

/// The stream that records topics and groups (Courier's catalog).
pub const CATALOG: &str = "courier.catalog";

/// The exchange of a topic: the topic's own name.
pub fn exchange(topic: &str) -> &str {
    topic
}

/// The stream holding one partition of a topic.
pub fn stream(topic: &str, partition: u32) -> String {
    format!("{topic}:{partition}")
}

/// The routing key of a partition.
pub fn routing_key(partition: u32) -> String {
    partition.to_string()
}

/// The exclusive queue whose existence is a member's lease on a partition.
pub fn lock(group: &str, tp: &TopicPartition) -> String {
    format!("courier.lock:{group}:{}:{}", tp.topic, tp.partition)
}

/// The one-message queue holding a group's committed offset of a partition.
pub fn offset(group: &str, tp: &TopicPartition) -> String {
    format!("courier.offset:{group}:{}:{}", tp.topic, tp.partition)
}

/// The fanout exchange a group's members announce themselves on.
pub fn members(group: &str) -> String {
    format!("courier.members:{group}")
}
