//! Messages as sent ([`Message`]), as handed to a driver ([`Record`]) and the send
//! result ([`Receipt`]) — SPEC C1.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Milliseconds since the Unix epoch, the timestamp unit of every Courier type.
pub fn now_millis() -> i64 {
    millis_of(SystemTime::now())
}

/// `t` in milliseconds since the Unix epoch (0 before it).
fn millis_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The millisecond timestamp carried by `id` when it is a ULID (Courier assigns ULIDs
/// whose time part is the record's timestamp): a driver may then leave the timestamp
/// out of its wire format, stored only when it differs from the id's.
pub fn ulid_millis(id: &str) -> Option<i64> {
    if id.len() != ulid::ULID_LEN {
        return None;
    }
    let ulid = ulid::Ulid::from_string(id).ok()?;
    i64::try_from(ulid.timestamp_ms()).ok()
}

/// Message headers: ordered `name → bytes` pairs. [`Headers::insert`] replaces an
/// existing name; the order of first insertion is kept so round trips are exact.
///
/// Cloning is one reference count (the pairs are shared and copied on the first
/// change), so the consumer pipeline can keep a message's copy for a retry or a
/// dead letter without copying every header. No headers allocate nothing. A lookup of
/// a name that is absent usually answers without reading the pairs (a one-word
/// summary of the names is kept).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Option<Arc<Pairs>>);

/// The pairs of a [`Headers`] and a one-word summary of their names: bit
/// [`name_bit`] of every name is set. The pipeline asks each delivery for headers it
/// mostly lacks (`content-encoding`, say) while carrying others (the six trace
/// headers): with the summary such a miss reads one word instead of every pair and
/// the names behind them, which are rarely in cache.
#[derive(Clone, Debug, Default)]
struct Pairs {
    names: u64,
    list: Vec<(String, Bytes)>,
}

impl PartialEq for Pairs {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl Eq for Pairs {}

/// The summary of `list`'s names.
fn summary(list: &[(String, Bytes)]) -> u64 {
    list.iter().fold(0, |m, (n, _)| m | name_bit(n))
}

/// The summary bit of `name`: from its length and last byte, ASCII case folded, so
/// one bit serves exact and case-insensitive lookups.
#[inline]
fn name_bit(name: &str) -> u64 {
    let b = name.as_bytes();
    let last = b.last().map_or(0, u8::to_ascii_lowercase);
    1 << ((b.len() as u32)
        .wrapping_mul(7)
        .wrapping_add(u32::from(last))
        & 63)
}

impl Serialize for Headers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.pairs().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Vec::<(String, Bytes)>::deserialize(d).map(Self::from_vec)
    }
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self(None)
    }

    /// Headers of `v` as given (names are expected to be distinct).
    fn from_vec(list: Vec<(String, Bytes)>) -> Self {
        if list.is_empty() {
            return Self(None);
        }
        Self(Some(Arc::new(Pairs {
            names: summary(&list),
            list,
        })))
    }

    #[inline]
    fn pairs(&self) -> &[(String, Bytes)] {
        self.0.as_deref().map_or(&[], |p| p.list.as_slice())
    }

    /// The pairs, if any might be named `name` (its summary bit is set).
    #[inline]
    fn candidates(&self, name: &str) -> &[(String, Bytes)] {
        match self.0.as_deref() {
            Some(p) if p.names & name_bit(name) != 0 => &p.list,
            _ => &[],
        }
    }

    /// Sets `name` to `value`, replacing any earlier value of that name.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Bytes>) {
        let name = name.into();
        let value = value.into();
        let pairs = Arc::make_mut(self.0.get_or_insert_with(Default::default));
        let bit = name_bit(&name);
        let existing = if pairs.names & bit != 0 {
            pairs.list.iter_mut().find(|(n, _)| *n == name)
        } else {
            None
        };
        match existing {
            Some(slot) => slot.1 = value,
            None => {
                pairs.names |= bit;
                pairs.list.push((name, value));
            }
        }
    }

    /// The value of `name`, if present.
    #[inline]
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.candidates(name)
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The value of `name` if present and valid UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The value of `name` compared case-insensitively (HTTP-style names such as
    /// `X-Trace-ID` arrive in any case from other clients); an exact match wins over
    /// one that differs only in case.
    pub fn get_ignore_case(&self, name: &str) -> Option<&Bytes> {
        let pairs = self.candidates(name);
        // Names are nearly always written as spelled by the reader: an exact compare
        // (a length check, then memcmp) first; the case-folding scan only on a miss.
        pairs
            .iter()
            .find(|(n, _)| n == name)
            .or_else(|| pairs.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)))
            .map(|(_, v)| v)
    }

    /// Removes `name` and returns its value.
    pub fn remove(&mut self, name: &str) -> Option<Bytes> {
        let pos = self.candidates(name).iter().position(|(n, _)| n == name)?;
        let pairs = Arc::make_mut(self.0.as_mut()?);
        let v = pairs.list.remove(pos).1;
        if pairs.list.is_empty() {
            self.0 = None;
        } else {
            pairs.names = summary(&pairs.list);
        }
        Some(v)
    }

    /// True when `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Iterates in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.pairs().iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.pairs().len()
    }

    /// True when there are no headers.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }

    /// Bytes the headers take on the wire (names + values).
    pub fn encoded_len(&self) -> usize {
        self.pairs().iter().map(|(n, v)| n.len() + v.len()).sum()
    }
}

