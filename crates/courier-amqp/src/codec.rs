//! Courier records ⇄ AMQP messages. The id travels in the `message-id` property
//! (header `x-message-id` when longer than 255 bytes), the key in header `x-key`, the
//! millisecond timestamp in header `x-timestamp-ms` unless the id is a ULID carrying it
//! (the AMQP `timestamp` property carries seconds, for other clients); user headers
//! are AMQP headers with byte-string values.

use bytes::Bytes;
use courier_core::{Headers, Record, HEADER_MESSAGE_ID};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

/// Header carrying the key.
pub const H_KEY: &str = "x-key";
/// Header carrying the timestamp in ms.
pub const H_TIMESTAMP: &str = "x-timestamp-ms";
/// Header carrying the partition (routes on `headers` exchanges).
pub const H_PARTITION: &str = "x-partition";
/// Header RabbitMQ adds to stream deliveries.
pub const H_STREAM_OFFSET: &str = "x-stream-offset";

/// Properties of a record published to `partition` (persistent delivery mode).
pub fn properties(r: &Record, partition: Option<u32>) -> BasicProperties {
    let mut h = FieldTable::default();
    for (name, value) in r.headers.iter() {
        h.insert(name.into(), AMQPValue::LongString(value.as_ref().into()));
    }
    if let Some(k) = &r.key {
        h.insert(H_KEY.into(), AMQPValue::LongString(k.as_ref().into()));
    }
    if courier_core::ulid_millis(&r.id) != Some(r.timestamp) {
        h.insert(H_TIMESTAMP.into(), AMQPValue::LongLongInt(r.timestamp));
    }
    if let Some(p) = partition {
        h.insert(
            H_PARTITION.into(),
            AMQPValue::LongString(p.to_string().into()),
        );
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp((r.timestamp.max(0) / 1000) as u64);
    if r.id.len() <= 255 {
        props = props.with_message_id(ShortString::from(r.id.as_str()));
    } else {
        h.insert(
            HEADER_MESSAGE_ID.into(),
            AMQPValue::LongString(r.id.as_str().into()),
        );
    }
    props.with_headers(h)
}

/// What Courier reads back from a delivered message.
pub struct Decoded {
    /// Stream offset, when delivered from a stream.
    pub offset: Option<u64>,
    /// Key.
    pub key: Option<Bytes>,
    /// User headers.
    pub headers: Headers,
    /// Message id (empty when a foreign producer set none).
    pub id: String,
    /// Timestamp in ms.
    pub timestamp: i64,
}

fn bytes_of(v: &AMQPValue) -> Option<Bytes> {
    match v {
        AMQPValue::LongString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        AMQPValue::ShortString(s) => Some(Bytes::copy_from_slice(s.as_str().as_bytes())),
        AMQPValue::ByteArray(b) => Some(Bytes::copy_from_slice(b.as_slice())),
        other => Some(Bytes::from(format!("{other:?}"))),
    }
}

fn int_of(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Splits `props` into Courier's fields.
pub fn decode(props: &BasicProperties) -> Decoded {
    let mut d = Decoded {
        offset: None,
        key: None,
        headers: Headers::new(),
        id: props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        timestamp: props
            .timestamp()
            .map(|s| (s as i64).saturating_mul(1000))
            .unwrap_or(0),
    };
    let mut stamped = false;
    if let Some(h) = props.headers() {
        for (name, value) in h.inner() {
            match name.as_str() {
                H_STREAM_OFFSET => d.offset = int_of(value).map(|o| o as u64),
                H_KEY => d.key = bytes_of(value),
                H_TIMESTAMP => {
                    if let Some(ts) = int_of(value) {
                        stamped = true;
                        d.timestamp = ts;
                    }
                }
                H_PARTITION => {}
                HEADER_MESSAGE_ID => {
                    if let Some(b) = bytes_of(value) {
                        d.id = String::from_utf8_lossy(&b).into_owned();
                    }
                }
                other => {
                    if let Some(b) = bytes_of(value) {
                        d.headers.insert(other, b);
                    }
                }
            }
        }
    }
    if !stamped {
        // `x-timestamp-ms` is written only when the id's own time part differs.
        if let Some(ts) = courier_core::ulid_millis(&d.id) {
            d.timestamp = ts;
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timestamp_rides_in_a_ulid_id_unless_it_differs() {
        let mut r = Record::from_message(courier_core::Message::new("t", "v"));
        let p = properties(&r, None);
        let h = p.headers().as_ref().expect("headers");
        assert!(!h.inner().contains_key(H_TIMESTAMP), "carried by the id");
        assert_eq!(decode(&p).timestamp, r.timestamp);
        r.timestamp -= 5_000;
        let p = properties(&r, None);
        assert_eq!(decode(&p).timestamp, r.timestamp);
    }

    #[test]
    fn round_trip_keeps_fields() {
        let mut headers = Headers::new();
        headers.insert("x-bin", vec![0u8, 255, 1]);
        let r = Record {
            topic: "t".into(),
            partition: None,
            id: "id-1".into(),
            key: Some(Bytes::from_static(&[0, 159])),
            value: Bytes::from_static(b"v"),
            headers,
            timestamp: 1_700_000_000_123,
        };
        let d = decode(&properties(&r, Some(3)));
        assert_eq!(d.id, "id-1");
        assert_eq!(d.key.as_deref(), Some(&[0u8, 159][..]));
        assert_eq!(d.timestamp, 1_700_000_000_123);
        assert_eq!(
            d.headers.get("x-bin").map(|b| b.as_ref()),
            Some(&[0u8, 255, 1][..])
        );
        assert_eq!(d.headers.len(), 1);
        let long = Record {
            id: "x".repeat(300),
            ..r
        };
        assert_eq!(decode(&properties(&long, None)).id.len(), 300);
    }
}
