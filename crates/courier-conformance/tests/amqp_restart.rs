//! A private RabbitMQ node (its own node name, port and data directory) is stopped and
//! started again on the same data while a producer and a group member run: every
//! confirmed publish must be delivered afterwards. Needs the Debian `rabbitmq-server`
//! package (`scripts/brokers.sh start` installs it); the shared broker on 5672 is not
//! touched. `RESTART_SIGNAL=-KILL` kills the node instead of stopping it (RabbitMQ
//! 3.10 then leaves single-node streams unavailable: see docs/backends/amqp.md).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use courier::{Client, Config};
use courier_conformance::restart::{free_port, publish_through_restart};

/// The server script without Debian's wrapper, which would switch to the `rabbitmq`
/// user (and so give us the wrong PID and a data directory we cannot choose).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// A RabbitMQ node on 127.0.0.1:`port` with its data in `dir`, killed on drop.
struct Node {
    script: Child,
    pid_file: PathBuf,
}

impl Node {
    fn start(name: &str, port: u16, dir: &Path) -> Self {
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("config");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins");
        let pid_file = dir.join("node.pid");
        let _ = std::fs::remove_file(&pid_file);
        let script = Command::new(SERVER)
            .env("RABBITMQ_NODENAME", format!("{name}@localhost"))
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", (port + 20000).to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", &pid_file)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server (scripts/brokers.sh start installs it)");
        let mut node = Self { script, pid_file };
        for _ in 0..600 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return node;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        node.signal("-KILL");
        panic!("private RabbitMQ node did not listen on {port} within 60 s");
    }

    /// `signal` to the Erlang VM (the PID RabbitMQ wrote), then SIGKILL to the script.
    fn signal(&mut self, signal: &str) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let pid = pid.trim().to_string();
            let _ = Command::new("kill").args([signal, &pid]).status();
            // A graceful stop takes a few seconds; wait for the VM to be gone.
            for _ in 0..300 {
                let alive = Command::new("kill")
                    .args(["-0", &pid])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !alive {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.script.kill();
        let _ = self.script.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal("-KILL");
    }
}

/// A port whose distribution port (`port + 20000`) is free too.
fn node_port() -> u16 {
    loop {
        let port = free_port();
        if port < 45000 && std::net::TcpListener::bind(("127.0.0.1", port + 20000)).is_ok() {
            return port;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_a_broker_restart() {
    assert!(
        Path::new(SERVER).exists(),
        "{SERVER} missing: run scripts/brokers.sh start (installs rabbitmq-server)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let port = node_port();
    let name = format!("courier-restart-{}", std::process::id());
    let mut node = Some(Node::start(&name, port, dir.path()));
    let config = Config::with_url(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    let client = Client::connect_with(config).await.expect("connect");
    let signal = std::env::var("RESTART_SIGNAL").unwrap_or_else(|_| "-TERM".into());
    publish_through_restart(
        "amqp restart",
        client.driver().as_ref(),
        2000,
        Duration::from_secs(90),
        || {
            if let Some(mut n) = node.take() {
                n.signal(&signal);
            }
            node = Some(Node::start(&name, port, dir.path()));
        },
    )
    .await;
    drop(node);
}
