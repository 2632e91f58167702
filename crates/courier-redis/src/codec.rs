//! How a Courier message is laid out in a stream entry, and how entry ids map to
//! offsets.
//!
//! An entry has two fields: `m` (metadata: timestamp, id, key, headers, in a compact
//! binary form) and `v` (the value, unchanged, so other Redis tools can read it). Two
//! fields instead of one per header keep the server's per-entry work close to a bare
//! `XADD … v <value>`.
//!
//! Entry ids are `0-<n>` with `n = offset + 1`: Courier adds entries with the id
//! `0-*`, so Redis itself assigns the next sequence number atomically and offsets are
//! dense (0, 1, 2 …) per partition without a script or a counter key.

use std::sync::Arc;

use bytes::Bytes;
use courier_core::{Error, Headers, Record, Result};

use crate::BACKEND;

/// Field holding the metadata.
pub(crate) const FIELD_META: &str = "m";
/// Field holding the value.
pub(crate) const FIELD_VALUE: &str = "v";
/// The id `XADD` is given: explicit time part 0, sequence assigned by Redis.
pub(crate) const NEXT_ID: &str = "0-*";

const VERSION: u8 = 1;

/// Encodes a record's metadata (`m`).
#[cfg(test)]
pub(crate) fn encode_meta(r: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    encode_meta_into(&mut out, r);
    out
}

/// Appends a record's metadata (`m`) to `out` (a buffer reused across a batch).
pub(crate) fn encode_meta_into(out: &mut Vec<u8>, r: &Record) {
    let key_len = r.key.as_ref().map_or(0, |k| k.len());
    out.reserve(22 + r.id.len() + key_len + r.headers.encoded_len());
    out.push(VERSION);
    out.extend_from_slice(&r.timestamp.to_be_bytes());
    put_bytes(out, r.id.as_bytes());
    match &r.key {
        Some(k) => {
            out.push(1);
            put_bytes(out, k);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(r.headers.len() as u32).to_be_bytes());
    for (name, value) in r.headers.iter() {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Metadata of a stored message.
#[derive(Debug, PartialEq)]
pub(crate) struct Meta {
    pub timestamp: i64,
    /// Shared with the delivery as it is, so decoding allocates the id once.
    pub id: Arc<str>,
    pub key: Option<Bytes>,
    pub headers: Headers,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(corrupt());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

fn corrupt() -> Error {
    Error::backend(BACKEND, "stream entry metadata is not in Courier's format")
}

/// Decodes `m`; `raw` is the metadata's buffer (sliced without copying).
pub(crate) fn decode_meta(raw: &Bytes) -> Result<Meta> {
    let mut r = Reader(raw.as_ref());
    if r.take(1)?[0] != VERSION {
        return Err(corrupt());
    }
    let ts = r.take(8)?;
    let timestamp = i64::from_be_bytes([ts[0], ts[1], ts[2], ts[3], ts[4], ts[5], ts[6], ts[7]]);
    let id: Arc<str> = match String::from_utf8_lossy(r.bytes()?) {
        std::borrow::Cow::Borrowed(s) => s.into(),
        std::borrow::Cow::Owned(s) => s.into(),
    };
    let key = match r.take(1)?[0] {
        0 => None,
        _ => Some(raw.slice_ref(r.bytes()?)),
    };
    let n = r.u32()?;
    let mut headers = Headers::new();
    for _ in 0..n {
        let name = String::from_utf8_lossy(r.bytes()?).into_owned();
        let value = raw.slice_ref(r.bytes()?);
        headers.insert(name, value);
    }
    Ok(Meta {
        timestamp,
        id,
        key,
        headers,
    })
}

/// The offset of entry id `0-<n>` (`n − 1`); `None` for ids Courier did not assign.
pub(crate) fn offset_of(id: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(id).ok()?;
    let (ms, seq) = s.split_once('-')?;
    if ms != "0" {
        return None;
    }
    seq.parse::<u64>().ok()?.checked_sub(1)
}

/// The entry id of `offset`.
pub(crate) fn id_of(offset: u64) -> String {
    format!("0-{}", offset + 1)
}

/// Writes the entry id of `offset` into `buf` without allocating (one per ack on the
/// consume path) and returns it.
pub(crate) fn write_id(buf: &mut IdBuf, offset: u64) -> &[u8] {
    let digits = buf.digits.format(offset + 1).as_bytes();
    buf.out[..2].copy_from_slice(b"0-");
    buf.out[2..2 + digits.len()].copy_from_slice(digits);
    &buf.out[..2 + digits.len()]
}

/// Scratch space for [`write_id`].
#[derive(Default)]
pub(crate) struct IdBuf {
    digits: itoa::Buffer,
    out: [u8; 22],
}

/// The id to pass to read everything *after* `offset − 1`, i.e. from `offset` on.
pub(crate) fn id_before(offset: u64) -> String {
    format!("0-{offset}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let mut headers = Headers::new();
        headers.insert("x-bin", vec![0u8, 255]);
        headers.insert("empty", Bytes::new());
        let r = Record {
            topic: "t".into(),
            partition: None,
            id: "id-1".into(),
            key: Some(Bytes::from_static(b"\0k")),
            value: Bytes::from_static(b"v"),
            headers: headers.clone(),
            timestamp: -5,
        };
        let m = decode_meta(&Bytes::from(encode_meta(&r))).unwrap();
        assert_eq!(m.timestamp, -5);
        assert_eq!(&*m.id, "id-1");
        assert_eq!(m.key.as_deref(), Some(&b"\0k"[..]));
        assert_eq!(m.headers, headers);
        let keyless = Record { key: None, ..r };
        assert_eq!(
            decode_meta(&Bytes::from(encode_meta(&keyless)))
                .unwrap()
                .key,
            None
        );
        assert!(decode_meta(&Bytes::from_static(b"\x01\0\0")).is_err());
    }

    #[test]
    fn ids_and_offsets() {
        assert_eq!(offset_of(b"0-1"), Some(0));
        assert_eq!(offset_of(b"0-42"), Some(41));
        assert_eq!(offset_of(b"1700000000000-0"), None);
        assert_eq!(offset_of(b"0-0"), None);
        assert_eq!(id_of(41), "0-42");
        let mut buf = IdBuf::default();
        assert_eq!(write_id(&mut buf, 41), b"0-42");
        assert_eq!(
            write_id(&mut buf, u64::MAX - 1),
            format!("0-{}", u64::MAX).as_bytes()
        );
        assert_eq!(id_before(41), "0-41");
    }
}