impl<N: Into<String>, V: Into<Bytes>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (n, v) in iter {
            h.insert(n, v);
        }
        h
    }
}

impl IntoIterator for Headers {
    type Item = (String, Bytes);
    type IntoIter = std::vec::IntoIter<(String, Bytes)>;
    fn into_iter(self) -> Self::IntoIter {
        match self.0 {
            None => Vec::new().into_iter(),
            Some(a) => Arc::try_unwrap(a)
                .map_or_else(|shared| shared.list.clone(), |p| p.list)
                .into_iter(),
        }
    }
}

/// A message to send. Bytes in, bytes out: serialization is the caller's, with
/// [`Message::json`] as a convenience.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Destination topic; must not be empty.
    pub topic: String,
    /// Partitioning key: the same key always lands in the same partition.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Bytes,
    /// Headers, delivered unchanged.
    pub headers: Headers,
    /// Unique id; a ULID is assigned on send when absent.
    pub id: Option<String>,
    /// Milliseconds since the epoch; set on send when absent.
    pub timestamp: Option<i64>,
    /// Explicit partition, overriding the key hash.
    pub partition: Option<u32>,
    /// Not visible to consumers before this time (ms since the epoch).
    pub deliver_at: Option<i64>,
}

impl Message {
    /// A message for `topic` carrying `value`.
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            key: None,
            value: value.into(),
            headers: Headers::new(),
            id: None,
            timestamp: None,
            partition: None,
            deliver_at: None,
        }
    }

    /// A message whose value is `value` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(topic: impl Into<String>, value: &T) -> Result<Self> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Serialization(e.to_string()))?;
        Ok(Self::new(topic, bytes))
    }

    /// Sets the partitioning key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds (or replaces) a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets the message id (otherwise a ULID is generated on send).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the timestamp in ms since the epoch.
    pub fn timestamp(mut self, ts_ms: i64) -> Self {
        self.timestamp = Some(ts_ms);
        self
    }

    /// Sends to this partition instead of hashing the key.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Delivers no earlier than `at_ms` (ms since the epoch).
    pub fn deliver_at(mut self, at_ms: i64) -> Self {
        self.deliver_at = Some(at_ms);
        self
    }

    /// Delivers no earlier than `delay` from now.
    pub fn delay(self, delay: Duration) -> Self {
        let at = now_millis().saturating_add(delay.as_millis() as i64);
        self.deliver_at(at)
    }

    /// Size that counts against `max_message_size`: key + value + headers.
    pub fn encoded_len(&self) -> usize {
        self.key.as_ref().map_or(0, |k| k.len()) + self.value.len() + self.headers.encoded_len()
    }
}

