//! Topic management (seed 004 §5.2.2; SPEC A1). Admin only.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use courier::{TopicInfo, TopicSpec};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::envelope::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::extract::{ApiJson, ApiPath};
use crate::state::AppState;
use crate::time::rfc3339;

/// Most partitions one topic may have through this API.
pub const MAX_PARTITIONS: u32 = 1024;

/// A topic to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTopicRequest {
    /// Name (`{domain}.{entity}.{event}` by convention).
    #[schema(example = "payment.order.paid", pattern = "^[A-Za-z0-9._-]{1,249}$")]
    pub name: String,
    /// Free text (not stored by every backend).
    #[serde(default)]
    pub description: Option<String>,
    /// Partitions (default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1024)]
    pub partitions: Option<u32>,
    /// Replicas per partition where the backend replicates (default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub replication_factor: Option<u16>,
    /// Keep messages this long (ms); -1 = forever.
    #[serde(default)]
    #[schema(minimum = -1)]
    pub retention_ms: Option<i64>,
    /// Largest accepted message (bytes).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_message_size: Option<u64>,
    /// Other settings (`cleanup.policy`, `compression.type`, `fsync` …).
    #[serde(default)]
    pub config: Option<BTreeMap<String, String>>,
}

/// Changes to a topic; absent fields stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateTopicRequest {
    /// Grow to this many partitions (never shrinks).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1024)]
    pub partitions: Option<u32>,
    /// New retention (ms); -1 = forever.
    #[serde(default)]
    #[schema(minimum = -1)]
    pub retention_ms: Option<i64>,
    /// New largest message (bytes).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_message_size: Option<u64>,
    /// Settings to set.
    #[serde(default)]
    pub config: Option<BTreeMap<String, String>>,
}

/// Answer to a create (seed 004 shape).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicCreated {
    /// Topic id (the name: names are unique).
    pub topic_id: String,
    /// Name.
    pub name: String,
    /// `active`.
    pub status: String,
    /// RFC 3339.
    pub created_at: String,
}

/// One partition's extent.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionView {
    /// Partition number.
    pub partition: u32,
    /// First available offset.
    pub start_offset: u64,
    /// Next offset to be written.
    pub end_offset: u64,
}

/// A topic as stored.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicView {
    /// Name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Replication factor.
    pub replication_factor: u16,
    /// Retention (ms), when the backend reports one.
    pub retention_ms: Option<i64>,
    /// Largest message (bytes), when the backend reports one.
    pub max_message_size: Option<u64>,
    /// Effective settings.
    pub config: BTreeMap<String, String>,
    /// Messages currently stored.
    pub message_count: u64,
    /// `active`.
    pub status: String,
    /// Per-partition extents.
    pub partition_details: Vec<PartitionView>,
}

impl From<TopicInfo> for TopicView {
    fn from(t: TopicInfo) -> Self {
        let num = |k: &str| t.config.get(k).and_then(|v| v.parse::<i64>().ok());
        Self {
            retention_ms: num("retention.ms"),
            max_message_size: num("max.message.bytes").and_then(|v| u64::try_from(v).ok()),
            partitions: t.partitions.len() as u32,
            replication_factor: t.replication_factor,
            message_count: t.message_count(),
            status: "active".into(),
            partition_details: t
                .partitions
                .iter()
                .map(|p| PartitionView {
                    partition: p.partition,
                    start_offset: p.start_offset,
                    end_offset: p.end_offset,
                })
                .collect(),
            name: t.name,
            config: t.config,
        }
    }
}

/// All topics.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopicList {
    /// Topics, sorted by name.
    pub topics: Vec<TopicView>,
}

/// Answer to a delete.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopicDeleted {
    /// The deleted topic.
    pub name: String,
}

fn check_partitions(state: &AppState, n: u32) -> Result<(), ApiError> {
    let max = state.config.max_partitions.min(MAX_PARTITIONS);
    if n == 0 || n > max {
        return Err(ApiError::bad_request(format!(
            "partitions must be 1..={max}"
        )));
    }
    Ok(())
}

