//! The audit log (SPEC S2): who did what, when, from where, with what result, for
//! every admin-only request (allowed or refused). Written as JSON lines to the
//! configured file and always to `tracing` under the `courier::audit` target.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::auth::Principal;
use crate::state::AppState;

/// One audit record.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// RFC 3339 time.
    pub at: String,
    /// Token name, or `null` when the request was not authenticated.
    pub who: Option<String>,
    /// Client address.
    pub ip: Option<String>,
    /// HTTP method and route (`POST /api/v1/mq/topics`).
    pub action: String,
    /// The concrete path (names the object acted on).
    pub target: String,
    /// HTTP status of the answer.
    pub status: u16,
    /// `ok`, `denied` or `failed`.
    pub result: &'static str,
}

/// Where audit records go. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: Option<mpsc::UnboundedSender<String>>,
}

impl AuditLog {
    /// Logs to `tracing` and, when `file` is set, appends JSON lines to it.
    pub async fn open(file: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = file else {
            return Ok(Self { tx: None });
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open audit log {}: {e}", path.display()))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if let Err(e) = f.write_all(line.as_bytes()).await {
                    tracing::error!(error = %e, "audit log write failed");
                }
                let _ = f.flush().await;
            }
        });
        Ok(Self { tx: Some(tx) })
    }

    /// Records `rec`.
    pub fn record(&self, rec: &AuditRecord) {
        let line = serde_json::to_string(rec).unwrap_or_default();
        tracing::info!(target: "courier::audit", "{line}");
        if let Some(tx) = &self.tx {
            let _ = tx.send(line + "\n");
        }
    }
}

/// Middleware for admin routes: records every request after it was answered. Must run
/// outside the authentication layer so refused attempts are recorded too; the
/// principal is read back from the response extensions.
pub async fn audit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let action = format!("{} {route}", req.method());
    let target = req.uri().path().to_string();
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    let who = resp
        .extensions()
        .get::<Arc<Principal>>()
        .map(|p| p.name.clone());
    let result = if status.is_success() {
        "ok"
    } else if status.as_u16() == 401 || status.as_u16() == 403 {
        "denied"
    } else {
        "failed"
    };
    state.audit.record(&AuditRecord {
        at: crate::time::rfc3339(courier::now_millis()),
        who,
        ip,
        action,
        target,
        status: status.as_u16(),
        result,
    });
    resp
}
