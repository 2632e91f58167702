//! Dead letters (`GET /dead-letters`, `POST /dead-letters/retry`, SPEC R3) over
//! [`courier::DeadLetters`]. Admin only; the admin routes' audit layer records every
//! listing and every re-drive.

use std::collections::{BTreeMap, HashSet};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use courier::{DeadLetter, LetterFilter};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use crate::envelope::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::extract::{ApiJson, ApiQuery};
use crate::state::AppState;
use crate::time::rfc3339;

/// The dead-letter routes (admin only).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dead-letters", get(list))
        .route("/dead-letters/retry", post(retry))
}

/// Most letters one listing returns.
const MAX_LIMIT: usize = 1000;
/// Most ids one retry names.
const MAX_IDS: usize = 10_000;

/// Listing filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// The dead-letter topic, or the original topic whose dead-letter topic is
    /// `{topicName}.dlq`.
    #[param(pattern = "^[A-Za-z0-9._-]{1,249}$")]
    pub topic_name: String,
    /// Only letters from this original topic.
    pub original_topic: Option<String>,
    /// Only letters given up by this consumer group.
    pub group_id: Option<String>,
    /// Only letters whose error message contains this text.
    pub error_contains: Option<String>,
    /// Most letters to return (default 100, at most 1000); `total` counts them all.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// A filter over dead letters; every given field must match.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetterFilter {
    /// Only letters from this original topic.
    #[serde(default)]
    pub original_topic: Option<String>,
    /// Only letters given up by this consumer group.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Only letters whose error message contains this text.
    #[serde(default)]
    pub error_contains: Option<String>,
}

impl From<DeadLetterFilter> for LetterFilter {
    fn from(f: DeadLetterFilter) -> Self {
        LetterFilter {
            original_topic: f.original_topic,
            group: f.group_id,
            error_contains: f.error_contains,
        }
    }
}

/// One dead letter: the original message and why it was given up.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    /// Id of the letter in the dead-letter topic (what `retry` takes in `ids`).
    pub id: String,
    /// Dead-letter topic.
    pub dlq_topic: String,
    /// Partition in the dead-letter topic.
    pub dlq_partition: u32,
    /// Offset in the dead-letter topic.
    pub dlq_offset: u64,
    /// `x-original-topic`: where a retry re-publishes it.
    pub original_topic: String,
    /// `x-original-partition`.
    pub original_partition: Option<u32>,
    /// `x-original-offset`.
    pub original_offset: Option<u64>,
    /// `x-original-id`: the message id it had, and gets again on retry.
    pub original_id: Option<String>,
    /// `x-error-message`: the last error.
    pub error_message: String,
    /// `x-consumer-group`: the group that gave up.
    pub group_id: String,
    /// `x-retry-count`: retries after the first attempt.
    pub retry_count: u32,
    /// `x-failed-at`, RFC 3339.
    pub failed_at: String,
    /// Original key (UTF-8, or base64 when `keyEncoding` is `base64`).
    pub key: Option<String>,
    /// `text` or `base64`.
    pub key_encoding: String,
    /// Original value: JSON as sent through this API; other bytes as a string (see
    /// `valueEncoding`).
    #[schema(value_type = Object)]
    pub value: Box<RawValue>,
    /// `json`, `text` (value is a string) or `base64` (value is base64 of the bytes).
    pub value_encoding: String,
    /// Original headers (non-UTF-8 bytes replaced), without the dead-letter headers.
    pub headers: BTreeMap<String, String>,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(l: &DeadLetter) -> Self {
        let (key, key_encoding) = crate::payload::key(l.key.as_deref());
        let (value, value_encoding) = crate::payload::value(&l.value);
        Self {
            id: l.id.clone(),
            dlq_topic: l.dlq_topic.clone(),
            dlq_partition: l.dlq_partition,
            dlq_offset: l.dlq_offset,
            original_topic: l.original_topic.clone(),
            original_partition: l.original_partition,
            original_offset: l.original_offset,
            original_id: l.original_id.clone(),
            error_message: l.error.clone(),
            group_id: l.group.clone(),
            retry_count: l.retry_count,
            failed_at: rfc3339(l.failed_at),
            key,
            key_encoding: key_encoding.into(),
            value,
            value_encoding: value_encoding.into(),
            headers: l
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
        }
    }
}

/// Letters not re-driven yet.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterList {
    /// The dead-letter topic that was read.
    pub dlq_topic: String,
    /// Letters matching the filters (before `limit`).
    pub total: usize,
    /// Up to `limit` of them, oldest first per partition.
    pub letters: Vec<DeadLetterView>,
}

/// Which letters to re-drive, and how fast.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryRequest {
    /// The dead-letter topic, or the original topic whose dead-letter topic is
    /// `{topicName}.dlq`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,249}$")]
    pub topic_name: String,
    /// Re-drive these letters (ids from the listing). Exactly one of `ids`, `filter`,
    /// `all: true`.
    #[serde(default)]
    #[schema(min_items = 1, max_items = 10000)]
    pub ids: Option<Vec<String>>,
    /// Re-drive the letters matching this filter.
    #[serde(default)]
    pub filter: Option<DeadLetterFilter>,
    /// Re-drive every letter.
    #[serde(default)]
    pub all: Option<bool>,
    /// Most letters re-published per second (default and cap: the server's
    /// `maxRedrivePerSecond`). The answer comes when all are done.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub rate_per_second: Option<u32>,
}

