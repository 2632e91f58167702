//! `courier consume`: a group member that prints what it handles and commits exactly
//! what it printed.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use courier::{Client, Delivery, Error, FailurePolicy, Headers, OffsetReset};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// The value bytes as they are.
    Raw,
    /// One JSON object per line with topic, partition, offset, key, headers, timestamp, value.
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum From {
    Earliest,
    Latest,
}

#[derive(clap::Args)]
pub struct Args {
    /// Topic to read (repeatable).
    #[arg(long, required = true)]
    topic: Vec<String>,
    /// Consumer group id.
    #[arg(long)]
    group: String,
    /// Where a group without a committed position starts.
    #[arg(long, value_enum, default_value = "latest")]
    from: From,
    /// Exit after this many messages.
    #[arg(long)]
    max: Option<u64>,
    /// Exit after this many seconds without a message.
    #[arg(long, value_name = "SECONDS")]
    idle_timeout: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
}

/// One line to print; the handler waits for `done` so it commits only printed lines.
struct Line {
    text: Vec<u8>,
    done: oneshot::Sender<bool>,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Line>(64);
    let format = args.format;
    let consumer = client
        .consumer(&args.group)
        .auto_offset_reset(match args.from {
            From::Earliest => OffsetReset::Earliest,
            From::Latest => OffsetReset::Latest,
        })
        // A line not printed (output closed, --max reached) must simply stay
        // uncommitted, never be retried into a dead-letter topic.
        .failure_policy(FailurePolicy::Redeliver {
            after: Duration::from_secs(1),
        })
        .start(args.topic.clone(), move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let (done, printed) = oneshot::channel();
                let text = render(&d, format);
                tx.send(Line { text, done })
                    .await
                    .map_err(|_| Error::ConsumerClosed)?;
                match printed.await {
                    Ok(true) => Ok(()),
                    _ => Err(Error::ConsumerClosed),
                }
            }
        })
        .await
        .context("subscribing")?;
    let idle = args.idle_timeout.map(Duration::from_secs_f64);
    let mut count = 0u64;
    let stdout = std::io::stdout();
    loop {
        if args.max.is_some_and(|m| count >= m) {
            break;
        }
        let next = match idle {
            Some(d) => match tokio::time::timeout(d, rx.recv()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => rx.recv().await,
        };
        let Some(line) = next else { break };
        let mut out = stdout.lock();
        let ok = out
            .write_all(&line.text)
            .and_then(|_| out.write_all(b"\n"))
            .and_then(|_| out.flush())
            .is_ok();
        drop(out);
        let _ = line.done.send(ok);
        if !ok {
            anyhow::bail!("stdout closed");
        }
        count += 1;
    }
    // Lines handed over but not printed are refused, so they are not committed.
    rx.close();
    while let Some(line) = rx.recv().await {
        let _ = line.done.send(false);
    }
    consumer.stop().await.context("committing")?;
    Ok(())
}

/// Bytes as a JSON string when they are UTF-8, else as `{"base64": …}`.
pub(crate) fn bytes_json(b: &Bytes) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) }),
    }
}

/// Headers as a JSON object, each value as [`bytes_json`] renders it.
pub(crate) fn headers_json(h: &Headers) -> Value {
    Value::Object(
        h.iter()
            .map(|(k, v)| (k.to_string(), bytes_json(v)))
            .collect(),
    )
}

fn render(d: &Delivery, format: Format) -> Vec<u8> {
    match format {
        Format::Raw => d.value.to_vec(),
        Format::Json => {
            let v = json!({
                "topic": &*d.topic,
                "partition": d.partition,
                "offset": d.offset,
                "id": &*d.id,
                "key": d.key.as_ref().map(bytes_json),
                "headers": headers_json(&d.headers),
                "timestamp": d.timestamp,
                "value": bytes_json(&d.value),
            });
            v.to_string().into_bytes()
        }
    }
}
