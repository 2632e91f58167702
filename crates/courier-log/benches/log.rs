//! Throughput benchmarks of courier-log against the raw disk ceiling.
//!
//! Run: `CARGO_TARGET_DIR=/work/target-log cargo bench -p courier-log --bench log`
//! Data goes to a temporary directory under `$COURIER_LOG_BENCH_DIR`
//! (default: the system temp dir).

use bytes::Bytes;
use courier_log::{FsyncPolicy, Log, LogOptions, Record, TopicConfig};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

fn records(n: usize, value_len: usize) -> Vec<Record> {
    let value = Bytes::from(vec![b'x'; value_len]);
    (0..n)
        .map(|_| Record {
            key: None,
            value: value.clone(),
            headers: Vec::new(),
            timestamp: 1_700_000_000_000,
        })
        .collect()
}

/// The same bytes with plain `write` (MB/s at the last write) and then one
/// `fdatasync` (MB/s including it).
fn raw_ceiling(dir: &Path, chunk: usize, chunks: usize) -> Result<(f64, f64), BoxErr> {
    let path = dir.join("raw.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let buf = vec![b'x'; chunk];
    let t = Instant::now();
    for _ in 0..chunks {
        f.write_all(&buf)?;
    }
    let written = t.elapsed().as_secs_f64();
    f.sync_data()?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    let mb = (chunk * chunks) as f64 / 1e6;
    Ok((mb / written, mb / secs))
}

async fn batched_append(
    log: &Log,
    topic: &str,
    partitions: u32,
    batch: usize,
    batches_per_partition: usize,
    value_len: usize,
) -> Result<(f64, f64, f64), BoxErr> {
    let cfg = TopicConfig {
        partitions,
        fsync: FsyncPolicy::Interval(1000),
        ..TopicConfig::default()
    };
    log.create_topic(topic, cfg).await?;
    let template = records(batch, value_len);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..partitions {
        let part = log.partition(topic, p)?;
        let template = template.clone();
        tasks.push(tokio::spawn(async move {
            // Two appends in flight per partition so encoding overlaps writing.
            let mut pending = std::collections::VecDeque::new();
            for _ in 0..batches_per_partition {
                let part = part.clone();
                let recs = template.clone();
                pending.push_back(tokio::spawn(async move { part.append(recs).await }));
                if pending.len() >= 2 {
                    if let Some(h) = pending.pop_front() {
                        h.await??;
                    }
                }
            }
            for h in pending {
                h.await??;
            }
            Ok::<_, BoxErr>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let acked = t.elapsed().as_secs_f64();
    log.flush().await?;
    let secs = t.elapsed().as_secs_f64();
    let n = (batch * batches_per_partition * partitions as usize) as f64;
    let part = log.partition(topic, 0)?;
    let bytes = part.size_bytes() as f64 * f64::from(partitions);
    Ok((n / acked, bytes / acked / 1e6, bytes / secs / 1e6))
}

fn quiesce() {
    // Let writeback of earlier phases finish so phases do not disturb each other.
    let _ = std::process::Command::new("sync").status();
}

async fn always_appenders(
    log: &Log,
    topic: &str,
    partitions: u32,
    appenders: u32,
    per_task: usize,
) -> Result<f64, BoxErr> {
    let cfg = TopicConfig {
        partitions,
        fsync: FsyncPolicy::Always,
        ..TopicConfig::default()
    };
    log.create_topic(topic, cfg).await?;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..appenders {
        let part = log.partition(topic, i % partitions)?;
        tasks.push(tokio::spawn(async move {
            let r = records(1, 100);
            for _ in 0..per_task {
                part.append(r.clone()).await?;
            }
            Ok::<_, BoxErr>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((appenders as usize * per_task) as f64 / t.elapsed().as_secs_f64())
}

fn raw_sync_latency(dir: &Path) -> Result<f64, BoxErr> {
    let path = dir.join("raw-sync.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let buf = vec![b'x'; 160];
    let t = Instant::now();
    for _ in 0..500 {
        f.write_all(&buf)?;
        f.sync_data()?;
    }
    std::fs::remove_file(&path)?;
    Ok(t.elapsed().as_secs_f64() / 500.0 * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxErr> {
    let base = std::env::var_os("COURIER_LOG_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::tempdir_in(&base)?;
    let log = Log::open(
        dir.path(),
        LogOptions {
            retention_check_interval: None,
            ..LogOptions::default()
        },
    )
    .await?;
    println!("courier-log benchmark (dir {})", dir.path().display());
    // COURIER_LOG_BENCH_ONLY=always|append|read1k selects phases (for profiling).
    let only = std::env::var("COURIER_LOG_BENCH_ONLY").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);

    // 1. Group commit: 64 concurrent single-record appenders under Always.
    if run("always") {
        quiesce();
        let lat = raw_sync_latency(dir.path())?;
        println!("raw write(160 B)+fdatasync, 1 writer:                {lat:>8.0} us per sync ({:.0} syncs/s)", 1e6 / lat);
        let r1 = always_appenders(&log, "always1", 1, 64, 2000).await?;
        println!("64 single-record appenders, Always, 1 partition:     {r1:>10.0} rec/s (= {:.1} records per fdatasync at raw latency)", r1 * lat / 1e6);
        let r8 = always_appenders(&log, "always8", 8, 64, 1000).await?;
        println!("64 single-record appenders, Always, 8 partitions:    {r8:>10.0} rec/s");
        let r512 = always_appenders(&log, "always512", 1, 512, 400).await?;
        println!("512 single-record appenders, Always, 1 partition:    {r512:>10.0} rec/s (= {:.1} records per fdatasync at raw latency)", r512 * lat / 1e6);
        let lat2 = raw_sync_latency(dir.path())?;
        println!("raw write(160 B)+fdatasync, 1 writer (again):        {lat2:>8.0} us per sync");
    }
    if !(run("append") || run("read1k")) {
        return Ok(());
    }

    // 2. Batched append, Interval fsync, 100-byte values, batches of 1000.
    quiesce();
    let batches = 2000;
    let (recs, mbs, mbs_flushed) = batched_append(&log, "b100", 1, 1000, batches, 100).await?;
    let part = log.partition("b100", 0)?;
    let bytes = part.size_bytes();
    quiesce();
    let (raw_w, raw_s) = raw_ceiling(dir.path(), (bytes / batches as u64) as usize, batches)?;
    println!("append 100 B x1000/batch, Interval(1s), 1 partition: {recs:>10.0} rec/s {mbs:>7.1} MB/s acked, {mbs_flushed:>6.1} MB/s incl. final fdatasync");
    println!("  raw ceiling, same bytes & chunks, 1 file:                         {raw_w:>7.1} MB/s write,  {raw_s:>6.1} MB/s incl. final fdatasync");
    quiesce();
    let (recs4, mbs4, mbs4f) = batched_append(&log, "b100x4", 4, 1000, batches / 4, 100).await?;
    println!("append 100 B x1000/batch, Interval(1s), 4 partitions:{recs4:>10.0} rec/s {mbs4:>7.1} MB/s acked, {mbs4f:>6.1} MB/s incl. final fdatasync");

    // 3. Read throughput over the records of step 2 (page cache).
    let t = Instant::now();
    let mut next = 0u64;
    let mut n = 0usize;
    let end = part.end_offset();
    while next < end {
        let r = part.read(next, 10_000, 4 << 20)?;
        n += r.records.len();
        next = r.next_offset;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "read 100 B records, 1 reader:                        {:>10.0} rec/s {:>7.1} MB/s",
        n as f64 / secs,
        bytes as f64 / secs / 1e6
    );

    // 4. 1 KiB values, batches of 100.
    if !run("read1k") {
        return Ok(());
    }
    quiesce();
    let (recs, mbs, mbsf) = batched_append(&log, "b1k", 1, 100, 2000, 1024).await?;
    let bytes = log.partition("b1k", 0)?.size_bytes();
    quiesce();
    let (raw_w, raw_s) = raw_ceiling(dir.path(), (bytes / 2000) as usize, 2000)?;
    println!("append 1 KiB x100/batch, Interval(1s):               {recs:>10.0} rec/s {mbs:>7.1} MB/s acked, {mbsf:>6.1} MB/s incl. final fdatasync");
    println!("  raw ceiling, same bytes & chunks, 1 file:                         {raw_w:>7.1} MB/s write,  {raw_s:>6.1} MB/s incl. final fdatasync");
    drop(part);
    drop(log);
    Ok(())
}
