//! Where a partition stream starts and ends. AMQP 0-9-1 reports no message count for
//! streams, so both ends are read: the first retained message (consumer at `first`)
//! and the last chunk (consumer at `last`, read until it goes quiet). A stream that
//! delivers nothing within [`EMPTY_AFTER`] is empty.

use std::time::Duration;

use courier_core::Result;
use futures::StreamExt;
use lapin::Connection;

use crate::codec;
use crate::conn::{attach, err, StreamStart};

/// Silence after which a stream is taken to be empty.
pub const EMPTY_AFTER: Duration = Duration::from_millis(400);
/// Silence after which the last chunk is taken to be complete.
const CHUNK_QUIET: Duration = Duration::from_millis(60);

/// `(start, end)` of `stream`: first retained offset and the offset the next message
/// will get; `(0, 0)` when empty.
pub async fn extent(conn: &Connection, stream: &str) -> Result<(u64, u64)> {
    let (first, last) = tokio::try_join!(
        probe(conn, stream, StreamStart::First, false),
        probe(conn, stream, StreamStart::Last, true)
    )?;
    match (first, last) {
        (Some(s), Some(e)) => Ok((s, e + 1)),
        (Some(s), None) => Ok((s, s + 1)),
        (None, Some(e)) => Ok((e + 1, e + 1)),
        (None, None) => Ok((0, 0)),
    }
}

/// The first (or, with `to_end`, the highest seen) offset delivered from `start`.
async fn probe(
    conn: &Connection,
    stream: &str,
    start: StreamStart,
    to_end: bool,
) -> Result<Option<u64>> {
    let ch = conn.create_channel().await.map_err(err)?;
    let mut consumer = attach(&ch, stream, "courier-extent", 2000, start).await?;
    let mut best: Option<u64> = None;
    let mut wait = EMPTY_AFTER;
    while let Ok(Some(d)) = tokio::time::timeout(wait, consumer.next()).await {
        let d = d.map_err(err)?;
        if let Some(o) = codec::decode(&d.properties).offset {
            best = Some(best.map_or(o, |b| b.max(o)));
        }
        if !to_end {
            break;
        }
        wait = CHUNK_QUIET;
    }
    let _ = ch.close(200, "done".into()).await;
    Ok(best)
}
