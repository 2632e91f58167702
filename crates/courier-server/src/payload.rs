//! How stored bytes are shown in JSON responses: keys as text or base64, values as the
//! JSON they were sent as, else as text, else as base64 (with an encoding tag each).

use base64::Engine;
use serde_json::value::RawValue;

/// A key as `(text, "text")` when it is UTF-8, else `(base64, "base64")`.
pub fn key(k: Option<&[u8]>) -> (Option<String>, &'static str) {
    match k {
        None => (None, "text"),
        Some(k) => match std::str::from_utf8(k) {
            Ok(s) => (Some(s.to_string()), "text"),
            Err(_) => (
                Some(base64::engine::general_purpose::STANDARD.encode(k)),
                "base64",
            ),
        },
    }
}

/// A value as raw JSON (`"json"`), as a JSON string of its text (`"text"`), or as a
/// JSON string of its base64 (`"base64"`).
pub fn value(v: &[u8]) -> (Box<RawValue>, &'static str) {
    let as_string = |s: &str| RawValue::from_string(serde_json::to_string(s).unwrap_or_default());
    let (value, encoding) = match std::str::from_utf8(v) {
        Ok(text) => match RawValue::from_string(text.to_string()) {
            Ok(raw) => (Ok(raw), "json"),
            Err(_) => (as_string(text), "text"),
        },
        Err(_) => (
            as_string(&base64::engine::general_purpose::STANDARD.encode(v)),
            "base64",
        ),
    };
    let value = value.unwrap_or_else(|_| RawValue::from_string("null".into()).unwrap_or_default());
    (value, encoding)
}
