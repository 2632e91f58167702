//! Small readers over `redis::Value` for the replies Courier parses by hand.

use courier_core::{Error, Result};
use redis::Value;

use crate::BACKEND;

/// Bytes of a string reply.
pub(crate) fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

/// An integer reply (also numeric strings).
pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => std::str::from_utf8(bytes(other)?).ok()?.parse().ok(),
    }
}

/// Items of an array-like reply (`Nil` is empty).
pub(crate) fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// A field → value view of a map-like reply (RESP3 map or RESP2 flat array).
pub(crate) fn pairs(v: &Value) -> Vec<(&Value, &Value)> {
    match v {
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        other => items(other)
            .chunks_exact(2)
            .map(|c| (&c[0], &c[1]))
            .collect(),
    }
}

/// The value of `field` in a map-like reply.
pub(crate) fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    pairs(v)
        .into_iter()
        .find(|(k, _)| bytes(k) == Some(name.as_bytes()))
        .map(|(_, v)| v)
}

/// Turns a server error carried as a value into an error.
pub(crate) fn check(v: Value) -> Result<Value> {
    match v {
        Value::ServerError(e) => Err(Error::backend(BACKEND, format!("{e:?}"))),
        other => Ok(other),
    }
}
