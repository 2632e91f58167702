//! The REST API through a real listening server (127.0.0.1:0) on a temporary file://
//! log: every endpoint and every error status.

use std::path::Path;
use std::time::{Duration, Instant};

use courier::Client;
use courier_server::{
    hash_token, RateLimitConfig, Role, RunningServer, ServeOptions, ServerConfig, TokenConfig,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

const ADMIN: &str = "admin-secret-for-tests";
const SVC: &str = "svc-secret-for-tests";
const SLOW: &str = "slow-secret-for-tests";

struct Api {
    base: String,
    http: reqwest::Client,
    server: Option<RunningServer>,
    client: Client,
    _dir: tempfile::TempDir,
}

fn token(name: &str, secret: &str, role: Role, topics: &[&str], rate: Option<u32>) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        sha256: hex(hash_token(secret)),
        role,
        topics: topics.iter().map(|s| s.to_string()).collect(),
        rate_per_second: rate,
    }
}

fn hex(b: [u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn base_config(dir: &Path) -> ServerConfig {
    ServerConfig {
        tokens: vec![
            token("svc", SVC, Role::Service, &["svc.*"], None),
            token("slow", SLOW, Role::Service, &["*"], Some(1)),
        ],
        rate_limit: RateLimitConfig {
            per_second: 100_000,
            burst: 100_000,
        },
        audit_log: Some(dir.join("audit.log")),
        visibility_timeout_ms: 30_000,
        max_poll_ms: 2_000,
        max_batch: 100,
        ..ServerConfig::default()
    }
}

async fn start_with(f: impl FnOnce(&mut ServerConfig, &Path)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    f(&mut config, dir.path());
    let tls = config.tls.clone();
    let url = format!("file://{}", dir.path().join("data").display());
    let client = Client::connect(&url).await.unwrap();
    let server = courier_server::start(
        client.clone(),
        ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            config,
            admin_token_file: dir.path().join("admin.sha256"),
            env_admin_token: Some(ADMIN.into()),
        },
    )
    .await
    .unwrap();
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(20));
    if let Some(t) = &tls {
        let pem = std::fs::read(&t.cert).unwrap();
        http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    let host = if tls.is_some() {
        "localhost".to_string()
    } else {
        "127.0.0.1".to_string()
    };
    Api {
        base: format!(
            "{}://{host}:{}",
            server.scheme(),
            server.local_addr().port()
        ),
        http: http.build().unwrap(),
        server: Some(server),
        client,
        _dir: dir,
    }
}

async fn start() -> Api {
    start_with(|_, _| {}).await
}

impl Api {
    async fn call(
        &self,
        method: &str,
        path: &str,
        tok: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.parse().unwrap(), url);
        if let Some(t) = tok {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if v.get("code").is_some() || !status.is_success() {
            assert_eq!(
                v["code"],
                status.as_u16(),
                "envelope code matches status: {v}"
            );
            assert!(v["message"].is_string(), "{v}");
        }
        (status, v)
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, Some(ADMIN), body).await
    }

    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(5)).await.unwrap();
        }
        self.client.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_crud_and_errors() {
    let api = start().await;
    let (s, v) = api
        .admin("POST", "/api/v1/mq/topics", Some(json!({"name": "svc.orders", "partitions": 2, "retentionMs": 604800000, "maxMessageSize": 1048576, "config": {"cleanup.policy": "delete"}})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["name"], "svc.orders");
    assert_eq!(v["data"]["status"], "active");
    assert!(v["data"]["createdAt"].is_string());
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "svc.orders"})),
        )
        .await;
    assert_eq!(s, 409);
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "bad name/x"})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "x", "partitions": 0})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "x", "bogus": 1})),
        )
        .await;
    assert_eq!(s, 400);

    let (s, v) = api.admin("GET", "/api/v1/mq/topics", None).await;
    assert_eq!(s, 200);
    let topics = v["data"]["topics"].as_array().unwrap();
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0]["partitions"], 2);
    assert_eq!(topics[0]["retentionMs"], 604800000);

    let (s, v) = api.admin("GET", "/api/v1/mq/topics/svc.orders", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["data"]["config"]["cleanup.policy"], "delete");
    let (s, _) = api.admin("GET", "/api/v1/mq/topics/nope", None).await;
    assert_eq!(s, 404);

    let (s, v) = api
        .admin(
            "PUT",
            "/api/v1/mq/topics/svc.orders",
            Some(json!({"partitions": 3, "retentionMs": 3600000})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["partitions"], 3);
    assert_eq!(v["data"]["retentionMs"], 3600000);
    let (s, _) = api
        .admin(
            "PUT",
            "/api/v1/mq/topics/svc.orders",
            Some(json!({"partitions": 1})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = api
        .admin(
            "PUT",
            "/api/v1/mq/topics/nope",
            Some(json!({"retentionMs": 1})),
        )
        .await;
    assert_eq!(s, 404);

    // Roles: service tokens do not manage; bad and missing tokens are 401.
    let (s, _) = api.call("GET", "/api/v1/mq/topics", Some(SVC), None).await;
    assert_eq!(s, 403);
    let (s, _) = api
        .call("GET", "/api/v1/mq/topics", Some("wrong"), None)
        .await;
    assert_eq!(s, 401);
    let (s, _) = api.call("GET", "/api/v1/mq/topics", None, None).await;
    assert_eq!(s, 401);

    let (s, _) = api
        .admin("DELETE", "/api/v1/mq/topics/svc.orders", None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .admin("DELETE", "/api/v1/mq/topics/svc.orders", None)
        .await;
    assert_eq!(s, 404);

    // The longest valid name (249) can be created and deleted (found by schemathesis).
    let long = "t".repeat(249);
    let (s, _) = api
        .admin("POST", "/api/v1/mq/topics", Some(json!({"name": long})))
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .admin("DELETE", &format!("/api/v1/mq/topics/{long}"), None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "t".repeat(250)})),
        )
        .await;
    assert_eq!(s, 400);

    let (s, v) = api.admin("GET", "/api/v1/mq/nothing-here", None).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::NOT_FOUND, json!(404)));
    let (s, _) = api.admin("PATCH", "/api/v1/mq/topics", None).await;
    assert_eq!(s, 405);

    // Every admin request is audited, refused ones included; tokens never appear.
    let audit_path = api._dir.path().join("audit.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let t = std::fs::read_to_string(&audit_path).unwrap_or_default();
        if t.lines().count() >= 15 || Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let created = lines
        .iter()
        .find(|l| l["action"] == "POST /api/v1/mq/topics" && l["status"] == 200)
        .expect("create audited");
    assert_eq!(created["who"], "env-admin");
    assert_eq!(created["result"], "ok");
    assert!(created["at"].is_string() && created["ip"] == "127.0.0.1");
    assert!(lines
        .iter()
        .any(|l| l["who"] == "svc" && l["result"] == "denied"));
    assert!(lines
        .iter()
        .any(|l| l["who"].is_null() && l["status"] == 401));
    assert!(!text.contains(ADMIN) && !text.contains(SVC));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_single_and_batch() {
    let api = start().await;
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "svc.events", "partitions": 4})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "tiny", "maxMessageSize": 64})),
        )
        .await;
    assert_eq!(s, 200);
    let body = json!({
        "topicName": "svc.events", "key": "user_123456",
        "value": {"eventType": "user_registered", "userId": "123456"},
        "headers": {"source": "user-service"}, "messageType": "normal", "delaySeconds": 0
    });
    let (s, v) = api
        .call("POST", "/api/v1/mq/messages", Some(SVC), Some(body.clone()))
        .await;
    assert_eq!(s, 200, "{v}");
    let d = &v["data"];
    assert_eq!(d["topicName"], "svc.events");
    assert_eq!(d["offset"], 0);
    assert_eq!(d["messageId"].as_str().unwrap().len(), 26);
    assert!(d["timestamp"].as_str().unwrap().ends_with('Z'));
    let (_, v2) = api
        .call("POST", "/api/v1/mq/messages", Some(SVC), Some(body.clone()))
        .await;
    assert_eq!(
        v2["data"]["partition"], d["partition"],
        "same key, same partition"
    );
    assert_eq!(v2["data"]["offset"], 1);

    for bad in [
        json!({"topicName": "svc.events", "value": 1, "messageType": "delay"}),
        json!({"topicName": "svc.events", "value": 1, "messageType": "delay", "delaySeconds": 0}),
        json!({"topicName": "svc.events", "value": 1, "messageType": "delay", "delaySeconds": 31536001u64}),
        json!({"topicName": "svc.events", "value": 1, "messageType": "transaction", "delaySeconds": 5}),
        json!({"topicName": "svc.events", "value": 1, "messageType": "bogus"}),
    ] {
        let (s, v) = api
            .call("POST", "/api/v1/mq/messages", Some(SVC), Some(bad.clone()))
            .await;
        assert_eq!(s, 400, "{bad} -> {v}");
    }
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/messages",
            Some(SVC),
            Some(json!({"topicName": "svc.events", "value": 1, "delaySeconds": 5})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/messages",
            Some(SVC),
            Some(json!({"topicName": "svc.events"})),
        )
        .await;
    assert_eq!(s, 400, "value is required");
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/messages",
            Some(SVC),
            Some(json!({"topicName": "svc.missing", "value": 1})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/messages",
            Some(SVC),
            Some(json!({"topicName": "tiny", "value": 1})),
        )
        .await;
    assert_eq!(s, 403, "not granted");
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/messages",
            None,
            Some(json!({"topicName": "svc.events", "value": 1})),
        )
        .await;
    assert_eq!(s, 401);
    let big = "x".repeat(100);
    let (s, v) = api
        .admin(
            "POST",
            "/api/v1/mq/messages",
            Some(json!({"topicName": "tiny", "value": big})),
        )
        .await;
    assert_eq!(s, 413, "topic maxMessageSize: {v}");
    let resp = api
        .http
        .post(format!("{}/api/v1/mq/messages", api.base))
        .bearer_auth(SVC)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], 400);

    let msgs: Vec<Value> = (0..50)
        .map(|i| json!({"topicName": "svc.events", "key": format!("k{i}"), "value": {"i": i}}))
        .collect();
    let (s, v) = api
        .call(
            "POST",
            "/api/v1/mq/messages/batch",
            Some(SVC),
            Some(json!({"messages": msgs})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["results"].as_array().unwrap().len(), 50);
    let too_many: Vec<Value> = (0..101)
        .map(|i| json!({"topicName": "svc.events", "value": i}))
        .collect();
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/messages/batch",
            Some(SVC),
            Some(json!({"messages": too_many})),
        )
        .await;
    assert_eq!(s, 413);
    let mixed = json!({"messages": [{"topicName": "svc.events", "value": 1}, {"topicName": "svc.events", "value": 2, "messageType": "delay"}]});
    let (s, _) = api
        .call("POST", "/api/v1/mq/messages/batch", Some(SVC), Some(mixed))
        .await;
    assert_eq!(s, 400);
    let (_, v) = api.admin("GET", "/api/v1/mq/topics/svc.events", None).await;
    assert_eq!(
        v["data"]["messageCount"], 52,
        "a refused batch stores nothing"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_commit_and_visibility_timeout() {
    let api = start().await;
    api.admin(
        "POST",
        "/api/v1/mq/topics",
        Some(json!({"name": "svc.jobs", "partitions": 1})),
    )
    .await;
    let msgs: Vec<Value> = (0..10)
        .map(|i| json!({"topicName": "svc.jobs", "value": {"n": i}, "headers": {"h": "v"}}))
        .collect();
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/messages/batch",
            Some(SVC),
            Some(json!({"messages": msgs})),
        )
        .await;
    assert_eq!(s, 200);

    let fetch = json!({"topics": ["svc.jobs"], "maxRecords": 10, "timeoutMs": 2000, "visibilityTimeoutMs": 500, "autoOffsetReset": "earliest"});
    let (s, v) = api
        .call(
            "POST",
            "/api/v1/mq/consumers/svc.jobs.group/fetch",
            Some(SVC),
            Some(fetch.clone()),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let consumer = v["data"]["consumerId"].as_str().unwrap().to_string();
    let mut got: Vec<Value> = v["data"]["records"].as_array().unwrap().clone();
    while got.len() < 10 {
        let mut f = fetch.clone();
        f["consumerId"] = json!(consumer);
        let (_, v) = api
            .call(
                "POST",
                "/api/v1/mq/consumers/svc.jobs.group/fetch",
                Some(SVC),
                Some(f),
            )
            .await;
        got.extend(v["data"]["records"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(got[3]["value"], json!({"n": 3}));
    assert_eq!(got[3]["valueEncoding"], "json");
    assert_eq!(got[3]["headers"]["h"], "v");
    // Commit the first five only.
    let refs: Vec<Value> = got[..5].iter().map(|r| json!({"topicName": r["topicName"], "partition": r["partition"], "offset": r["offset"]})).collect();
    let (s, v) = api
        .call(
            "POST",
            "/api/v1/mq/consumers/svc.jobs.group/commit",
            Some(SVC),
            Some(json!({"consumerId": consumer, "records": refs})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["committed"], 5);
    // Committing again: not held any more.
    let (_, v) = api
        .call(
            "POST",
            "/api/v1/mq/consumers/svc.jobs.group/commit",
            Some(SVC),
            Some(json!({"consumerId": consumer, "records": refs[..1]})),
        )
        .await;
    assert_eq!(v["data"]["committed"], 0);
    assert_eq!(v["data"]["notHeld"].as_array().unwrap().len(), 1);

    // The uncommitted five come back after the visibility timeout.
    let mut f = fetch.clone();
    f["consumerId"] = json!(consumer);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut again: Vec<Value> = Vec::new();
    while again.len() < 5 && Instant::now() < deadline {
        let (_, v) = api
            .call(
                "POST",
                "/api/v1/mq/consumers/svc.jobs.group/fetch",
                Some(SVC),
                Some(f.clone()),
            )
            .await;
        again.extend(v["data"]["records"].as_array().unwrap().iter().cloned());
    }
    let offsets: Vec<u64> = again
        .iter()
        .map(|r| r["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![5, 6, 7, 8, 9]);
    let refs: Vec<Value> = again.iter().map(|r| json!({"topicName": r["topicName"], "partition": r["partition"], "offset": r["offset"]})).collect();
    let (_, v) = api
        .call(
            "POST",
            "/api/v1/mq/consumers/svc.jobs.group/commit",
            Some(SVC),
            Some(json!({"consumerId": consumer, "records": refs})),
        )
        .await;
    assert_eq!(v["data"]["committed"], 5);

    // Other tokens cannot use this consumer; bad requests are 400; ungranted 403.
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/consumers/svc.jobs.group/commit",
            Some(ADMIN),
            Some(json!({"consumerId": consumer, "records": []})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/consumers/g/fetch",
            Some(SVC),
            Some(json!({"topics": []})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/consumers/g/fetch",
            Some(SVC),
            Some(json!({"topics": ["other"]})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/consumers/g/fetch",
            Some(SVC),
            Some(json!({"topics": ["svc.none"]})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/consumers/svc.jobs.group/fetch",
            Some(SVC),
            Some(json!({"consumerId": consumer, "topics": ["svc.jobs", "svc.jobs2"]})),
        )
        .await;
    assert!(s == 404 || s == 409);

    // The group is visible with lag 0 once the commit reached the backend.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = api
            .admin("GET", "/api/v1/mq/consumers?groupId=svc.jobs.group", None)
            .await;
        assert_eq!(s, 200);
        let g = &v["data"]["groups"][0];
        if g["totalLag"] == 0 && g["partitions"][0]["committedOffset"] == 10 {
            assert_eq!(g["status"], "active");
            assert_eq!(g["httpConsumers"][0]["memberId"], json!(consumer));
            assert_eq!(g["httpConsumers"][0]["assignment"][0], "svc.jobs/0");
            assert_eq!(g["members"].as_array().unwrap().len(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "group never caught up: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = api
        .admin(
            "GET",
            "/api/v1/mq/monitoring?topicName=svc.jobs&timeRange=5m",
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["topics"][0]["messageCount"], 10);
    assert_eq!(v["data"]["topics"][0]["partitions"][0]["offset"], 10);
    assert_eq!(v["data"]["consumers"][0]["groupId"], "svc.jobs.group");
    assert_eq!(v["data"]["consumers"][0]["totalLag"], 0);
    let (s, _) = api
        .admin("GET", "/api/v1/mq/monitoring?timeRange=2d", None)
        .await;
    assert_eq!(s, 400);
    let (s, _) = api
        .admin("GET", "/api/v1/mq/monitoring?topicName=nope", None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = api
        .call("GET", "/api/v1/mq/monitoring", Some(SVC), None)
        .await;
    assert_eq!(s, 403);

    let path = format!("/api/v1/mq/consumers/svc.jobs.group/members/{consumer}");
    let (s, _) = api.call("DELETE", &path, Some(SVC), None).await;
    assert_eq!(s, 200);
    let (s, _) = api.call("DELETE", &path, Some(SVC), None).await;
    assert_eq!(s, 404);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_metrics_openapi_rate_limit() {
    let api = start().await;
    let (s, v) = api.call("GET", "/healthz", None, None).await;
    assert_eq!(
        (s, v["data"]["backend"].clone()),
        (StatusCode::OK, json!("file"))
    );
    let (s, _) = api.call("GET", "/readyz", None, None).await;
    assert_eq!(s, 200);
    let (s, v) = api.call("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert!(v["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/api/v1/mq/messages",
        "/api/v1/mq/messages/batch",
        "/api/v1/mq/topics/{name}",
        "/api/v1/mq/consumers/{groupId}/fetch",
        "/api/v1/mq/monitoring",
    ] {
        assert!(v["paths"][p].is_object(), "{p} documented");
    }
    let (s, _) = api.call("GET", "/metrics", None, None).await;
    assert_eq!(s, 401);
    let (s, v) = api.call("GET", "/metrics", Some(SVC), None).await;
    assert_eq!(s, 200);
    assert!(
        v.as_str().unwrap().contains("courier_http_requests_total"),
        "{v}"
    );

    // One request per second for `slow`: the second is refused with Retry-After.
    let (s, _) = api.call("GET", "/metrics", Some(SLOW), None).await;
    assert_eq!(s, 200);
    let resp = api
        .http
        .get(format!("{}/metrics", api.base))
        .bearer_auth(SLOW)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let secs: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&secs));
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], 429);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_and_body_limit() {
    let api = start_with(|c, _| c.allow_ips = vec!["10.0.0.0/8".parse().unwrap()]).await;
    let (s, v) = api.call("GET", "/healthz", None, None).await;
    assert_eq!(s, 403, "{v}");
    api.stop().await;

    let api = start_with(|c, _| {
        c.allow_ips = vec!["127.0.0.0/8".parse().unwrap()];
        c.max_body_bytes = 4096;
    })
    .await;
    let (s, _) = api.call("GET", "/healthz", None, None).await;
    assert_eq!(s, 200);
    api.admin("POST", "/api/v1/mq/topics", Some(json!({"name": "big"})))
        .await;
    let (s, v) = api
        .admin(
            "POST",
            "/api/v1/mq/messages",
            Some(json!({"topicName": "big", "value": "y".repeat(10_000)})),
        )
        .await;
    assert_eq!(s, 413, "{v}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_when_a_certificate_is_configured() {
    let api = start_with(|c, dir| {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
        c.tls = Some(courier_server::TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        });
    })
    .await;
    assert!(api.base.starts_with("https://"));
    let (s, _) = api.call("GET", "/healthz", None, None).await;
    assert_eq!(s, 200);
    let (s, _) = api.admin("GET", "/api/v1/mq/topics", None).await;
    assert_eq!(s, 200);
    // Plain HTTP to the TLS port is not served.
    let plain = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/healthz",
            api.base.rsplit(':').next().unwrap()
        ))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_admin_token_is_stored_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tok.sha256");
    let client = Client::connect(&format!("file://{}", dir.path().join("d").display()))
        .await
        .unwrap();
    let opts = |f: &Path| ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        config: ServerConfig::default(),
        admin_token_file: f.to_path_buf(),
        env_admin_token: None,
    };
    let s1 = courier_server::start(client.clone(), opts(&file))
        .await
        .unwrap();
    let courier_server::AdminToken::Generated { token, .. } = s1.admin_token().clone() else {
        panic!("first start generates a token")
    };
    let stored = std::fs::read_to_string(&file).unwrap();
    assert!(!stored.contains(&token));
    assert_eq!(stored.trim(), hex(hash_token(&token)));
    let base = format!("http://{}", s1.local_addr());
    let r = reqwest::Client::new()
        .get(format!("{base}/api/v1/mq/topics"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s1.shutdown(Duration::from_secs(5)).await.unwrap();
    let s2 = courier_server::start(client.clone(), opts(&file))
        .await
        .unwrap();
    assert!(matches!(
        s2.admin_token(),
        courier_server::AdminToken::Stored(_)
    ));
    let base = format!("http://{}", s2.local_addr());
    let r = reqwest::Client::new()
        .get(format!("{base}/api/v1/mq/topics"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the token still works after a restart");
    s2.shutdown(Duration::from_secs(5)).await.unwrap();
    client.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Polls `GET path` as admin until `done` holds for the answer (20 s at most).
async fn admin_until(api: &Api, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, v) = api.admin("GET", path, None).await;
        assert_eq!(s, 200, "{v}");
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting on {path}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_and_retry() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let api = start_with(|c, _| c.max_redrive_per_second = 50).await;
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "svc.jobs", "partitions": 2})),
        )
        .await;
    assert_eq!(s, 200);
    let healed = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let h = healed.clone();
    let consumer = api
        .client
        .consumer("dlq-workers")
        .from_earliest()
        .retry(courier::Backoff::exponential(1, Duration::from_millis(20)))
        .start(["svc.jobs"], move |d: courier::Delivery| {
            let (h, tx) = (h.clone(), tx.clone());
            async move {
                if !h.load(Ordering::SeqCst) {
                    return Err(courier::Error::InvalidArgument("cannot digest job".into()));
                }
                let _ = tx.send((d.id.clone(), d.value.clone()));
                Ok(())
            }
        })
        .await
        .unwrap();
    let (s, v) = api
        .call(
            "POST",
            "/api/v1/mq/messages",
            Some(SVC),
            Some(json!({"topicName": "svc.jobs", "key": "job-1", "value": {"job": 1}, "headers": {"source": "tests"}})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let sent = v["data"].clone();

    // Listed by the original topic's name (its DLQ is svc.jobs.dlq) once given up.
    let v = admin_until(&api, "/api/v1/mq/dead-letters?topicName=svc.jobs", |v| {
        v["data"]["total"] == 1
    })
    .await;
    assert_eq!(v["data"]["dlqTopic"], "svc.jobs.dlq");
    let l = &v["data"]["letters"][0];
    assert_eq!(l["originalTopic"], "svc.jobs");
    assert_eq!(l["originalPartition"], sent["partition"]);
    assert_eq!(l["originalOffset"], sent["offset"]);
    assert_eq!(l["originalId"], sent["messageId"]);
    assert_eq!(l["groupId"], "dlq-workers");
    assert_eq!(l["retryCount"], 1);
    assert!(
        l["errorMessage"]
            .as_str()
            .unwrap()
            .contains("cannot digest job"),
        "{l}"
    );
    assert!(l["failedAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(l["key"], "job-1");
    assert_eq!(l["value"], json!({"job": 1}));
    assert_eq!(l["valueEncoding"], "json");
    assert_eq!(l["headers"]["source"], "tests");
    assert!(l["headers"].get("x-original-topic").is_none(), "{l}");
    let id = l["id"].as_str().unwrap().to_string();

    // Same letter by the DLQ's own name; filters apply.
    let (_, v) = api
        .admin(
            "GET",
            "/api/v1/mq/dead-letters?topicName=svc.jobs.dlq&groupId=dlq-workers&errorContains=digest",
            None,
        )
        .await;
    assert_eq!(v["data"]["total"], 1, "{v}");
    let (_, v) = api
        .admin(
            "GET",
            "/api/v1/mq/dead-letters?topicName=svc.jobs.dlq&groupId=other",
            None,
        )
        .await;
    assert_eq!(v["data"]["total"], 0, "{v}");
    assert_eq!(v["data"]["letters"], json!([]));
    let (_, v) = api
        .admin(
            "GET",
            "/api/v1/mq/dead-letters?topicName=nothing.here",
            None,
        )
        .await;
    assert_eq!(v["data"]["total"], 0, "a missing DLQ has no letters: {v}");

    // Errors: bad query, bad bodies, non-admin, no token.
    let (s, _) = api.admin("GET", "/api/v1/mq/dead-letters", None).await;
    assert_eq!(s, 400, "topicName is required");
    let (s, _) = api
        .admin(
            "GET",
            "/api/v1/mq/dead-letters?topicName=__courier.schedule.default",
            None,
        )
        .await;
    assert_eq!(s, 400, "internal topic");
    let (s, _) = api
        .admin("GET", "/api/v1/mq/dead-letters?topicName=bad%20name", None)
        .await;
    assert_eq!(s, 400);
    let (s, _) = api
        .admin(
            "GET",
            "/api/v1/mq/dead-letters?topicName=svc.jobs&limit=0",
            None,
        )
        .await;
    assert_eq!(s, 400);
    for body in [
        json!({"topicName": "svc.jobs"}),
        json!({"topicName": "svc.jobs", "all": true, "ids": [id]}),
        json!({"topicName": "svc.jobs", "ids": []}),
        json!({"topicName": "svc.jobs", "all": true, "ratePerSecond": 0}),
        json!({"topicName": "svc.jobs", "all": true, "bogus": 1}),
    ] {
        let (s, v) = api
            .admin("POST", "/api/v1/mq/dead-letters/retry", Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body} -> {v}");
    }
    let retry =
        json!({"topicName": "svc.jobs", "ids": [id, "no-such-letter"], "ratePerSecond": 1000});
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/dead-letters/retry",
            Some(SVC),
            Some(retry.clone()),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = api
        .call(
            "GET",
            "/api/v1/mq/dead-letters?topicName=svc.jobs",
            Some(SVC),
            None,
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/dead-letters/retry",
            None,
            Some(retry.clone()),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = api
        .call(
            "GET",
            "/api/v1/mq/dead-letters?topicName=svc.jobs",
            Some("wrong-token"),
            None,
        )
        .await;
    assert_eq!(s, 401);
    assert_eq!(rx.try_recv().ok(), None, "nothing consumed while refused");

    // Re-drive: back on svc.jobs under its original id, consumed by the healed group.
    healed.store(true, Ordering::SeqCst);
    let (s, v) = api
        .admin("POST", "/api/v1/mq/dead-letters/retry", Some(retry))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["dlqTopic"], "svc.jobs.dlq");
    assert_eq!(v["data"]["ratePerSecond"], 50, "capped by the server");
    assert_eq!(v["data"]["redriven"], json!([id]));
    assert_eq!(v["data"]["failed"], json!([]));
    assert_eq!(v["data"]["notFound"], json!(["no-such-letter"]));
    let (got_id, got_value) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("re-driven message consumed")
        .unwrap();
    assert_eq!(&*got_id, sent["messageId"].as_str().unwrap());
    assert_eq!(&got_value[..], br#"{"job":1}"#);
    let (_, v) = api
        .admin("GET", "/api/v1/mq/dead-letters?topicName=svc.jobs", None)
        .await;
    assert_eq!(
        v["data"]["total"], 0,
        "re-driven letters are not listed: {v}"
    );
    let (s, v) = api
        .admin(
            "POST",
            "/api/v1/mq/dead-letters/retry",
            Some(json!({"topicName": "svc.jobs.dlq", "all": true})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["data"]["redriven"], json!([]), "nothing left: {v}");

    // Both the refused and the allowed re-drives are in the audit log (written
    // asynchronously, hence the wait).
    let audit_path = api._dir.path().join("audit.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit = std::fs::read_to_string(&audit_path).unwrap_or_default();
        let retries: Vec<Value> = audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["action"] == "POST /api/v1/mq/dead-letters/retry")
            .collect();
        let allowed = retries
            .iter()
            .any(|r| r["who"] == "env-admin" && r["result"] == "ok");
        let denied = retries
            .iter()
            .any(|r| r["who"] == "svc" && r["result"] == "denied");
        if allowed && denied {
            break;
        }
        assert!(Instant::now() < deadline, "re-drives not audited: {audit}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.stop().await.unwrap();
    api.stop().await;
}

/// One HTTP consumer of `group` on `topic` that commits what it fetches.
struct HttpReader {
    group: String,
    topic: String,
    consumer_id: Option<String>,
}

impl HttpReader {
    fn new(group: &str, topic: &str) -> Self {
        Self {
            group: group.into(),
            topic: topic.into(),
            consumer_id: None,
        }
    }

    /// One fetch (waiting up to 500 ms), committed at once.
    async fn fetch(&mut self, api: &Api) -> Vec<Value> {
        let mut body = json!({"topics": [self.topic], "maxRecords": 100, "timeoutMs": 500, "autoOffsetReset": "earliest"});
        if let Some(c) = &self.consumer_id {
            body["consumerId"] = json!(c);
        }
        let path = format!("/api/v1/mq/consumers/{}/fetch", self.group);
        let (s, v) = api.call("POST", &path, Some(SVC), Some(body)).await;
        assert_eq!(s, 200, "{v}");
        let cid = v["data"]["consumerId"].as_str().unwrap().to_string();
        let records = v["data"]["records"].as_array().unwrap().clone();
        if !records.is_empty() {
            let refs: Vec<Value> = records.iter().map(|r| json!({"topicName": r["topicName"], "partition": r["partition"], "offset": r["offset"]})).collect();
            let path = format!("/api/v1/mq/consumers/{}/commit", self.group);
            let (s, v) = api
                .call(
                    "POST",
                    &path,
                    Some(SVC),
                    Some(json!({"consumerId": cid, "records": refs})),
                )
                .await;
            assert_eq!(s, 200, "{v}");
        }
        self.consumer_id = Some(cid);
        records
    }

    /// Fetches until a record with message id `id` arrives (20 s at most); returns every
    /// record fetched on the way (that one included) with the instant each came.
    async fn until(&mut self, api: &Api, id: &str) -> Vec<(Instant, Value)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            let batch = self.fetch(api).await;
            let now = Instant::now();
            let done = batch.iter().any(|r| r["messageId"] == id);
            seen.extend(batch.into_iter().map(|r| (now, r)));
            if done {
                return seen;
            }
            assert!(Instant::now() < deadline, "{id} never arrived: {seen:?}");
        }
    }
}

async fn send_ok(api: &Api, body: Value) -> Value {
    let (s, v) = api
        .call("POST", "/api/v1/mq/messages", Some(SVC), Some(body))
        .await;
    assert_eq!(s, 200, "{v}");
    v["data"].clone()
}

fn ids(records: &[(Instant, Value)]) -> Vec<String> {
    records
        .iter()
        .map(|(_, r)| r["messageId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_wait_for_their_time() {
    let api = start().await;
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "svc.later", "partitions": 1})),
        )
        .await;
    assert_eq!(s, 200);
    let mut reader = HttpReader::new("later-readers", "svc.later");
    let t0 = Instant::now();
    let delayed = send_ok(&api, json!({"topicName": "svc.later", "key": "k", "value": {"d": 1}, "messageType": "delay", "delaySeconds": 2})).await;
    assert_eq!(delayed["topicName"], "svc.later");
    assert!(
        delayed["deliverAt"].as_str().unwrap().ends_with('Z'),
        "{delayed}"
    );
    let delayed_id = delayed["messageId"].as_str().unwrap().to_string();
    let sentinel = send_ok(&api, json!({"topicName": "svc.later", "value": "now"})).await;
    assert!(sentinel.get("deliverAt").is_none(), "{sentinel}");

    let early = reader
        .until(&api, sentinel["messageId"].as_str().unwrap())
        .await;
    let mut all = early.clone();
    if !ids(&early).contains(&delayed_id) {
        all.extend(reader.until(&api, &delayed_id).await);
    }
    let (at, rec) = all
        .iter()
        .find(|(_, r)| r["messageId"] == delayed_id.as_str())
        .unwrap();
    // The due time was set after t0, so it cannot be fetched earlier than t0 + 2 s
    // (100 ms of slack for wall clock vs monotonic clock).
    assert!(
        at.duration_since(t0) >= Duration::from_millis(1900),
        "delivered after {:?}",
        at.duration_since(t0)
    );
    assert_eq!(rec["value"], json!({"d": 1}));
    assert_eq!(rec["key"], "k");
    assert_eq!(
        ids(&all).iter().filter(|i| **i == delayed_id).count(),
        1,
        "once"
    );

    // The batch form takes delays too.
    let (s, v) = api
        .call(
            "POST",
            "/api/v1/mq/messages/batch",
            Some(SVC),
            Some(json!({"messages": [
                {"topicName": "svc.later", "value": 1, "messageType": "delay", "delaySeconds": 1},
                {"topicName": "svc.later", "value": 2},
            ]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let results = v["data"]["results"].as_array().unwrap();
    assert!(results[0]["deliverAt"].is_string());
    assert!(results[1].get("deliverAt").is_none());
    assert_eq!(results[0]["topicName"], "svc.later");
    let later_id = results[0]["messageId"].as_str().unwrap().to_string();
    reader.until(&api, &later_id).await;
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/messages/batch",
            Some(SVC),
            Some(json!({"messages": [{"topicName": "svc.later", "value": 1, "messageType": "transaction"}]})),
        )
        .await;
    assert_eq!(s, 400, "halves are prepared one at a time");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_messages_commit_and_rollback() {
    let api = start().await;
    let (s, _) = api
        .admin(
            "POST",
            "/api/v1/mq/topics",
            Some(json!({"name": "svc.paid", "partitions": 2})),
        )
        .await;
    assert_eq!(s, 200);
    let mut reader = HttpReader::new("paid-readers", "svc.paid");
    let h1 = send_ok(&api, json!({"topicName": "svc.paid", "key": "o1", "value": {"order": 1}, "messageType": "transaction"})).await;
    let h2 = send_ok(&api, json!({"topicName": "svc.paid", "key": "o2", "value": {"order": 2}, "messageType": "transaction"})).await;
    assert_eq!(h1["topicName"], "svc.paid");
    let (h1, h2) = (
        h1["messageId"].as_str().unwrap().to_string(),
        h2["messageId"].as_str().unwrap().to_string(),
    );
    let s1 = send_ok(
        &api,
        json!({"topicName": "svc.paid", "key": "o1", "value": "after"}),
    )
    .await;
    let seen = reader.until(&api, s1["messageId"].as_str().unwrap()).await;
    assert!(
        !ids(&seen).contains(&h1) && !ids(&seen).contains(&h2),
        "halves are invisible before commit: {seen:?}"
    );

    // Courier's own schedule log is not writable through the API, not even by admins.
    let (s, v) = api
        .admin(
            "POST",
            "/api/v1/mq/messages",
            Some(json!({"topicName": "__courier.schedule.default", "value": 1, "messageType": "transaction"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");

    // Only the preparing token (or an admin) decides.
    let commit1 = format!("/api/v1/mq/transactions/{h1}/commit");
    let (s, _) = api.call("POST", &commit1, Some(SLOW), None).await;
    assert_eq!(s, 403, "another token");
    let (s, _) = api.call("POST", &commit1, None, None).await;
    assert_eq!(s, 401);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/mq/transactions/unknown-id/commit",
            Some(SVC),
            None,
        )
        .await;
    assert_eq!(s, 403, "unknown to this server: admin only");
    let (s, v) = api
        .admin("POST", "/api/v1/mq/transactions/unknown-id/rollback", None)
        .await;
    assert_eq!(
        s, 404,
        "an admin may decide any id; the scheduler knows this one is not a half: {v}"
    );
    let (s, _) = api.call("GET", &commit1, Some(SVC), None).await;
    assert_eq!(s, 405);

    let (s, v) = api.call("POST", &commit1, Some(SVC), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["transactionId"], h1.as_str());
    assert_eq!(v["data"]["decision"], "commit");
    let (s, v) = api
        .call(
            "POST",
            &format!("/api/v1/mq/transactions/{h2}/rollback"),
            Some(SVC),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["decision"], "rollback");
    // A second commit of h1 (now decided) is refused and delivers nothing more.
    let (s, v) = api.admin("POST", &commit1, None).await;
    assert_eq!(s, 404, "{v}");

    let mut seen = reader.until(&api, &h1).await;
    let got = seen
        .iter()
        .find(|(_, r)| r["messageId"] == h1.as_str())
        .unwrap();
    assert_eq!(got.1["value"], json!({"order": 1}));
    assert_eq!(got.1["key"], "o1");
    let s2 = send_ok(
        &api,
        json!({"topicName": "svc.paid", "key": "o2", "value": "end"}),
    )
    .await;
    seen.extend(reader.until(&api, s2["messageId"].as_str().unwrap()).await);
    let all = ids(&seen);
    assert_eq!(
        all.iter().filter(|i| **i == h1).count(),
        1,
        "committed: once"
    );
    assert!(!all.contains(&h2), "rolled back: never");
    api.stop().await;
}
