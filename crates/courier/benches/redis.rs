//! Courier on redis:// side by side with a bare `redis`-crate loop and with
//! `redis-benchmark`, in one run, on one server (127.0.0.1:6379 unless
//! COURIER_REDIS_URL is set). Courier's default settings, 100-byte values, keyed
//! messages, 4 partitions (= 4 streams on both sides).
//!
//! - produce: Courier's producer (`send` per message, awaited at the end) vs a bare
//!   loop of pipelined `XADD … * v <value>` in batches of 1000;
//! - consume: a Courier consumer group from earliest (timed from subscribe) vs a bare
//!   `XREADGROUP COUNT 1000` over the 4 streams + one `XACK` per stream per batch;
//! - `redis-benchmark -P 64 XADD` (50 clients) when the binary is on PATH.
//!
//! `cargo bench -p courier --features redis --bench redis` (BENCH_N messages, default
//! 300000; BENCH_ROUNDS rounds, default 2; BENCH_PRODUCE_ONLY=1 skips consuming).
//! Besides rates it prints CPU µs per message of this process (client) and of the
//! server (`INFO cpu` deltas; on a shared server other clients' load is included).
//! Everything it writes is deleted after.

mod common;

use common::{courier_produce, env_usize, rate, unique, value, with_cpu};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{Client, Config, Delivery, Error, TopicSpec};
use redis::aio::MultiplexedConnection;
use redis::Value;

const PARTITIONS: u32 = 4;
const BATCH: usize = 1000;

fn bare_streams(base: &str) -> Vec<String> {
    (0..PARTITIONS).map(|p| format!("{base}:{p}")).collect()
}

async fn bare_produce(conn: &mut MultiplexedConnection, base: &str, n: usize) -> Duration {
    let streams = bare_streams(base);
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for j in i..(i + BATCH).min(n) {
            // Built inside the timed loop, as on Courier's side (`courier_produce`).
            pipe.cmd("XADD")
                .arg(&streams[j % streams.len()])
                .arg("*")
                .arg("v")
                .arg(value(j));
        }
        let ids: Vec<Value> = pipe.query_async(conn).await.expect("xadd");
        std::hint::black_box(ids);
        i += BATCH;
    }
    start.elapsed()
}

async fn bare_consume(conn: &mut MultiplexedConnection, base: &str, n: usize) -> Duration {
    let streams = bare_streams(base);
    let group = unique("bench-bare-g");
    for s in &streams {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(s)
            .arg(&group)
            .arg("0")
            .query_async(conn)
            .await
            .expect("group");
    }
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&group)
            .arg("c1")
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(&streams);
        for _ in &streams {
            cmd.arg(">");
        }
        let reply: redis::streams::StreamReadReply = cmd.query_async(conn).await.expect("read");
        let mut pipe = redis::pipe();
        for key in reply.keys {
            got += key.ids.len();
            let ids: Vec<&str> = key.ids.iter().map(|e| e.id.as_str()).collect();
            std::hint::black_box(&key.ids);
            pipe.cmd("XACK").arg(&key.key).arg(&group).arg(ids).ignore();
        }
        let _: () = pipe.query_async(conn).await.expect("ack");
    }
    start.elapsed()
}

