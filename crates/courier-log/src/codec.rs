//! On-disk record batch format.
//!
//! Every batch is self-delimiting and checksummed so that recovery can find the
//! first torn or corrupt batch by reading forward from a known-good position:
//!
//! ```text
//! offset size field
//!      0    4 length       bytes after this field (crc .. end), little endian
//!      4    4 crc          CRC-32C over length, bytes 16.., then base_offset
//!                          (everything except the crc itself)
//!      8    8 base_offset  offset of the first record
//!     16    1 magic        format version, currently 1
//!     17    4 count        number of records (> 0)
//!     21    8 first_ts     timestamp (ms) of the first record
//!     29    8 max_ts       largest record timestamp (ms)
//!     37    . records      `count` records, back to back
//! ```
//!
//! A record is `ts: i64, key_len: i32 (-1 = none), key, value_len: u32, value,
//! header_count: u32, (name_len: u32, name (UTF-8), value_len: u32, value)*`.
//! Offsets of records are implicit (`base_offset + index`), which is why a
//! batch can be encoded before its offset is known. The CRC covers the base
//! offset *last*, so the producer checksums everything else in parallel and
//! the single writer only patches 8 bytes and extends the CRC over them (see
//! [`PendingBatch::finalize`]); combining CRCs instead measured 5% of CPU.

use bytes::Bytes;

/// Size of the fixed batch header in bytes (length field included).
pub const BATCH_HEADER_LEN: usize = 37;
/// Current batch format version.
pub const MAGIC: u8 = 1;
const LEN_FIELD: usize = 4;
const CRC_END: usize = 8;
const REST_START: usize = 16;

/// One message as appended by a producer. Cloning is cheap (`Bytes`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Optional key; `None` and `Some(empty)` are distinct and round-trip as such.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Bytes,
    /// Ordered headers; duplicates are preserved.
    pub headers: Vec<(String, Bytes)>,
    /// Producer timestamp in milliseconds since the Unix epoch.
    pub timestamp: i64,
}

impl Record {
    /// A record with the given value, no key, no headers, timestamped now.
    pub fn new(value: impl Into<Bytes>) -> Self {
        Record {
            key: None,
            value: value.into(),
            headers: Vec::new(),
            timestamp: now_ms(),
        }
    }

