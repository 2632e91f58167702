//! Property-based API testing with schemathesis (PyPI) against the served OpenAPI
//! document: no 5xx and no response that violates the documented schema. The tool
//! is installed once into `target/schemathesis-venv` (idempotent; needs python3 and
//! PyPI). Bounded: few examples per operation and a time budget.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use courier::Client;
use courier_server::{ServeOptions, ServerConfig};

const ADMIN: &str = "schemathesis-admin-token";

fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/schemathesis-venv")
}

fn ensure_schemathesis() -> PathBuf {
    let dir = venv();
    let bin = dir.join("bin/schemathesis");
    if bin.exists() {
        return bin;
    }
    let ok = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&dir)
        .status()
        .expect("python3 is needed for this test");
    assert!(ok.success(), "python3 -m venv failed");
    let ok = Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "schemathesis>=4,<5"])
        .status()
        .expect("pip");
    assert!(ok.success(), "pip install schemathesis failed");
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let bin = tokio::task::spawn_blocking(ensure_schemathesis)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::connect(&format!("file://{}", dir.path().join("data").display()))
        .await
        .unwrap();
    let config = ServerConfig {
        max_partitions: 4,
        max_poll_ms: 100,
        ..ServerConfig::default()
    };
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
    let url = format!("http://{}/api/v1/openapi.json", server.local_addr());
    let report = dir.path().join("report");
    let work = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        // Through the venv's interpreter rather than the script's shebang, which names
        // the absolute path the venv was created at (stale when `target/` is copied).
        Command::new(venv().join("bin/python3"))
            .arg(bin)
            .arg("run")
            .arg(&url)
            .args(["--checks", "not_a_server_error,response_schema_conformance"])
            .args(["--max-examples", "15", "--max-time", "75", "--seed", "7"])
            .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
            .args(["--request-timeout", "10", "--no-color"])
            .arg("--report-dir")
            .arg(report)
            .env("SCHEMATHESIS_HOOKS", "")
            // Its example cache goes to the temporary directory, not the source tree.
            .current_dir(&work)
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
    client.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}"
    );
}
