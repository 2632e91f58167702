//! kill -9 crash test: a child process appends under `FsyncPolicy::Always`
//! and prints every acknowledged offset; we SIGKILL it at random points, then
//! check that every acknowledged record is present exactly once, in order.

use courier_log::{Log, LogOptions};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ITERATIONS: usize = 24;

fn run_child(dir: &std::path::Path, run: usize, kill_after: Duration) -> Vec<(u64, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier-log-crash-writer"))
        .arg(dir)
        .arg(format!("r{run}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn crash writer");
    let stdout = child.stdout.take().expect("stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let ready = Arc::new(Mutex::new(false));
    let reader = {
        let lines = lines.clone();
        let ready = ready.clone();
        std::thread::spawn(move || {
            // A line without its newline was cut by the kill: ignore it.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("READY") {
                    *ready.lock().expect("lock") = true;
                } else if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut it = rest.splitn(2, ' ');
                    let off: u64 = it.next().and_then(|o| o.parse().ok()).expect("offset");
                    let v = it.next().expect("value").to_string();
                    lines.lock().expect("lock").push((off, v));
                }
            }
        })
    };
    let t0 = Instant::now();
    while !*ready.lock().expect("lock") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "child never became ready"
        );
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("child exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
    child.wait().expect("wait");
    reader.join().expect("reader thread");
    let v = lines.lock().expect("lock").clone();
    v
}

#[test]
fn kill_9_loses_no_acknowledged_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut total_acked = 0;
    for run in 0..ITERATIONS {
        let kill_after = Duration::from_millis(rng.gen_range(5..120));
        let got = run_child(dir.path(), run, kill_after);
        total_acked += got.len();
        for (o, v) in got {
            assert!(
                acked.insert(v.clone(), o).is_none(),
                "value {v} acked twice"
            );
        }
        rt.block_on(async {
            let log = Log::open(dir.path(), LogOptions::default())
                .await
                .expect("reopen after kill");
            let part = log.partition("crash", 0).expect("partition");
            let mut seen: HashMap<String, u64> = HashMap::new();
            // Per (run, writer), sequence numbers must appear in offset order.
            let mut last_seq: HashMap<String, u64> = HashMap::new();
            let mut next = part.start_offset();
            assert_eq!(next, 0);
            loop {
                let r = part.read(next, 10_000, 8 << 20).expect("read");
                if r.records.is_empty() {
                    break;
                }
                for s in &r.records {
                    assert_eq!(s.offset, next, "offsets are dense");
                    next += 1;
                    let v = String::from_utf8(s.record.value.to_vec()).expect("utf8");
                    assert!(
                        seen.insert(v.clone(), s.offset).is_none(),
                        "{v} stored twice"
                    );
                    let (writer, seq) = v.rsplit_once('-').expect("value format");
                    let seq: u64 = seq.parse().expect("seq");
                    if let Some(prev) = last_seq.insert(writer.to_string(), seq) {
                        assert!(seq > prev, "{writer}: seq {seq} after {prev}");
                    }
                }
            }
            assert_eq!(next, part.end_offset());
            for (v, o) in &acked {
                assert_eq!(
                    seen.get(v),
                    Some(o),
                    "acknowledged {v} at {o} missing after run {run}"
                );
            }
        });
    }
    eprintln!("{ITERATIONS} kills, {total_acked} acknowledged records verified");
    assert!(
        total_acked > 100,
        "the writer made too little progress: {total_acked}"
    );
}