    /// Exact number of bytes this record occupies inside a batch.
    pub fn encoded_len(&self) -> usize {
        8 + 4
            + self.key.as_ref().map_or(0, |k| k.len())
            + 4
            + self.value.len()
            + 4
            + self
                .headers
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>()
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a byte sequence is not a valid batch. Decoding never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or the declared length need (torn write).
    #[error("short batch: need {need} bytes, have {have}")]
    Short {
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The length field is impossible (too small for a header or too large).
    #[error("invalid batch length {0}")]
    BadLength(u32),
    /// Checksum mismatch: the bytes were damaged.
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// CRC stored in the batch.
        stored: u32,
        /// CRC computed over the bytes.
        computed: u32,
    },
    /// Unknown format version.
    #[error("unknown batch magic {0}")]
    BadMagic(u8),
    /// CRC was fine but the contents are inconsistent (only possible with a
    /// buggy writer or a CRC collision).
    #[error("malformed batch: {0}")]
    Malformed(&'static str),
}

/// The fixed header of a batch, parsed without touching the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Total size of the batch on disk, header included.
    pub total_len: usize,
    /// Stored CRC.
    pub crc: u32,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Number of records (always > 0 in a valid batch).
    pub count: u32,
    /// Timestamp of the first record.
    pub first_ts: i64,
    /// Largest timestamp in the batch.
    pub max_ts: i64,
}

impl BatchHeader {
    /// Offset just past the last record of the batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }
}

/// Largest accepted batch (guards recovery against absurd lengths).
pub const MAX_BATCH_LEN: usize = 1 << 30;

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parse the header at the start of `buf` without verifying the CRC. Needs only
/// [`BATCH_HEADER_LEN`] bytes; use [`verify_batch`] before trusting contents.
pub fn parse_header(buf: &[u8]) -> Result<BatchHeader, DecodeError> {
    if buf.len() < BATCH_HEADER_LEN {
        return Err(DecodeError::Short {
            need: BATCH_HEADER_LEN,
            have: buf.len(),
        });
    }
    let len = u32_at(buf, 0);
    let total = len as usize + LEN_FIELD;
    if !(BATCH_HEADER_LEN..=MAX_BATCH_LEN).contains(&total) {
        return Err(DecodeError::BadLength(len));
    }
    let magic = buf[16];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    Ok(BatchHeader {
        total_len: total,
        crc: u32_at(buf, 4),
        base_offset: u64_at(buf, 8),
        count: u32_at(buf, 17),
        first_ts: u64_at(buf, 21) as i64,
        max_ts: u64_at(buf, 29) as i64,
    })
}

fn compute_crc(batch: &[u8]) -> u32 {
    let c = crc32c::crc32c(&batch[..LEN_FIELD]);
    let c = crc32c::crc32c_append(c, &batch[REST_START..]);
    crc32c::crc32c_append(c, &batch[CRC_END..REST_START])
}

/// Parse the header and check the CRC of the batch at the start of `buf`.
/// Returns the header; the batch occupies `buf[..header.total_len]`.
pub fn verify_batch(buf: &[u8]) -> Result<BatchHeader, DecodeError> {
    let h = parse_header(buf)?;
    if buf.len() < h.total_len {
        return Err(DecodeError::Short {
            need: h.total_len,
            have: buf.len(),
        });
    }
    let computed = compute_crc(&buf[..h.total_len]);
    if computed != h.crc {
        return Err(DecodeError::Crc {
            stored: h.crc,
            computed,
        });
    }
    if h.count == 0 {
        return Err(DecodeError::Malformed("zero records"));
    }
    Ok(h)
}

/// A batch encoded before its base offset is known. Produced by producers in
/// parallel so the single writer only patches 8 bytes and combines CRCs.
#[derive(Debug)]
pub struct PendingBatch {
    buf: Vec<u8>,
    /// CRC-32C of the length field then `buf[REST_START..]`, computed off the
    /// writer's critical path.
    crc_rest: u32,
    /// Number of records.
    pub count: u32,
    /// First record's timestamp.
    pub first_ts: i64,
    /// Largest record timestamp.
    pub max_ts: i64,
}

impl PendingBatch {
    /// Encode `records` (must be non-empty; the caller checks).
    pub fn encode(records: &[Record]) -> Self {
        let body: usize = records.iter().map(Record::encoded_len).sum();
        let mut buf = Vec::with_capacity(BATCH_HEADER_LEN + body);
        let first_ts = records.first().map_or(0, |r| r.timestamp);
        let max_ts = records.iter().map(|r| r.timestamp).max().unwrap_or(0);
        let total = BATCH_HEADER_LEN + body;
        buf.extend_from_slice(&((total - LEN_FIELD) as u32).to_le_bytes());
        buf.extend_from_slice(&[0u8; 12]); // crc + base offset, patched by finalize
        buf.push(MAGIC);
        buf.extend_from_slice(&(records.len() as u32).to_le_bytes());
        buf.extend_from_slice(&first_ts.to_le_bytes());
        buf.extend_from_slice(&max_ts.to_le_bytes());
        for r in records {
            buf.extend_from_slice(&r.timestamp.to_le_bytes());
            match &r.key {
                Some(k) => {
                    buf.extend_from_slice(&(k.len() as i32).to_le_bytes());
                    buf.extend_from_slice(k);
                }
                None => buf.extend_from_slice(&(-1i32).to_le_bytes()),
            }
            buf.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
            buf.extend_from_slice(&r.value);
            buf.extend_from_slice(&(r.headers.len() as u32).to_le_bytes());
            for (k, v) in &r.headers {
                buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
                buf.extend_from_slice(k.as_bytes());
                buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
                buf.extend_from_slice(v);
            }
        }
        let crc_rest = crc32c::crc32c_append(crc32c::crc32c(&buf[..LEN_FIELD]), &buf[REST_START..]);
        PendingBatch {
            buf,
            crc_rest,
            count: records.len() as u32,
            first_ts,
            max_ts,
        }
    }

