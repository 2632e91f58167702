//! rediss:// against a PRIVATE `redis-server` with TLS on 127.0.0.1: a CA and a
//! server certificate (SAN IP 127.0.0.1) are made with `openssl` at test time, the
//! server only listens with TLS, and Courier produces and consumes over it, trusting
//! the CA through `redis.tls_ca_file`. Skipped (with a message) when `openssl` is
//! missing or the installed redis-server is built without TLS.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use courier::{Client, Config, Delivery, Error, Message, OffsetReset, TopicSpec};
use courier_conformance::restart::free_port;
use courier_conformance::unique;
use tokio::sync::mpsc;

fn run(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CA + server certificate for 127.0.0.1 in `dir`; false when openssl fails.
fn make_certs(dir: &Path) -> bool {
    let p = |f: &str| dir.join(f);
    std::fs::write(
        p("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext");
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=courier test CA", "-keyout"])
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem")))
        && run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(p("server.key"))
            .arg("-out")
            .arg(p("server.csr")))
        && run(Command::new("openssl")
            .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
            .arg("-in")
            .arg(p("server.csr"))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("server.ext"))
            .arg("-out")
            .arg(p("server.pem")))
}

struct TlsRedis {
    port: u16,
    child: Child,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis(dir: &Path) -> Option<TlsRedis> {
    let port = free_port();
    let mut child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", "0", "--save", ""])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(dir.join("server.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.pem"))
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return None; // exited: no TLS support (or bad config)
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(TlsRedis { port, child });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_round_trip_with_private_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    if !make_certs(dir.path()) {
        eprintln!("SKIPPED: openssl could not make test certificates");
        return;
    }
    let Some(server) = start_tls_redis(dir.path()) else {
        eprintln!("SKIPPED: redis-server does not start with --tls-port (built without TLS?)");
        return;
    };
    let url = format!("rediss://127.0.0.1:{}", server.port);

    // Without the CA the server's certificate is not trusted.
    let mut untrusted = courier_conformance::harness::fast_config();
    untrusted.url = Some(url.clone());
    assert!(
        Client::connect_with(untrusted).await.is_err(),
        "an unknown CA must be refused"
    );

    let mut config: Config = courier_conformance::harness::fast_config();
    config.url = Some(url);
    config.backend.insert(
        "redis.tls_ca_file".into(),
        dir.path().join("ca.pem").display().to_string(),
    );
    let client = Client::connect_with(config)
        .await
        .expect("connect over TLS");
    let t = unique("tls");
    client
        .admin()
        .create_topic(TopicSpec::new(&t, 2))
        .await
        .expect("create");
    let producer = client.producer();
    let msgs: Vec<Message> = (0..200)
        .map(|i| Message::new(&t, format!("m{i}")).key(format!("k{}", i % 5)))
        .collect();
    let receipts = producer.send_batch(msgs).await.expect("send over TLS");
    assert_eq!(receipts.len(), 200);

    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let consumer = client
        .consumer(unique("g"))
        .auto_offset_reset(OffsetReset::Earliest)
        .start([t.clone()], move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(d.value_str()?.to_string());
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("subscribe over TLS");
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 200 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(v)) => {
                seen.insert(v);
            }
            _ => break,
        }
    }
    assert_eq!(seen.len(), 200, "every message comes back over TLS");
    consumer.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}