/// A message after the producer pipeline, as a driver receives it: id and timestamp
/// are always set; `partition` is set when the caller chose one.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Destination topic.
    pub topic: String,
    /// Explicit partition, or `None` to let the driver hash the key.
    pub partition: Option<u32>,
    /// Unique id (ULID unless the caller set one).
    pub id: String,
    /// Partitioning key.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Bytes,
    /// Headers.
    pub headers: Headers,
    /// Milliseconds since the epoch.
    pub timestamp: i64,
}

impl Record {
    /// Builds a record from a message, assigning an id and timestamp when absent.
    pub fn from_message(msg: Message) -> Self {
        let (id, timestamp) = match (msg.id, msg.timestamp) {
            (Some(id), Some(ts)) => (id, ts),
            (id, ts) => {
                // One clock read for both: the id's time part is the timestamp.
                let now = SystemTime::now();
                let id = id.unwrap_or_else(|| ulid::Ulid::from_datetime(now).to_string());
                (id, ts.unwrap_or_else(|| millis_of(now)))
            }
        };
        Self {
            id,
            timestamp,
            topic: msg.topic,
            partition: msg.partition,
            key: msg.key,
            value: msg.value,
            headers: msg.headers,
        }
    }
}

/// Proof that a message was stored: where it went and under which id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Topic it was stored in.
    pub topic: String,
    /// Partition it was stored in.
    pub partition: u32,
    /// Position within the partition (dense on log backends; monotonic on others —
    /// see each backend's page).
    pub offset: u64,
    /// The message id.
    pub id: String,
    /// Timestamp, ms since the epoch.
    pub timestamp: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_records_ulid_carries_its_timestamp() {
        let r = Record::from_message(Message::new("t", "v"));
        assert_eq!(ulid_millis(&r.id), Some(r.timestamp));
        assert_eq!(ulid_millis("not-a-ulid"), None);
        assert_eq!(ulid_millis("!!!!!!!!!!!!!!!!!!!!!!!!!!"), None);
    }

    #[test]
    fn headers_insert_replaces_and_keeps_order() {
        let mut h = Headers::new();
        h.insert("a", "1");
        h.insert("b", "2");
        h.insert("a", "3");
        let v: Vec<_> = h.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
        assert_eq!(
            v,
            vec![
                ("a".to_string(), Bytes::from("3")),
                ("b".to_string(), Bytes::from("2"))
            ]
        );
        assert_eq!(h.get_ignore_case("A").map(|b| b.as_ref()), Some(&b"3"[..]));
        assert_eq!(h.remove("a"), Some(Bytes::from("3")));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn headers_lookups_agree_with_a_scan_whatever_the_summary_says() {
        // "ab"/"xb" share a summary bit; "X-Trace-ID" differs from its lookup in case.
        let mut h: Headers = [("ab", "1"), ("xb", "2"), ("X-Trace-ID", "3")]
            .into_iter()
            .collect();
        assert_eq!(h.get_str("ab"), Some("1"));
        assert_eq!(h.get_str("xb"), Some("2"));
        assert_eq!(h.get("cb"), None);
        assert_eq!(h.get("content-encoding"), None);
        assert_eq!(h.get("x-trace-id"), None);
        assert_eq!(
            h.get_ignore_case("x-trace-id").map(|b| b.as_ref()),
            Some(&b"3"[..])
        );
        assert_eq!(h.remove("ab"), Some(Bytes::from("1")));
        assert_eq!(h.get_str("xb"), Some("2"));
        assert_eq!(h.remove("xb"), Some(Bytes::from("2")));
        assert!(!h.contains("xb"));
        h.insert("ab", "4");
        assert_eq!(h.get_str("ab"), Some("4"));
        let round: Headers = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(round, h);
        assert_eq!(round.get_str("ab"), Some("4"));
    }

    #[test]
    fn record_assigns_ulid_and_timestamp() {
        let r = Record::from_message(Message::new("t", "v"));
        assert_eq!(r.id.len(), 26);
        assert!(r.timestamp > 0);
        let r = Record::from_message(Message::new("t", "v").id("x").timestamp(7));
        assert_eq!((r.id.as_str(), r.timestamp), ("x", 7));
    }
}