    /// Size of the batch on disk.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Always false: batches hold at least one record.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Stamp the base offset and the final CRC; the bytes are then ready to write.
    pub fn finalize(&mut self, base_offset: u64) -> &[u8] {
        self.buf[CRC_END..REST_START].copy_from_slice(&base_offset.to_le_bytes());
        let crc = crc32c::crc32c_append(self.crc_rest, &self.buf[CRC_END..REST_START]);
        self.buf[LEN_FIELD..CRC_END].copy_from_slice(&crc.to_le_bytes());
        &self.buf
    }

    /// The (finalized) bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Encode a complete batch with a known base offset.
pub fn encode_batch(base_offset: u64, records: &[Record]) -> Bytes {
    let mut p = PendingBatch::encode(records);
    p.finalize(base_offset);
    Bytes::from(p.buf)
}

/// A decoded batch: its header and records (in offset order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Parsed header.
    pub header: BatchHeader,
    /// Records; record `i` has offset `header.base_offset + i`.
    pub records: Vec<Record>,
}

struct Cursor<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<usize, DecodeError> {
        if self.end - self.pos < n {
            return Err(DecodeError::Malformed("record overruns batch"));
        }
        let at = self.pos;
        self.pos += n;
        Ok(at)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let at = self.take(4)?;
        Ok(u32_at(self.buf, at))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        let at = self.take(8)?;
        Ok(u64_at(self.buf, at) as i64)
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let at = self.take(n)?;
        Ok(self.buf.slice(at..at + n))
    }
}

/// Decode the batch at `buf[at..]`, verifying the CRC. Record payloads are
/// zero-copy slices of `buf`. `on_record` receives `(offset, record)` for each
/// record whose offset is `>= skip_below`; it returns false to stop early.
pub fn decode_batch_with(
    buf: &Bytes,
    at: usize,
    skip_below: u64,
    mut on_record: impl FnMut(u64, Record) -> bool,
) -> Result<BatchHeader, DecodeError> {
    let slice = buf.get(at..).unwrap_or(&[]);
    let h = verify_batch(slice)?;
    let mut c = Cursor {
        buf,
        pos: at + BATCH_HEADER_LEN,
        end: at + h.total_len,
    };
    for i in 0..h.count {
        let timestamp = c.i64()?;
        let key_len = c.u32()? as i32;
        let key = match key_len {
            -1 => None,
            n if n >= 0 => Some(c.bytes(n as usize)?),
            _ => return Err(DecodeError::Malformed("negative key length")),
        };
        let vlen = c.u32()? as usize;
        let value = c.bytes(vlen)?;
        let hcount = c.u32()? as usize;
        // Each header needs at least 8 bytes; bounds the allocation on bad input.
        if hcount > (c.end - c.pos) / 8 {
            return Err(DecodeError::Malformed("header count overruns batch"));
        }
        let mut headers = Vec::with_capacity(hcount);
        for _ in 0..hcount {
            let nlen = c.u32()? as usize;
            let name = c.bytes(nlen)?;
            let name = std::str::from_utf8(&name)
                .map_err(|_| DecodeError::Malformed("header name is not UTF-8"))?
                .to_owned();
            let hvlen = c.u32()? as usize;
            headers.push((name, c.bytes(hvlen)?));
        }
        let offset = h.base_offset + u64::from(i);
        if offset >= skip_below
            && !on_record(
                offset,
                Record {
                    key,
                    value,
                    headers,
                    timestamp,
                },
            )
        {
            return Ok(h);
        }
    }
    if c.pos != c.end {
        return Err(DecodeError::Malformed("trailing bytes after records"));
    }
    Ok(h)
}

