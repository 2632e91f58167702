//! Input checks made before anything is sent (SPEC C8).

use courier_core::{Error, Result};

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Accepts exactly the names Kafka accepts: 1–249 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<()> {
    if topic.is_empty() {
        return Err(Error::EmptyTopic);
    }
    let invalid = |reason: &str| Error::InvalidTopic {
        topic: topic.to_string(),
        reason: reason.to_string(),
    };
    if topic.len() > MAX_TOPIC_LEN {
        return Err(invalid("longer than 249 characters"));
    }
    if topic == "." || topic == ".." {
        return Err(invalid("'.' and '..' are reserved"));
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        let c = topic
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .unwrap_or('?');
        return Err(invalid(&format!(
            "character {c:?} not allowed (use A-Z a-z 0-9 . _ -)"
        )));
    }
    Ok(())
}

/// Rejects an empty group id.
pub fn validate_group(group: &str) -> Result<()> {
    if group.trim().is_empty() {
        return Err(Error::EmptyGroupId);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_names_only() {
        assert!(validate_topic("user.events_v1-x").is_ok());
        assert!(matches!(validate_topic(""), Err(Error::EmptyTopic)));
        assert!(matches!(
            validate_topic("a b"),
            Err(Error::InvalidTopic { .. })
        ));
        assert!(validate_topic(&"a".repeat(250)).is_err());
        assert!(validate_topic("..").is_err());
        assert!(matches!(validate_group(" "), Err(Error::EmptyGroupId)));
    }
}
