//! `kill -9` of `courier serve` during a produce load loses no message that got a
//! 200: after three crashes, every acknowledged message is in the log at the
//! partition and offset its answer named, with its value.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{Client, Delivery};
use serde_json::{json, Value};
use std::sync::Mutex;

const TOKEN: &str = "crash-test-admin-token";

fn start_server(data: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("--url")
        .arg(format!("file://{}", data.display()))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("COURIER_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn courier serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (child, base)
}

type Acked = Arc<Mutex<Vec<(u32, u64, String)>>>;

async fn load(http: reqwest::Client, base: String, worker: usize, round: usize, acked: Acked) {
    for n in 0.. {
        let batch = n % 5 == 4;
        let values: Vec<String> = if batch {
            (0..20)
                .map(|i| format!("r{round}-w{worker}-n{n}-b{i}"))
                .collect()
        } else {
            vec![format!("r{round}-w{worker}-n{n}")]
        };
        let (path, body) = if batch {
            let msgs: Vec<Value> = values
                .iter()
                .map(|v| json!({"topicName": "crash.t", "key": v, "value": v}))
                .collect();
            ("/api/v1/mq/messages/batch", json!({"messages": msgs}))
        } else {
            (
                "/api/v1/mq/messages",
                json!({"topicName": "crash.t", "key": values[0], "value": values[0]}),
            )
        };
        let resp = match http
            .post(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(_) => return, // the server died
        };
        if resp.status() != 200 {
            return;
        }
        let Ok(v) = resp.json::<Value>().await else {
            return;
        };
        let results: Vec<Value> = if batch {
            v["data"]["results"].as_array().unwrap().clone()
        } else {
            vec![v["data"].clone()]
        };
        let mut a = acked.lock().unwrap();
        for (r, val) in results.iter().zip(values) {
            a.push((
                r["partition"].as_u64().unwrap() as u32,
                r["offset"].as_u64().unwrap(),
                val,
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_produce_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let acked: Acked = Arc::default();
    for round in 0..3 {
        let (mut child, base) = start_server(&data);
        if round == 0 {
            let r = http
                .post(format!("{base}/api/v1/mq/topics"))
                .bearer_auth(TOKEN)
                .json(&json!({"name": "crash.t", "partitions": 4}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        let before = acked.lock().unwrap().len();
        let tasks: Vec<_> = (0..16)
            .map(|w| tokio::spawn(load(http.clone(), base.clone(), w, round, acked.clone())))
            .collect();
        // Kill once this round has a few thousand acknowledgements in flight.
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < before + 1000 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            acked.lock().unwrap().len() > before,
            "round {round} acknowledged nothing"
        );
    }

    let acked = acked.lock().unwrap().clone();
    let client = Client::connect(&format!("file://{}", data.display()))
        .await
        .unwrap();
    let seen: Arc<Mutex<HashMap<(u32, u64), String>>> = Arc::default();
    let s = seen.clone();
    let consumer = client
        .consumer("crash.verify.group")
        .from_earliest()
        .start(["crash.t"], move |d: Delivery| {
            let s = s.clone();
            async move {
                let v: String = d.json()?;
                s.lock().unwrap().insert((d.partition, d.offset), v);
                Ok::<(), courier::Error>(())
            }
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = acked
            .iter()
            .filter(|(p, o, _)| !seen.lock().unwrap().contains_key(&(*p, *o)))
            .count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acknowledged messages are not in the log",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    {
        let seen = seen.lock().unwrap();
        for (p, o, v) in &acked {
            assert_eq!(seen.get(&(*p, *o)), Some(v), "message at {p}/{o}");
        }
    }
    eprintln!(
        "{} acknowledged messages over 3 kill -9 rounds, all present",
        acked.len()
    );
    consumer.stop().await.unwrap();
    client.shutdown(Duration::from_secs(10)).await.unwrap();
}
