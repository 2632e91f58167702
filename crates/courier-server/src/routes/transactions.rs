//! `POST /transactions/{id}/commit` and `/rollback`: deciding half messages prepared
//! with `messageType: transaction` (SPEC P4), through `courier::Transactions`.

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::envelope::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::extract::ApiPath;
use crate::state::AppState;

/// The outcome of a decision.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransactionResult {
    /// The half message's id (`messageId` of the prepare).
    pub transaction_id: String,
    /// `commit` or `rollback`.
    pub decision: String,
}

/// Path of the decision routes.
#[derive(Debug, Deserialize)]
pub struct TxnPath {
    id: String,
}

/// Who may decide `id`: the token that prepared it through this server, or an admin.
fn authorize(state: &AppState, p: &Principal, id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > 200 {
        return Err(ApiError::bad_request(
            "transaction id must be 1 to 200 characters",
        ));
    }
    if p.is_admin() {
        return Ok(());
    }
    match state.halves.owner(id) {
        Some(owner) if owner == p.name => Ok(()),
        Some(_) => Err(ApiError::forbidden(
            "this half message was prepared by another token",
        )),
        None => Err(ApiError::forbidden(
            "this server does not know who prepared this half message; an admin token may decide it",
        )),
    }
}

async fn decide(
    state: AppState,
    p: &Principal,
    id: String,
    commit: bool,
) -> ApiResult<Json<Envelope<TransactionResult>>> {
    authorize(&state, p, &id)?;
    let txns = state.client.transactions();
    if commit {
        txns.commit(&id).await?;
    } else {
        txns.rollback(&id).await?;
    }
    state.halves.decided(&id);
    let decision = if commit { "commit" } else { "rollback" };
    tracing::info!(id = %id, decision, who = %p.name, "half message decided");
    Ok(ok(
        if commit {
            "half message committed"
        } else {
            "half message rolled back"
        },
        TransactionResult {
            transaction_id: id,
            decision: decision.into(),
        },
    ))
}

/// Commits a half message: it becomes visible once, under its id. Durable when this
/// answers; deciding an unknown or already decided id changes nothing.
#[utoipa::path(
    post, path = "/api/v1/mq/transactions/{id}/commit", tag = "messages",
    params(("id" = String, Path, description = "messageId returned by the prepare")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "committed", body = Envelope<TransactionResult>),
        (status = 400, description = "invalid id", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "prepared by another token (or unknown to this server and not an admin token)", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn commit(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    ApiPath(path): ApiPath<TxnPath>,
) -> ApiResult<Json<Envelope<TransactionResult>>> {
    decide(state, &p, path.id, true).await
}

/// Rolls back a half message: it is never delivered. Same rules as commit.
#[utoipa::path(
    post, path = "/api/v1/mq/transactions/{id}/rollback", tag = "messages",
    params(("id" = String, Path, description = "messageId returned by the prepare")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "rolled back", body = Envelope<TransactionResult>),
        (status = 400, description = "invalid id", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "prepared by another token (or unknown to this server and not an admin token)", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn rollback(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    ApiPath(path): ApiPath<TxnPath>,
) -> ApiResult<Json<Envelope<TransactionResult>>> {
    decide(state, &p, path.id, false).await
}
