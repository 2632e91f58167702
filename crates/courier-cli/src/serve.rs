//! `courier serve`: the REST service (SPEC §9, S1–S3).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use courier::Client;
use courier_server::{AdminToken, ServeOptions, ServerConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (overrides `server.listen` of the config file).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

pub async fn run(client: &Client, args: Args, config_file: Option<&PathBuf>) -> anyhow::Result<()> {
    let config = match config_file {
        Some(p) => ServerConfig::from_file(p)
            .with_context(|| format!("reading [server] of {}", p.display()))?,
        None => ServerConfig::default(),
    };
    let listen = match (args.listen, &config.listen) {
        (Some(l), _) => l,
        (None, Some(l)) => l.parse().with_context(|| format!("server.listen {l:?}"))?,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 7070)),
    };
    let url = client.config().url_or_default().to_string();
    let admin_token_file = config.admin_token_file.clone().unwrap_or_else(|| {
        courier_server::default_admin_token_file(&url, config_file.map(|p| p.as_path()))
    });
    let server = courier_server::start(
        client.clone(),
        ServeOptions {
            listen,
            config,
            admin_token_file,
            env_admin_token: std::env::var("COURIER_ADMIN_TOKEN").ok(),
        },
    )
    .await?;
    let base = format!("{}://{}", server.scheme(), server.local_addr());
    println!(
        "courier serve: listening on {base} (backend {}, {})",
        client.backend(),
        courier::config::redact_url(&url)
    );
    println!("  API      {base}/api/v1/mq   OpenAPI {base}/api/v1/openapi.json");
    match server.admin_token() {
        AdminToken::FromEnv => println!("  admin token: from COURIER_ADMIN_TOKEN"),
        AdminToken::Generated { token, file } => {
            println!("  admin token (shown once, only its hash is kept in {}):", file.display());
            println!("    {token}");
        }
        AdminToken::Stored(file) => println!(
            "  admin token: generated on first start (hash in {}; delete that file to get a new one)",
            file.display()
        ),
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut server = server;
    tokio::select! {
        r = server.wait() => return r,
        _ = shutdown_signal() => {}
    }
    eprintln!("courier serve: shutting down");
    server.shutdown(Duration::from_secs(10)).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
