//! Courier records ↔ NATS messages. The value is the NATS payload unchanged; key, id,
//! timestamp and headers travel as NATS headers (the timestamp only when it differs
//! from the time part of the ULID id). Header names and values NATS cannot
//! carry verbatim (binary, CR/LF, surrounding spaces, `:` in names) are base64-encoded
//! under a `Courier-…` name, so any bytes survive the round trip.

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use courier_core::{Headers, Record};

/// The message id.
pub(crate) const ID: &str = "Courier-Id";
/// The send timestamp, ms since the epoch.
pub(crate) const TIMESTAMP: &str = "Courier-Ts";
/// A key that is plain text.
pub(crate) const KEY: &str = "Courier-Key";
/// A key in base64.
pub(crate) const KEY_B64: &str = "Courier-Key-B64";
/// JetStream's de-duplication id, set from the message id when the record asks to be
/// stored once ([`courier_core::HEADER_STORE_ONCE`]).
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";
/// Headers NATS cannot carry verbatim: base64 of a JSON list of `[name, bytes]`.
pub(crate) const HEADERS_B64: &str = "Courier-Headers-B64";

fn text_value(v: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(v).ok()?;
    let plain = !s.is_empty() && s.trim() == s && !s.contains(|c: char| c.is_control());
    plain.then_some(s)
}

fn plain_name(n: &str) -> bool {
    !n.is_empty()
        && !n.contains(|c: char| !c.is_ascii_graphic() || c == ':')
        && !n.starts_with("Courier-")
        && !n.starts_with("Nats-")
}

/// One of Courier's own header names, neither validated nor copied: a name given as
/// `&str` is validated, looked up among the standard names and copied into a new
/// buffer on every insert (three times per published message).
fn name(static_name: &'static str) -> HeaderName {
    HeaderName::from_static(static_name)
}

/// The NATS headers of `r`.
pub(crate) fn encode(r: &Record) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(name(ID), HeaderValue::from(r.id.as_str()));
    if courier_core::ulid_millis(&r.id) != Some(r.timestamp) {
        h.insert(name(TIMESTAMP), HeaderValue::from(r.timestamp));
    }
    if let Some(k) = &r.key {
        match text_value(k) {
            Some(s) => h.insert(name(KEY), HeaderValue::from(s)),
            None => h.insert(name(KEY_B64), HeaderValue::from(B64.encode(k))),
        }
    }
    let mut odd: Vec<(&str, &[u8])> = Vec::new();
    for (name, value) in r.headers.iter() {
        if name == courier_core::HEADER_STORE_ONCE {
            h.insert(
                HeaderName::from_static(MSG_ID),
                HeaderValue::from(r.id.as_str()),
            );
            continue;
        }
        match (plain_name(name), text_value(value)) {
            (true, Some(v)) => match HeaderName::try_from(name) {
                Ok(n) => h.append(n, HeaderValue::from(v)),
                Err(_) => odd.push((name, value)),
            },
            _ => odd.push((name, value)),
        }
    }
    if !odd.is_empty() {
        if let Ok(json) = serde_json::to_vec(&odd) {
            h.insert(name(HEADERS_B64), HeaderValue::from(B64.encode(json)));
        }
    }
    h
}

/// What a delivery needs from a stored message's headers.
pub(crate) struct Decoded {
    pub key: Option<Bytes>,
    pub headers: Headers,
    pub id: String,
    pub timestamp: i64,
}

