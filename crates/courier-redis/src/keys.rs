//! Key names. Topic names cannot contain `:` (Courier validates them), so a partition
//! stream `{prefix}{topic}:{n}` never collides with Courier's own bookkeeping keys,
//! which carry more `:`-separated parts or none after the prefix.

/// Builds every key under one prefix (default `courier:`).
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// Hash: topic name → topic spec (JSON).
    pub(crate) fn topics(&self) -> String {
        format!("{}topics", self.prefix)
    }

    /// Set of group ids that ever subscribed.
    pub(crate) fn groups(&self) -> String {
        format!("{}groups", self.prefix)
    }

    /// The stream of one partition.
    pub(crate) fn stream(&self, topic: &str, partition: u32) -> String {
        format!("{}{}:{}", self.prefix, topic, partition)
    }

    /// Sorted set: live member id → lease expiry (ms, server clock).
    pub(crate) fn members(&self, group: &str) -> String {
        format!("{}g:{}:members", self.prefix, group)
    }

    /// Hash: live member id → the topics it subscribes (comma-separated).
    pub(crate) fn member_topics(&self, group: &str) -> String {
        format!("{}g:{}:topics", self.prefix, group)
    }

    /// Set of topics the group ever subscribed.
    pub(crate) fn group_topics(&self, group: &str) -> String {
        format!("{}g:{}:subscribed", self.prefix, group)
    }

    /// The lease on one partition: holds the owning member id, expires unless renewed.
    pub(crate) fn lease(&self, group: &str, topic: &str, partition: u32) -> String {
        format!("{}g:{}:lease:{}:{}", self.prefix, group, topic, partition)
    }
}