/// Decode the first batch in `buf`; returns it and the number of bytes consumed.
pub fn decode_batch(buf: &Bytes) -> Result<(Batch, usize), DecodeError> {
    let mut records = Vec::new();
    let header = decode_batch_with(buf, 0, 0, |_, r| {
        records.push(r);
        true
    })?;
    if records.len() != header.count as usize {
        return Err(DecodeError::Malformed("record count mismatch"));
    }
    Ok((Batch { header, records }, header.total_len))
}

/// Decode a buffer that must consist entirely of valid batches.
pub fn decode_all(buf: &Bytes) -> Result<Vec<Batch>, DecodeError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let rest = buf.slice(at..);
        let (b, n) = decode_batch(&rest)?;
        at += n;
        out.push(b);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            proptest::option::of(arb_bytes()),
            arb_bytes(),
            proptest::collection::vec(("[a-z\u{e9}]{0,8}", arb_bytes()), 0..3),
            any::<i64>(),
        )
            .prop_map(|(key, value, headers, timestamp)| Record {
                key,
                value,
                headers,
                timestamp,
            })
    }

    fn arb_batch() -> impl Strategy<Value = (u64, Vec<Record>)> {
        (
            0u64..u64::MAX / 2,
            proptest::collection::vec(arb_record(), 1..8),
        )
    }

    proptest! {
        #[test]
        fn round_trip((base, records) in arb_batch()) {
            let enc = encode_batch(base, &records);
            let (b, n) = decode_batch(&enc).expect("decode");
            prop_assert_eq!(n, enc.len());
            prop_assert_eq!(b.header.base_offset, base);
            prop_assert_eq!(b.header.count as usize, records.len());
            prop_assert_eq!(b.header.max_ts, records.iter().map(|r| r.timestamp).max().unwrap());
            prop_assert_eq!(b.records, records.clone());
            let sum: usize = records.iter().map(Record::encoded_len).sum();
            prop_assert_eq!(enc.len(), BATCH_HEADER_LEN + sum);
        }

        #[test]
        fn truncation_detected((base, records) in arb_batch(), cut in any::<prop::sample::Index>()) {
            let enc = encode_batch(base, &records);
            let cut = cut.index(enc.len());
            let t = enc.slice(..cut);
            prop_assert!(decode_batch(&t).is_err());
            prop_assert!(decode_all(&t).is_err() || cut == 0);
        }

        #[test]
        fn bit_flip_detected((base, records) in arb_batch(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let enc = encode_batch(base, &records);
            let mut v = enc.to_vec();
            let i = pos.index(v.len());
            v[i] ^= 1 << bit;
            let v = Bytes::from(v);
            prop_assert!(decode_all(&v).is_err());
        }

        #[test]
        fn garbage_never_panics(v in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_all(&Bytes::from(v));
        }

        #[test]
        fn multi_batch_stream(batches in proptest::collection::vec(arb_batch(), 1..4)) {
            let mut buf = Vec::new();
            for (b, r) in &batches { buf.extend_from_slice(&encode_batch(*b, r)); }
            let out = decode_all(&Bytes::from(buf)).expect("decode");
            prop_assert_eq!(out.len(), batches.len());
            for (o, (b, r)) in out.iter().zip(&batches) {
                prop_assert_eq!(o.header.base_offset, *b);
                prop_assert_eq!(&o.records, r);
            }
        }
    }

    #[test]
    fn skip_and_stop() {
        let recs: Vec<Record> = (0..5)
            .map(|i| Record {
                timestamp: i,
                ..Record::new(vec![i as u8])
            })
            .collect();
        let enc = encode_batch(10, &recs);
        let mut seen = Vec::new();
        decode_batch_with(&enc, 0, 12, |o, r| {
            seen.push((o, r.timestamp));
            seen.len() < 2
        })
        .expect("decode");
        assert_eq!(seen, vec![(12, 2), (13, 3)]);
    }
}
