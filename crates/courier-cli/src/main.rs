//! `courier`: the command line over Courier (SPEC §9). The backend is chosen by
//! `--url` or `COURIER_URL` (default `file://./data`).

mod bench;
mod consume;
mod dlq;
mod groups;
mod produce;
mod serve;
mod topics;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use courier::{Client, Config};

#[derive(Parser)]
#[command(name = "courier", version, about = "Courier messaging toolkit")]
struct Cli {
    /// Backend URL: file://PATH, memory://, kafka://h:9092, redis://h:6379, amqp://…, nats://…
    #[arg(long, global = true, env = "COURIER_URL")]
    url: Option<String>,
    /// Configuration file (TOML or JSON, seed field names); COURIER_* variables override it.
    #[arg(long, global = true, env = "COURIER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send every line of stdin as one message.
    Produce(produce::Args),
    /// Print messages of a consumer group, one per line, committing what was printed.
    Consume(consume::Args),
    /// Manage topics.
    #[command(subcommand)]
    Topics(topics::Command),
    /// Inspect and reset consumer groups.
    #[command(subcommand)]
    Groups(groups::Command),
    /// List dead letters and re-drive them to their original topics.
    #[command(subcommand)]
    Dlq(dlq::Command),
    /// Run the REST service (seed 004 API) over the backend.
    Serve(serve::Args),
    /// Measure produce / consume throughput and latency.
    Bench(bench::Args),
}

/// Loads configuration (file, environment, then `--url`) and connects.
async fn connect(url: Option<&str>, config: Option<&PathBuf>) -> anyhow::Result<Client> {
    let mut cfg = Config::load(config.map(|p| p.as_path())).context("loading configuration")?;
    if let Some(url) = url {
        cfg.url = Some(url.to_string());
    }
    let shown = courier::config::redact_url(cfg.url_or_default());
    Client::connect_with(cfg)
        .await
        .with_context(|| format!("connecting to {shown}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = connect(cli.url.as_deref(), cli.config.as_ref()).await?;
    let result = match cli.command {
        Command::Produce(a) => produce::run(&client, a).await,
        Command::Consume(a) => consume::run(&client, a).await,
        Command::Topics(c) => topics::run(&client, c).await,
        Command::Groups(c) => groups::run(&client, c).await,
        Command::Dlq(c) => dlq::run(&client, c).await,
        Command::Bench(a) => bench::run(&client, a).await,
        Command::Serve(a) => serve::run(&client, a, cli.config.as_ref()).await,
    };
    let closed = client.shutdown(Duration::from_secs(30)).await;
    result?;
    closed.context("shutting down")?;
    Ok(())
}

// glibc malloc was ~16% of the server's CPU under load (perf, docs/BENCHMARKS.md);
// mimalloc's thread-local free lists take most of that away.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,courier::audit=info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