/// A letter that could not be re-published (it stays listed).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedRedrive {
    /// Letter id.
    pub id: String,
    /// Why.
    pub error: String,
}

/// What a retry did.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryResult {
    /// The dead-letter topic.
    pub dlq_topic: String,
    /// The rate used (letters per second).
    pub rate_per_second: u32,
    /// Ids of letters published back to their original topics (no longer listed).
    pub redriven: Vec<String>,
    /// Letters whose publish failed.
    pub failed: Vec<FailedRedrive>,
    /// Requested ids that are not (or no longer) in the dead-letter topic.
    pub not_found: Vec<String>,
}

/// The dead-letter topic `name` means: itself when it ends in `.dlq`; else
/// `{name}.dlq` when that exists; else `name` itself when it exists (a custom
/// dead-letter topic); else `{name}.dlq` (which has no letters yet).
async fn resolve(state: &AppState, name: &str) -> ApiResult<String> {
    courier::validate_topic(name)?;
    crate::state::refuse_internal(name)?;
    if name.ends_with(".dlq") {
        return Ok(name.to_string());
    }
    let admin = state.client.admin();
    let derived = format!("{name}.dlq");
    let derived_valid = courier::validate_topic(&derived).is_ok();
    if derived_valid && admin.topic_exists(&derived).await? {
        return Ok(derived);
    }
    if !derived_valid || admin.topic_exists(name).await? {
        return Ok(name.to_string());
    }
    Ok(derived)
}

/// Lists the dead letters of a topic that were not re-driven yet.
#[utoipa::path(
    get, path = "/api/v1/mq/dead-letters", tag = "dead-letters", security(("bearer" = [])),
    params(DeadLetterQuery),
    responses(
        (status = 200, description = "letters (none when the topic does not exist)", body = Envelope<DeadLetterList>),
        (status = 400, description = "invalid query, or an internal topic", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "not an admin token", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<DeadLetterQuery>,
) -> ApiResult<Json<Envelope<DeadLetterList>>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let dlq = resolve(&state, &q.topic_name).await?;
    let filter = LetterFilter {
        original_topic: q.original_topic,
        group: q.group_id,
        error_contains: q.error_contains,
    };
    let letters: Vec<DeadLetter> = state
        .client
        .dead_letters()
        .list(&dlq)
        .await?
        .into_iter()
        .filter(|l| filter.matches(l))
        .collect();
    Ok(ok(
        "ok",
        DeadLetterList {
            dlq_topic: dlq,
            total: letters.len(),
            letters: letters.iter().take(limit).map(Into::into).collect(),
        },
    ))
}

/// Re-publishes dead letters to their original topics (original key, value, headers
/// and message id), rate limited, and answers when done. Re-driven letters are no
/// longer listed; a failed one stays.
#[utoipa::path(
    post, path = "/api/v1/mq/dead-letters/retry", tag = "dead-letters", security(("bearer" = [])),
    request_body = RetryRequest,
    responses(
        (status = 200, description = "what was re-driven", body = Envelope<RetryResult>),
        (status = 400, description = "invalid request (give exactly one of ids, filter, all: true)", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "not an admin token", body = ErrorEnvelope),
        (status = 413, description = "body too large", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn retry(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RetryRequest>,
) -> ApiResult<Json<Envelope<RetryResult>>> {
    let all = req.all.unwrap_or(false);
    let chosen =
        usize::from(req.ids.is_some()) + usize::from(req.filter.is_some()) + usize::from(all);
    if chosen != 1 {
        return Err(ApiError::bad_request(
            "give exactly one of ids, filter, or all: true",
        ));
    }
    if let Some(ids) = &req.ids {
        if ids.is_empty() || ids.len() > MAX_IDS {
            return Err(ApiError::bad_request(format!(
                "ids must name between 1 and {MAX_IDS} letters"
            )));
        }
    }
    let cap = state.config.max_redrive_per_second;
    let rate = match req.rate_per_second {
        Some(0) => return Err(ApiError::bad_request("ratePerSecond must be at least 1")),
        Some(r) => r.min(cap),
        None => cap,
    };
    let dlq = resolve(&state, &req.topic_name).await?;
    let dead = state.client.dead_letters();
    let letters = dead.list(&dlq).await?;
    let mut not_found = Vec::new();
    let picked: Vec<DeadLetter> = match (&req.ids, req.filter) {
        (Some(ids), _) => {
            let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
            let present: HashSet<&str> = letters.iter().map(|l| l.id.as_str()).collect();
            not_found = ids
                .iter()
                .filter(|id| !present.contains(id.as_str()))
                .cloned()
                .collect();
            letters
                .iter()
                .filter(|l| wanted.contains(l.id.as_str()))
                .cloned()
                .collect()
        }
        (None, Some(f)) => {
            let f = LetterFilter::from(f);
            letters.into_iter().filter(|l| f.matches(l)).collect()
        }
        (None, None) => letters,
    };
    let report = dead.redrive_letters(&picked, rate).await?;
    let message = if report.failed.is_empty() {
        "dead letters re-driven"
    } else {
        "some dead letters could not be re-driven"
    };
    Ok(ok(
        message,
        RetryResult {
            dlq_topic: dlq,
            rate_per_second: rate,
            redriven: report.redriven,
            failed: report
                .failed
                .into_iter()
                .map(|(id, error)| FailedRedrive { id, error })
                .collect(),
            not_found,
        },
    ))
}
