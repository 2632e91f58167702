//! A private nats-server (its own port and store directory) is killed (SIGKILL) and
//! restarted while a producer and a group member run: every acknowledged publish is
//! delivered afterwards. Needs `nats-server` on the PATH (`scripts/brokers.sh start`
//! installs it); the shared server on 4222 is not touched.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use courier::{Client, Config};
use courier_conformance::restart::{free_port, publish_through_restart};

/// A nats-server on `port` storing JetStream data in `dir`, killed on drop.
struct Server {
    child: Child,
}

impl Server {
    fn start(port: u16, dir: &Path) -> Self {
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on the PATH (scripts/brokers.sh start installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("private nats-server did not listen on {port}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_a_server_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut server = Some(Server::start(port, dir.path()));
    let mut config = Config::with_url(format!("nats://127.0.0.1:{port}"));
    // Deliveries whose acks die with the connection come back soon.
    config
        .backend
        .insert("nats.ack_wait_ms".into(), "2000".into());
    let client = Client::connect_with(config).await.expect("connect");
    publish_through_restart(
        "nats restart",
        client.driver().as_ref(),
        3000,
        Duration::from_secs(60),
        || {
            drop(server.take());
            std::thread::sleep(Duration::from_millis(500));
            server = Some(Server::start(port, dir.path()));
        },
    )
    .await;
    drop(server);
}
