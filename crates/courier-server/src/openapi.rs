//! The OpenAPI 3 document, generated from the handlers' annotations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{
    consume, dead_letters, groups, health, messages, monitoring, topics, transactions,
};

/// The API description served at `/api/v1/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "Courier REST API", description = "Seed 004 message queue API over any Courier backend. Every response is {code, message, data}."),
    paths(
        messages::send, messages::send_batch,
        transactions::commit, transactions::rollback,
        topics::list, topics::create, topics::get, topics::update, topics::delete,
        consume::fetch, consume::commit, consume::leave,
        groups::list, monitoring::monitoring,
        dead_letters::list, dead_letters::retry,
        health::healthz, health::readyz, health::metrics,
    ),
    modifiers(&Bearer),
    tags(
        (name = "messages", description = "send, delay, and transactional (half) messages with commit/rollback (service or admin tokens, granted topics)"),
        (name = "consume", description = "consumer-group reads over HTTP with explicit commit"),
        (name = "topics", description = "topic management (admin)"),
        (name = "consumers", description = "consumer groups (admin)"),
        (name = "monitoring", description = "rates and lag (admin)"),
        (name = "dead-letters", description = "listing and re-driving dead letters (admin, audited)"),
        (name = "health", description = "probes and metrics"),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
