//! HTTP consumption: long-poll fetch, commit, leave (see `crate::consume`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::{Extension, Json};
use courier::OffsetReset;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::consume::{FetchRequest, Fetched};
use crate::envelope::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::extract::{ApiJson, ApiPath};
use crate::state::AppState;
use crate::time::rfc3339;

/// Where a group without commits starts.
#[derive(Clone, Copy, Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// Oldest stored message.
    Earliest,
    /// Only messages sent after the group first joined.
    #[default]
    Latest,
}

/// A fetch.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FetchBody {
    /// Consumer instance id; omit on the first fetch to get one, then reuse it.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200)]
    pub consumer_id: Option<String>,
    /// Topics to read (fixed for a consumer id).
    #[schema(min_items = 1)]
    pub topics: Vec<String>,
    /// Most records to return (default 100, at most 1000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub max_records: Option<u32>,
    /// Longest wait for a first record (ms, default 5000, capped by the server's
    /// `maxPollMs`).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 30000)]
    pub timeout_ms: Option<u64>,
    /// How long returned records stay reserved before they are delivered again
    /// (ms, default the server's `visibilityTimeoutMs`).
    #[serde(default)]
    #[schema(minimum = 100, maximum = 3600000)]
    pub visibility_timeout_ms: Option<u64>,
    /// Start position for a new group.
    #[serde(default)]
    pub auto_offset_reset: Option<StartFrom>,
}

/// One consumed record.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FetchedRecord {
    /// Topic.
    pub topic_name: String,
    /// Partition.
    pub partition: u32,
    /// Offset (pass back on commit).
    pub offset: u64,
    /// Key (UTF-8, or base64 when `keyEncoding` is `base64`).
    pub key: Option<String>,
    /// `text` or `base64`.
    pub key_encoding: String,
    /// The value: JSON as sent through this API; other bytes as a string (see
    /// `valueEncoding`).
    #[schema(value_type = Object)]
    pub value: Box<RawValue>,
    /// `json`, `text` (value is a string) or `base64` (value is base64 of the bytes).
    pub value_encoding: String,
    /// Headers (non-UTF-8 bytes replaced).
    pub headers: BTreeMap<String, String>,
    /// Message id.
    pub message_id: String,
    /// Send time, RFC 3339.
    pub timestamp: String,
    /// 1 on first delivery, more on redelivery (where the backend counts).
    pub attempt: u32,
}

fn record(f: Fetched) -> FetchedRecord {
    let d = f.delivery;
    let (key, key_encoding) = crate::payload::key(d.key.as_deref());
    let (value, value_encoding) = crate::payload::value(&d.value);
    FetchedRecord {
        topic_name: d.topic.to_string(),
        partition: d.partition,
        offset: d.offset,
        key,
        key_encoding: key_encoding.into(),
        value,
        value_encoding: value_encoding.into(),
        headers: d
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned()))
            .collect(),
        message_id: d.id.to_string(),
        timestamp: rfc3339(d.timestamp),
        attempt: d.attempt,
    }
}

/// Fetched records.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FetchResult {
    /// The consumer id to reuse.
    pub consumer_id: String,
    /// Records, per partition in offset order; empty after a timeout.
    pub records: Vec<FetchedRecord>,
}

/// One record position.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordRef {
    /// Topic.
    pub topic_name: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
}

/// A commit.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommitBody {
    /// The consumer that fetched the records.
    #[schema(min_length = 1)]
    pub consumer_id: String,
    /// Records processed.
    pub records: Vec<RecordRef>,
}

/// Commit outcome.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommitResult {
    /// Records acknowledged now.
    pub committed: usize,
    /// Records this consumer did not hold (expired and redelivered, already
    /// committed, or never fetched): they were not acknowledged.
    pub not_held: Vec<RecordRef>,
}

/// Leave outcome.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaveResult {
    /// The consumer that left.
    pub consumer_id: String,
}

fn check_group(group: &str) -> Result<(), ApiError> {
    if group.is_empty() || group.len() > 249 || group.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad_request(
            "groupId must be 1..=249 printable characters",
        ));
    }
    Ok(())
}

