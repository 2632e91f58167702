//! Value compression (SPEC R6): lz4 (block format with the uncompressed size
//! prepended) for values over a threshold, marked `content-encoding: lz4`.

use bytes::Bytes;
use courier_core::Headers;

/// Header naming the value's encoding.
pub const HEADER_CONTENT_ENCODING: &str = "content-encoding";
/// The only encoding Courier writes.
pub const LZ4: &str = "lz4";
/// Values larger than this many bytes are compressed by default (seed 001: 1 KiB;
/// `producerConfig.compressionThreshold`).
pub const DEFAULT_THRESHOLD: usize = courier_core::config::DEFAULT_COMPRESSION_THRESHOLD;

/// Compresses `value` in place when it is over `threshold`, not already encoded and
/// compression actually saves space (random data does not).
pub(crate) fn compress_if_large(value: &mut Bytes, headers: &mut Headers, threshold: usize) {
    if value.len() <= threshold || headers.get_ignore_case(HEADER_CONTENT_ENCODING).is_some() {
        return;
    }
    let packed = lz4_flex::compress_prepend_size(value);
    if packed.len() < value.len() {
        *value = Bytes::from(packed);
        headers.insert(HEADER_CONTENT_ENCODING, LZ4);
    }
}

/// The value as the producer gave it. `Ok(None)` when the value is not compressed;
/// an error for an lz4 value that does not decode or an encoding Courier does not know.
pub(crate) fn decompress(value: &Bytes, headers: &Headers) -> Result<Option<Bytes>, String> {
    let Some(enc) = headers.get_ignore_case(HEADER_CONTENT_ENCODING) else {
        return Ok(None);
    };
    if !enc.eq_ignore_ascii_case(LZ4.as_bytes()) {
        // Another producer's encoding (gzip, identity …) is the handler's business.
        return Ok(None);
    }
    // The size prefix is untrusted: lz4 cannot expand more than ~255×, so a larger
    // claim is corruption, refused before it turns into a huge allocation.
    let claimed = value
        .get(..4)
        .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize)
        .ok_or_else(|| "corrupt lz4 value: shorter than its size prefix".to_string())?;
    if claimed > value.len().saturating_mul(255).saturating_add(64) {
        return Err(format!(
            "corrupt lz4 value: claims {claimed} bytes from {}",
            value.len()
        ));
    }
    let out = lz4_flex::decompress_size_prepended(value)
        .map_err(|e| format!("corrupt lz4 value: {e}"))?;
    if out.len() != claimed {
        return Err("corrupt lz4 value: size mismatch".to_string());
    }
    Ok(Some(Bytes::from(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_values_round_trip_small_and_random_ones_stay() {
        let text = Bytes::from("hello courier ".repeat(200));
        let mut v = text.clone();
        let mut h = Headers::new();
        compress_if_large(&mut v, &mut h, DEFAULT_THRESHOLD);
        assert!(v.len() < text.len());
        assert_eq!(h.get_str(HEADER_CONTENT_ENCODING), Some(LZ4));
        assert_eq!(decompress(&v, &h).unwrap(), Some(text));

        let mut small = Bytes::from("tiny");
        let mut h = Headers::new();
        compress_if_large(&mut small, &mut h, DEFAULT_THRESHOLD);
        assert!(h.is_empty());
        assert_eq!(decompress(&small, &h).unwrap(), None);

        let mut h = Headers::new();
        h.insert(HEADER_CONTENT_ENCODING, LZ4);
        assert!(decompress(&v.slice(..v.len() / 2), &h).is_err());
        assert!(decompress(&Bytes::from_static(&[255, 255, 255, 255, 7]), &h).is_err());
        assert!(decompress(&Bytes::from_static(&[1, 0]), &h).is_err());
    }
}
