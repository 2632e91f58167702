//! Test helper for the kill -9 crash test: appends under `FsyncPolicy::Always`
//! from several concurrent tasks and prints `ACK <offset> <value>` for every
//! acknowledged record, flushing stdout after each line, until killed.
//!
//! Usage: `courier-log-crash-writer DIR RUN_ID`

use courier_log::{FsyncPolicy, Log, LogError, LogOptions, Record, TopicConfig};
use std::io::Write;

const TOPIC: &str = "crash";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("missing DIR")?;
    let run = args.next().ok_or("missing RUN_ID")?;
    let log = Log::open(&dir, LogOptions::default()).await?;
    let cfg = TopicConfig {
        segment_bytes: 16 * 1024,
        fsync: FsyncPolicy::Always,
        ..TopicConfig::default()
    };
    match log.create_topic(TOPIC, cfg).await {
        Ok(()) | Err(LogError::TopicExists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let part = log.partition(TOPIC, 0)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY {}", part.end_offset())?;
        out.flush()?;
    }
    let mut tasks = Vec::new();
    for w in 0..4u32 {
        let part = part.clone();
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            loop {
                let n = 1 + (seq % 3) as usize;
                let values: Vec<String> = (0..n)
                    .map(|i| format!("{run}-{w}-{}", seq + i as u64))
                    .collect();
                let records = values.iter().map(|v| Record::new(v.clone())).collect();
                let res = part.append(records).await?;
                let mut out = std::io::stdout().lock();
                for (i, v) in values.iter().enumerate() {
                    writeln!(out, "ACK {} {v}", res.base_offset + i as u64).map_err(|e| {
                        LogError::Io {
                            path: "stdout".into(),
                            source: e,
                        }
                    })?;
                }
                out.flush().map_err(|e| LogError::Io {
                    path: "stdout".into(),
                    source: e,
                })?;
                seq += n as u64;
            }
            #[allow(unreachable_code)]
            Ok::<(), LogError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