async fn courier_consume(client: &Client, topic: &str, n: usize) -> Duration {
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (c, d) = (count.clone(), done.clone());
    let start = Instant::now();
    let handle = client
        .consumer(unique("bench-courier"))
        .from_earliest()
        .start([topic.to_string()], move |m: Delivery| {
            let (c, d) = (c.clone(), d.clone());
            async move {
                std::hint::black_box(&m);
                if c.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                    d.notify_one();
                }
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("subscribe");
    tokio::time::timeout(Duration::from_secs(300), done.notified())
        .await
        .expect("consumed in time");
    let total = start.elapsed();
    handle.stop().await.expect("stop");
    total
}

/// The server's CPU seconds (user + sys) so far, from `INFO cpu`.
async fn server_cpu(conn: &mut MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            matches!(k, "used_cpu_sys" | "used_cpu_user")
                .then(|| v.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Runs `f` and returns its result with client and server CPU µs per message.
async fn measured<T>(
    conn: &mut MultiplexedConnection,
    n: usize,
    f: impl std::future::Future<Output = T>,
) -> (T, f64, f64) {
    let s0 = server_cpu(conn).await;
    let (out, client) = with_cpu(n, f).await;
    let server = (server_cpu(conn).await - s0) * 1e6 / n as f64;
    (out, client, server)
}

/// `redis-benchmark -P 64 XADD` (50 clients) on a throw-away key; requests/s.
fn redis_benchmark(host: &str, port: u16, n: usize) -> Option<(f64, String)> {
    let key = unique("bench-rb");
    let v = "x".repeat(100);
    let args = [
        "-h".to_string(),
        host.to_string(),
        "-p".to_string(),
        port.to_string(),
        "-n".to_string(),
        n.to_string(),
        "-P".to_string(),
        "64".to_string(),
        "-q".to_string(),
        "XADD".to_string(),
        key.clone(),
        "*".to_string(),
        "v".to_string(),
        v,
    ];
    let out = std::process::Command::new("redis-benchmark")
        .args(&args)
        .output()
        .ok()?;
    let _ = std::process::Command::new("redis-cli")
        .args(["-h", host, "-p", &port.to_string(), "DEL", &key])
        .output();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "XADD …: 123456.78 requests per second, p50=…" (after \r progress lines)
    let rate = text.rsplit('\r').chain(text.lines()).find_map(|l| {
        let (_, rest) = l.rsplit_once(": ")?;
        rest.split_whitespace().next()?.parse::<f64>().ok()
    })?;
    Some((
        rate,
        format!(
            "redis-benchmark {}",
            args[..9].join(" ") + " XADD <key> * v <100 bytes>"
        ),
    ))
}

#[tokio::main]
async fn main() {
    let n = env_usize("BENCH_N", 300_000);
    let rounds = env_usize("BENCH_ROUNDS", 2);
    let produce_only = env_usize("BENCH_PRODUCE_ONLY", 0) == 1;
    let url =
        std::env::var("COURIER_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let config = Config::with_url(url.clone());
    let client = Client::connect_with(config.clone()).await.expect("connect");
    let bare_client = redis::Client::open(url.as_str()).expect("url");
    let mut conn = bare_client
        .get_multiplexed_async_connection()
        .await
        .expect("bare connect");
    println!(
        "redis bench: {n} messages of 100 bytes, {PARTITIONS} partitions/streams, Courier defaults"
    );
    let (mut ours_p, mut bare_p, mut ours_c, mut bare_c) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let t_ours = unique("bench-ours");
        let bare = unique("bench:bare");
        client
            .admin()
            .create_topic(TopicSpec::new(&t_ours, PARTITIONS))
            .await
            .expect("create");
        let mut bare_conn = conn.clone();
        let (b, b_cpu, b_srv) =
            measured(&mut conn, n, bare_produce(&mut bare_conn, &bare, n)).await;
        let (o, o_cpu, o_srv) = measured(&mut conn, n, courier_produce(&client, &t_ours, n)).await;
        println!(
            "round {round}: produce  courier {:>9.0} msg/s   bare pipelined XADD x{BATCH} {:>9.0} msg/s   ({:.0}%)",
            rate(n, o),
            rate(n, b),
            100.0 * rate(n, o) / rate(n, b)
        );
        println!(
            "round {round}: produce  CPU µs/msg client courier {o_cpu:.2} bare {b_cpu:.2}; server courier {o_srv:.2} bare {b_srv:.2}"
        );
        let (bc, oc) = if produce_only {
            (b, o)
        } else {
            let (bc, bc_cpu, bc_srv) =
                measured(&mut conn, n, bare_consume(&mut bare_conn, &bare, n)).await;
            let (oc, oc_cpu, oc_srv) =
                measured(&mut conn, n, courier_consume(&client, &t_ours, n)).await;
            println!(
                "round {round}: consume  courier {:>9.0} msg/s   bare XREADGROUP COUNT {BATCH} + XACK {:>9.0} msg/s   ({:.0}%)",
                rate(n, oc),
                rate(n, bc),
                100.0 * rate(n, oc) / rate(n, bc)
            );
            println!(
                "round {round}: consume  CPU µs/msg client courier {oc_cpu:.2} bare {bc_cpu:.2}; server courier {oc_srv:.2} bare {bc_srv:.2}"
            );
            (bc, oc)
        };
        ours_p.push(rate(n, o));
        bare_p.push(rate(n, b));
        ours_c.push(rate(n, oc));
        bare_c.push(rate(n, bc));
        let _ = client.admin().delete_topic(&t_ours).await;
        for s in bare_streams(&bare) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&s).query_async(&mut conn).await;
        }
    }
    let best = |v: &Vec<f64>| v.iter().cloned().fold(0.0, f64::max);
    println!("| what | courier msg/s | bare redis crate msg/s | courier / bare |");
    println!("|---|---|---|---|");
    let mut rows = vec![("produce (best of rounds)", best(&ours_p), best(&bare_p))];
    if !produce_only {
        rows.push((
            "consume incl. subscribe (best)",
            best(&ours_c),
            best(&bare_c),
        ));
    }
    for (what, o, b) in rows {
        println!("| {what} | {o:.0} | {b:.0} | {:.0}% |", 100.0 * o / b);
    }
    let info = bare_client.get_connection_info();
    let (host, port) = match info.addr() {
        redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
        _ => ("127.0.0.1".to_string(), 6379),
    };
    match redis_benchmark(&host, port, n) {
        Some((r, cmd)) => println!(
            "redis-benchmark -P 64 XADD: {r:.0} req/s ({cmd}); courier produce = {:.0}% of it",
            100.0 * best(&ours_p) / r
        ),
        None => println!("redis-benchmark not available; skipped"),
    }
    client
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
