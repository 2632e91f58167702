//! Dead letters (`GET /dead-letters`, `POST /dead-letters/retry`, SPEC R3).
//!
//! Not served yet: they need the dead-letter library API (listing a DLQ topic and
//! re-driving to `x-original-topic`) that is being added to `courier`. When it lands,
//! add the two handlers here, list them in [`routes`], in `crate::openapi::ApiDoc`,
//! and audit the retry (it is an admin route, so the audit layer covers it).

use axum::Router;

use crate::state::AppState;

/// The dead-letter routes (admin only); empty until the DLQ API exists, so requests
/// to them get the envelope 404.
pub fn routes() -> Router<AppState> {
    Router::new()
}