/// Lists topics with their partitions.
#[utoipa::path(
    get, path = "/api/v1/mq/topics", tag = "topics", security(("bearer" = [])),
    responses(
        (status = 200, description = "topics", body = Envelope<TopicList>),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "not an admin token", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn list(State(state): State<AppState>) -> ApiResult<Json<Envelope<TopicList>>> {
    let admin = state.client.admin();
    let mut topics = Vec::new();
    for name in admin.list_topics().await? {
        match admin.describe_topic(&name).await {
            Ok(t) => topics.push(t.into()),
            // Deleted between list and describe.
            Err(courier::Error::TopicNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ok("ok", TopicList { topics }))
}

/// Creates a topic; 409 when it exists.
#[utoipa::path(
    post, path = "/api/v1/mq/topics", tag = "topics", security(("bearer" = [])),
    request_body = CreateTopicRequest,
    responses(
        (status = 200, description = "created", body = Envelope<TopicCreated>),
        (status = 400, description = "invalid name or settings", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "not an admin token", body = ErrorEnvelope),
        (status = 409, description = "topic exists", body = ErrorEnvelope),
        (status = 413, description = "body too large", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateTopicRequest>,
) -> ApiResult<Json<Envelope<TopicCreated>>> {
    let partitions = req.partitions.unwrap_or(1);
    check_partitions(&state, partitions)?;
    let rf = req.replication_factor.unwrap_or(1);
    if rf == 0 || rf > 16 {
        return Err(ApiError::bad_request("replicationFactor must be 1..=16"));
    }
    if req.retention_ms.is_some_and(|r| r < -1) {
        return Err(ApiError::bad_request("retentionMs must be -1 or more"));
    }
    let mut spec = TopicSpec::new(req.name.clone(), partitions);
    spec.replication_factor = rf;
    spec.retention_ms = req.retention_ms;
    spec.max_message_size = match req.max_message_size {
        Some(0) => return Err(ApiError::bad_request("maxMessageSize must be at least 1")),
        Some(m) => Some(
            usize::try_from(m).map_err(|_| ApiError::bad_request("maxMessageSize too large"))?,
        ),
        None => None,
    };
    spec.config = req.config.unwrap_or_default();
    state.client.admin().create_topic(spec).await?;
    let _ = req.description;
    Ok(ok(
        "topic created",
        TopicCreated {
            topic_id: req.name.clone(),
            name: req.name,
            status: "active".into(),
            created_at: rfc3339(courier::now_millis()),
        },
    ))
}

/// Describes one topic.
#[utoipa::path(
    get, path = "/api/v1/mq/topics/{name}", tag = "topics", security(("bearer" = [])),
    params(("name" = String, Path, description = "topic name")),
    responses(
        (status = 200, description = "the topic", body = Envelope<TopicView>),
        (status = 400, description = "invalid name", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "not an admin token", body = ErrorEnvelope),
        (status = 404, description = "no such topic", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<Envelope<TopicView>>> {
    let t = state.client.admin().describe_topic(&name).await?;
    Ok(ok("ok", t.into()))
}

/// Updates settings and/or grows partitions.
#[utoipa::path(
    put, path = "/api/v1/mq/topics/{name}", tag = "topics", security(("bearer" = [])),
    params(("name" = String, Path, description = "topic name")),
    request_body = UpdateTopicRequest,
    responses(
        (status = 200, description = "updated topic", body = Envelope<TopicView>),
        (status = 400, description = "invalid settings (e.g. fewer partitions)", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "not an admin token", body = ErrorEnvelope),
        (status = 404, description = "no such topic", body = ErrorEnvelope),
        (status = 413, description = "body too large", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateTopicRequest>,
) -> ApiResult<Json<Envelope<TopicView>>> {
    let admin = state.client.admin();
    let current = admin.describe_topic(&name).await?;
    let mut config = req.config.unwrap_or_default();
    if let Some(r) = req.retention_ms {
        if r < -1 {
            return Err(ApiError::bad_request("retentionMs must be -1 or more"));
        }
        if r >= 0 {
            config.insert("retention.ms".into(), r.to_string());
        }
    }
    if let Some(m) = req.max_message_size {
        if m == 0 {
            return Err(ApiError::bad_request("maxMessageSize must be at least 1"));
        }
        config.insert("max.message.bytes".into(), m.to_string());
    }
    if let Some(p) = req.partitions {
        check_partitions(&state, p)?;
        let have = current.partitions.len() as u32;
        if p < have {
            return Err(ApiError::bad_request(format!(
                "partitions can only grow (topic has {have})"
            )));
        }
        if p > have {
            admin.add_partitions(&name, p).await?;
        }
    }
    if !config.is_empty() {
        admin.update_topic_config(&name, config).await?;
    }
    let t = admin.describe_topic(&name).await?;
    Ok(ok("topic updated", t.into()))
}

/// Deletes a topic and its messages.
#[utoipa::path(
    delete, path = "/api/v1/mq/topics/{name}", tag = "topics", security(("bearer" = [])),
    params(("name" = String, Path, description = "topic name")),
    responses(
        (status = 200, description = "deleted", body = Envelope<TopicDeleted>),
        (status = 400, description = "invalid name", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "not an admin token", body = ErrorEnvelope),
        (status = 404, description = "no such topic", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<Envelope<TopicDeleted>>> {
    state.client.admin().delete_topic(&name).await?;
    state.forget_topic(&name);
    Ok(ok("topic deleted", TopicDeleted { name }))
}