/// Long-polls for up to `maxRecords` records as one member of `groupId`.
#[utoipa::path(
    post, path = "/api/v1/mq/consumers/{groupId}/fetch", tag = "consume", security(("bearer" = [])),
    params(("groupId" = String, Path, description = "consumer group id")),
    request_body = FetchBody,
    responses(
        (status = 200, description = "records (possibly none)", body = Envelope<FetchResult>),
        (status = 400, description = "invalid request", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "topic not granted, or consumer owned by another token", body = ErrorEnvelope),
        (status = 404, description = "a topic does not exist", body = ErrorEnvelope),
        (status = 409, description = "consumer id already reads other topics", body = ErrorEnvelope),
        (status = 413, description = "body too large", body = ErrorEnvelope),
        (status = 429, description = "rate limit or too many consumers", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn fetch(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    ApiPath(group): ApiPath<String>,
    ApiJson(body): ApiJson<FetchBody>,
) -> ApiResult<Json<Envelope<FetchResult>>> {
    check_group(&group)?;
    if body.topics.is_empty() {
        return Err(ApiError::bad_request("topics must not be empty"));
    }
    for t in &body.topics {
        courier::validate_topic(t)?;
        p.check_topic(t)?;
        state.require_topic(t).await?;
    }
    let id = match body.consumer_id {
        Some(id) if id.is_empty() || id.len() > 200 => {
            return Err(ApiError::bad_request(
                "consumerId must be 1..=200 characters",
            ))
        }
        Some(id) => id,
        None => ulid::Ulid::new().to_string(),
    };
    let max = body.max_records.unwrap_or(100);
    if max == 0 || max > 1000 {
        return Err(ApiError::bad_request("maxRecords must be 1..=1000"));
    }
    let visibility = body
        .visibility_timeout_ms
        .unwrap_or(state.config.visibility_timeout_ms);
    if !(100..=3_600_000).contains(&visibility) {
        return Err(ApiError::bad_request(
            "visibilityTimeoutMs must be 100..=3600000",
        ));
    }
    let wait = body
        .timeout_ms
        .unwrap_or(5000)
        .min(state.config.max_poll_ms);
    let req = FetchRequest {
        topics: body.topics,
        max_records: max as usize,
        wait: Duration::from_millis(wait),
        visibility: Duration::from_millis(visibility),
        reset: match body.auto_offset_reset.unwrap_or_default() {
            StartFrom::Earliest => OffsetReset::Earliest,
            StartFrom::Latest => OffsetReset::Latest,
        },
    };
    let got = state.members.fetch(&group, &id, &p.name, req).await?;
    Ok(ok(
        "ok",
        FetchResult {
            consumer_id: id,
            records: got.into_iter().map(record).collect(),
        },
    ))
}

/// Acknowledges processed records; the group's position moves past them once every
/// earlier record of the partition is acknowledged too.
#[utoipa::path(
    post, path = "/api/v1/mq/consumers/{groupId}/commit", tag = "consume", security(("bearer" = [])),
    params(("groupId" = String, Path, description = "consumer group id")),
    request_body = CommitBody,
    responses(
        (status = 200, description = "acknowledged", body = Envelope<CommitResult>),
        (status = 400, description = "invalid request", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "consumer owned by another token", body = ErrorEnvelope),
        (status = 404, description = "no such consumer (timed out or left)", body = ErrorEnvelope),
        (status = 413, description = "body too large", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
    )
)]
pub async fn commit(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    ApiPath(group): ApiPath<String>,
    ApiJson(body): ApiJson<CommitBody>,
) -> ApiResult<Json<Envelope<CommitResult>>> {
    check_group(&group)?;
    let refs: Vec<(String, u32, u64)> = body
        .records
        .iter()
        .map(|r| (r.topic_name.clone(), r.partition, r.offset))
        .collect();
    let missing = state
        .members
        .commit(&group, &body.consumer_id, &p.name, &refs)?;
    Ok(ok(
        "committed",
        CommitResult {
            committed: refs.len() - missing.len(),
            not_held: missing
                .into_iter()
                .map(|(topic_name, partition, offset)| RecordRef {
                    topic_name,
                    partition,
                    offset,
                })
                .collect(),
        },
    ))
}

/// Leaves the group: records fetched and not committed come back to the group.
#[utoipa::path(
    delete, path = "/api/v1/mq/consumers/{groupId}/members/{consumerId}", tag = "consume", security(("bearer" = [])),
    params(
        ("groupId" = String, Path, description = "consumer group id"),
        ("consumerId" = String, Path, description = "consumer instance id"),
    ),
    responses(
        (status = 200, description = "left", body = Envelope<LeaveResult>),
        (status = 400, description = "invalid request", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "consumer owned by another token", body = ErrorEnvelope),
        (status = 404, description = "no such consumer", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
    )
)]
pub async fn leave(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    ApiPath((group, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Envelope<LeaveResult>>> {
    check_group(&group)?;
    state.members.leave(&group, &id, &p.name).await?;
    Ok(ok("left", LeaveResult { consumer_id: id }))
}
