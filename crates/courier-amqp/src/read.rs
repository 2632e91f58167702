//! Reading a partition stream by offset, without a group: a consumer attached at the
//! offset, read until it has enough or goes quiet, then cancelled with its channel.

use std::time::Duration;

use bytes::Bytes;
use courier_core::{Record, Result, TopicPartition};
use futures::StreamExt;
use lapin::Connection;

use crate::codec;
use crate::conn::{attach, err, Credit, StreamStart};
use crate::extents::EMPTY_AFTER;
use crate::names;

/// Silence after the first delivery after which the stream is taken to be read to
/// its end (deliveries of one consumer arrive back to back).
const QUIET: Duration = Duration::from_millis(200);

/// Up to `max` records of `tp` from offset `from` on, in offset order. Fewer (or
/// none) when the stream ends sooner; a broker slower than [`EMPTY_AFTER`] to deliver
/// the first one reads as empty, so callers treat a short read as "maybe more".
pub async fn read_records(
    conn: &Connection,
    tp: &TopicPartition,
    from: u64,
    max: usize,
) -> Result<Vec<(u64, Record)>> {
    let mut out = Vec::new();
    if max == 0 {
        return Ok(out);
    }
    let ch = conn.create_channel().await.map_err(err)?;
    let prefetch = u16::try_from(max.min(2000)).unwrap_or(2000);
    let result = async {
        let stream = names::stream(&tp.topic, tp.partition);
        let mut consumer = attach(
            &ch,
            &stream,
            "courier-read",
            prefetch,
            StreamStart::Offset(from),
        )
        .await?;
        let mut credit = Credit::new(prefetch);
        let mut wait = EMPTY_AFTER;
        while out.len() < max {
            let Ok(Some(d)) = tokio::time::timeout(wait, consumer.next()).await else {
                break;
            };
            let d = d.map_err(err)?;
            wait = QUIET;
            credit.delivered(&d).await?;
            let dec = codec::decode(&d.properties);
            // The broker starts at the beginning of the chunk holding `from`.
            let Some(offset) = dec.offset.filter(|o| *o >= from) else {
                continue;
            };
            out.push((
                offset,
                Record {
                    topic: tp.topic.clone(),
                    partition: Some(tp.partition),
                    id: dec.id,
                    key: dec.key,
                    value: Bytes::from(d.data),
                    headers: dec.headers,
                    timestamp: dec.timestamp,
                },
            ));
        }
        Ok(())
    }
    .await;
    let _ = ch.close(200, "done".into()).await;
    result.map(|()| out)
}
