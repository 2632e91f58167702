//! `courier produce`: stdin lines → messages.

use std::time::Instant;

use anyhow::{bail, Context};
use courier::{Client, Message};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Sends awaited in windows of this size, so memory stays bounded on huge inputs.
const WINDOW: usize = 10_000;

#[derive(clap::Args)]
pub struct Args {
    /// Destination topic.
    #[arg(long)]
    topic: String,
    /// Key for every message (ignored with --key-separator).
    #[arg(long)]
    key: Option<String>,
    /// Split each line at the first SEP: the part before is the key.
    #[arg(long)]
    key_separator: Option<String>,
    /// Header NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once('=')
            .with_context(|| format!("--header {h:?}: expected NAME=VALUE"))?;
        headers.push((k.to_string(), v.to_string()));
    }
    if args.key_separator.as_deref() == Some("") {
        bail!("--key-separator must not be empty");
    }
    let producer = client.producer();
    let started = Instant::now();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut pending = Vec::with_capacity(WINDOW);
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut first_error: Option<courier::Error> = None;
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        let (key, value) = match &args.key_separator {
            Some(sep) => match line.split_once(sep.as_str()) {
                Some((k, v)) => (Some(k.to_string()), v.to_string()),
                None => (None, line),
            },
            None => (args.key.clone(), line),
        };
        let mut msg = Message::new(&args.topic, value);
        if let Some(k) = key {
            msg = msg.key(k);
        }
        for (k, v) in &headers {
            msg = msg.header(k.clone(), v.clone());
        }
        pending.push(producer.send(msg));
        if pending.len() >= WINDOW {
            for h in std::mem::take(&mut pending) {
                tally(h.await, &mut sent, &mut failed, &mut first_error);
            }
        }
    }
    for h in pending {
        tally(h.await, &mut sent, &mut failed, &mut first_error);
    }
    producer.close().await?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "produced {sent} messages to {} in {secs:.3} s ({:.0} msg/s){}",
        args.topic,
        sent as f64 / secs,
        if failed > 0 {
            format!(", {failed} FAILED")
        } else {
            String::new()
        }
    );
    if let Some(e) = first_error {
        bail!(
            "{failed} of {} messages were not acknowledged: {e}",
            sent + failed
        );
    }
    Ok(())
}

fn tally(
    r: courier::Result<courier::Receipt>,
    sent: &mut u64,
    failed: &mut u64,
    first: &mut Option<courier::Error>,
) {
    match r {
        Ok(_) => *sent += 1,
        Err(e) => {
            *failed += 1;
            first.get_or_insert(e);
        }
    }
}