/// Splits NATS headers back into Courier's fields. A message published by another
/// NATS client (no Courier headers) gets its sequence as id and `fallback_ts`.
pub(crate) fn decode(h: Option<&HeaderMap>, seq: u64, fallback_ts: i64) -> Decoded {
    let mut out = Decoded {
        key: None,
        headers: Headers::new(),
        id: String::new(),
        timestamp: fallback_ts,
    };
    let Some(h) = h else {
        out.id = seq.to_string();
        return out;
    };
    let mut stamped = false;
    for (name, values) in h.iter() {
        let n: &str = name.as_ref();
        let Some(first) = values.first() else {
            continue;
        };
        match n {
            ID => out.id = first.as_str().to_string(),
            TIMESTAMP => {
                stamped = true;
                out.timestamp = first.as_str().parse().unwrap_or(fallback_ts);
            }
            // JetStream's de-duplication id: Courier's own id again (store-once moves).
            MSG_ID => {}
            KEY => out.key = Some(Bytes::copy_from_slice(first.as_str().as_bytes())),
            KEY_B64 => out.key = B64.decode(first.as_str()).ok().map(Bytes::from),
            HEADERS_B64 => {
                let decoded = B64
                    .decode(first.as_str())
                    .ok()
                    .and_then(|j| serde_json::from_slice::<Vec<(String, Vec<u8>)>>(&j).ok());
                for (k, v) in decoded.unwrap_or_default() {
                    out.headers.insert(k, v);
                }
            }
            _ => {
                for v in values {
                    out.headers
                        .insert(n.to_string(), Bytes::copy_from_slice(v.as_str().as_bytes()));
                }
            }
        }
    }
    if !stamped {
        // Written only when the id's own time part differs from it.
        if let Some(ts) = courier_core::ulid_millis(&out.id) {
            out.timestamp = ts;
        }
    }
    if out.id.is_empty() {
        out.id = seq.to_string();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_bytes_survive() {
        let mut headers = Headers::new();
        headers.insert("x-bin", vec![0u8, 255, 1]);
        headers.insert("X-Trace-ID", "abc");
        headers.insert("odd: name", "v");
        headers.insert("spaced", " v ");
        let r = Record {
            topic: "t".into(),
            partition: None,
            id: "id-1".into(),
            key: Some(Bytes::from_static(&[0, 159, 146, 150])),
            value: Bytes::new(),
            headers,
            timestamp: 1_700_000_000_123,
        };
        let h = encode(&r);
        let d = decode(Some(&h), 5, 0);
        assert_eq!(d.id, "id-1");
        assert_eq!(d.timestamp, 1_700_000_000_123);
        assert_eq!(d.key.as_deref(), Some(&[0u8, 159, 146, 150][..]));
        assert_eq!(
            d.headers.get("x-bin").map(|b| b.as_ref()),
            Some(&[0u8, 255, 1][..])
        );
        assert_eq!(d.headers.get_str("X-Trace-ID"), Some("abc"));
        assert_eq!(d.headers.get_str("odd: name"), Some("v"));
        assert_eq!(d.headers.get_str("spaced"), Some(" v "));
        assert_eq!(d.headers.len(), 4);
    }

    #[test]
    fn store_once_becomes_the_jetstream_dedup_id_and_is_not_delivered() {
        let r = Record::from_message(
            courier_core::Message::new("t", "v").header(courier_core::HEADER_STORE_ONCE, "1"),
        );
        let h = encode(&r);
        assert_eq!(h.get(MSG_ID).map(|v| v.as_str()), Some(r.id.as_str()));
        assert!(h.get(courier_core::HEADER_STORE_ONCE).is_none());
        let d = decode(Some(&h), 1, 0);
        assert_eq!(d.id, r.id);
        assert!(d.headers.is_empty(), "no header reaches the consumer");
    }

    #[test]
    fn the_timestamp_rides_in_a_ulid_id_unless_it_differs() {
        let mut r = Record::from_message(courier_core::Message::new("t", "v"));
        let h = encode(&r);
        assert!(h.get(TIMESTAMP).is_none(), "carried by the id");
        assert_eq!(decode(Some(&h), 1, 0).timestamp, r.timestamp);
        r.timestamp -= 5_000;
        let h = encode(&r);
        assert!(h.get(TIMESTAMP).is_some());
        assert_eq!(decode(Some(&h), 1, 0).timestamp, r.timestamp);
    }

    #[test]
    fn foreign_messages_get_the_sequence_as_id() {
        let d = decode(None, 42, 7);
        assert_eq!((d.id.as_str(), d.timestamp, d.key), ("42", 7, None));
    }
}
