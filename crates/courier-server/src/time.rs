//! Timestamps as the seed shows them (RFC 3339, UTC).

/// `ms` since the epoch as RFC 3339 with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc() {
        assert_eq!(super::rfc3339(1_705_314_601_000), "2024-01-15T10:30:01Z");
        assert_eq!(super::rfc3339(1_705_314_601_250), "2024-01-15T10:30:01.25Z");
    }
}
