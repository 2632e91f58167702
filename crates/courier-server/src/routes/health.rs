//! Probes and the Prometheus endpoint.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::envelope::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::state::AppState;

/// Probe answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Backend name.
    pub backend: String,
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "alive", body = Envelope<Health>)))]
pub async fn healthz(State(state): State<AppState>) -> Json<Envelope<Health>> {
    ok(
        "alive",
        Health {
            status: "ok".into(),
            backend: state.client.backend().into(),
        },
    )
}

/// Readiness: a real round trip to the backend succeeds.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "backend reachable", body = Envelope<Health>),
        (status = 503, description = "backend unreachable", body = ErrorEnvelope),
    ))]
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Envelope<Health>>> {
    match state.client.health_check().await {
        Ok(()) => Ok(ok(
            "ready",
            Health {
                status: "ok".into(),
                backend: state.client.backend().into(),
            },
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("backend not ready: {e}"),
        )),
    }
}

/// Prometheus text exposition of every metric recorded in this process.
#[utoipa::path(get, path = "/metrics", tag = "health", security(("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
    ))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}
