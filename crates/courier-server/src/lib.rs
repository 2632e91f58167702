//! `courier serve`: the REST service of seed 004 over any Courier backend (SPEC S1–S3).
//!
//! Routes live under `/api/v1/mq` (messages, HTTP consumption, topics, consumer
//! groups, monitoring), plus `/healthz`, `/readyz`, `/metrics` and the OpenAPI
//! document at `/api/v1/openapi.json`. Every response is the `{code, message, data}`
//! envelope. Security: bearer tokens (stored hashed) with `service`/`admin` roles and
//! topic grants, an IP allowlist, per-token rate limits, an audit log of admin
//! requests, a body size limit, and TLS when a certificate is configured.

mod audit;
mod auth;
mod config;
mod consume;
mod envelope;
mod extract;
mod halves;
mod metrics;
mod monitor;
mod net;
mod openapi;
mod payload;
mod routes;
mod state;
mod time;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use courier::Client;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

pub use auth::{generate_token, hash_token, AdminToken};
pub use config::{RateLimitConfig, Role, ServerConfig, TlsConfig, TokenConfig};
pub use openapi::ApiDoc;
pub use RunningServer as Server;

use crate::envelope::ApiError;
use crate::routes::{
    consume as consume_routes, dead_letters, groups, health, messages, monitoring, topics,
    transactions,
};
use crate::state::AppState;

/// Where the generated admin token's hash is kept when the config does not say:
/// inside the data directory for `file://PATH`, else next to the config file, else
/// in the working directory.
pub fn default_admin_token_file(url: &str, config_file: Option<&Path>) -> PathBuf {
    const NAME: &str = "courier-admin-token.sha256";
    if let Some(rest) = url.strip_prefix("file://") {
        let path = rest.split('?').next().unwrap_or(rest);
        if !path.is_empty() {
            return Path::new(path).join(NAME);
        }
    }
    match config_file.and_then(|c| c.parent()) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(NAME),
        _ => PathBuf::from(NAME),
    }
}

/// How to start a server.
pub struct ServeOptions {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Settings.
    pub config: ServerConfig,
    /// Where the generated admin token's hash lives (see [`default_admin_token_file`]).
    pub admin_token_file: PathBuf,
    /// `COURIER_ADMIN_TOKEN`, when set.
    pub env_admin_token: Option<String>,
}

/// A listening server.
pub struct RunningServer {
    addr: SocketAddr,
    tls: bool,
    admin: AdminToken,
    handle: axum_server::Handle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    state: AppState,
    background: CancellationToken,
}

impl RunningServer {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Where the admin token came from (and the token itself when generated now).
    pub fn admin_token(&self) -> &AdminToken {
        &self.admin
    }

    /// Stops accepting, lets in-flight requests finish (up to `grace`), returns
    /// uncommitted HTTP deliveries to their groups and flushes the producer. The
    /// caller then shuts the client down.
    pub async fn shutdown(self, grace: Duration) -> anyhow::Result<()> {
        self.handle.graceful_shutdown(Some(grace));
        let served = self.task.await.context("server task")?;
        self.background.cancel();
        self.state.members.close_all().await;
        if let Err(e) = self.state.producer.flush().await {
            tracing::warn!(error = %e, "flushing on shutdown failed");
        }
        served.context("serving")?;
        Ok(())
    }

    /// Waits until the server stops on its own (a fatal accept error).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task)
            .await
            .context("server task")?
            .context("serving")
    }
}

/// Builds the router over `state`.
fn router(state: AppState) -> Router {
    let token = from_fn_with_state(state.clone(), auth::require_token);
    let service = Router::new()
        .route("/messages", post(messages::send))
        .route("/messages/batch", post(messages::send_batch))
        .route("/transactions/{id}/commit", post(transactions::commit))
        .route("/transactions/{id}/rollback", post(transactions::rollback))
        .route("/consumers/{groupId}/fetch", post(consume_routes::fetch))
        .route("/consumers/{groupId}/commit", post(consume_routes::commit))
        .route(
            "/consumers/{groupId}/members/{consumerId}",
            delete(consume_routes::leave),
        )
        .route_layer(token.clone());
    let admin = Router::new()
        .route("/topics", get(topics::list).post(topics::create))
        .route(
            "/topics/{name}",
            get(topics::get).put(topics::update).delete(topics::delete),
        )
        .route("/consumers", get(groups::list))
        .route("/monitoring", get(monitoring::monitoring))
        .merge(dead_letters::routes())
        .route_layer(from_fn(auth::require_admin))
        .route_layer(token.clone())
        .route_layer(from_fn_with_state(state.clone(), audit::audit));
    let allow = Arc::new(state.config.allow_ips.clone());
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .nest("/api/v1/mq", service.merge(admin))
        .route("/metrics", get(health::metrics).route_layer(token))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/api/v1/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(from_fn(metrics::track))
        .layer(from_fn_with_state(allow, net::allowlist))
        .with_state(state)
}

async fn openapi_json() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// Binds `opts.listen` and serves `client` until [`RunningServer::shutdown`].
pub async fn start(client: Client, opts: ServeOptions) -> anyhow::Result<RunningServer> {
    opts.config.validate()?;
    metrics::install();
    let (tokens, admin) = auth::build_tokens(
        &opts.config,
        opts.env_admin_token.as_deref(),
        &opts.admin_token_file,
    )?;
    let audit = audit::AuditLog::open(opts.config.audit_log.as_deref()).await?;
    let config = Arc::new(opts.config);
    let state: AppState = state::Shared {
        producer: client.producer(),
        members: Arc::new(consume::Members::new(
            client.clone(),
            Duration::from_millis(config.member_timeout_ms),
        )),
        history: Arc::new(monitor::History::default()),
        tokens: Arc::new(tokens),
        config: config.clone(),
        audit,
        topics_seen: Default::default(),
        halves: Default::default(),
        client,
    }
    .into();
    let background = CancellationToken::new();
    spawn_background(&state, background.clone());

    let listener = std::net::TcpListener::bind(opts.listen)
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let task = match &config.tls {
        Some(tls) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rustls_config =
                axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
                    .await
                    .with_context(|| {
                        format!(
                            "loading TLS certificate {} / key {}",
                            tls.cert.display(),
                            tls.key.display()
                        )
                    })?;
            let server =
                axum_server::from_tcp_rustls(listener, rustls_config).handle(handle.clone());
            tokio::spawn(async move { server.serve(app).await })
        }
        None => {
            let server = axum_server::from_tcp(listener).handle(handle.clone());
            tokio::spawn(async move { server.serve(app).await })
        }
    };
    tracing::info!(%addr, tls = config.tls.is_some(), "courier serve listening");
    Ok(RunningServer {
        addr,
        tls: config.tls.is_some(),
        admin,
        handle,
        task,
        state,
        background,
    })
}

fn spawn_background(state: &AppState, stop: CancellationToken) {
    let members = state.members.clone();
    let s = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = s.cancelled() => break,
                _ = tick.tick() => members.sweep().await,
            }
        }
    });
    let history = state.history.clone();
    let client = state.client.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(monitor::SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = history.sample(&client).await {
                        tracing::warn!(error = %e, "monitoring sample failed");
                    }
                }
            }
        }
    });
}
