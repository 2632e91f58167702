//! `POST /messages` and `POST /messages/batch` (seed 004 §5.2.1).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};
use courier::{Message, Receipt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::envelope::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::extract::ApiJson;
use crate::state::AppState;
use crate::time::rfc3339;

/// Kind of message (seed 004 `messageType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    /// Visible at once.
    #[default]
    Normal,
    /// Visible after `delaySeconds` (not available on this server yet: 400).
    Delay,
    /// Two-phase transactional message (not available on this server yet: 400).
    Transaction,
}

/// One message to send.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendMessageRequest {
    /// Destination topic (must exist).
    #[schema(example = "user.events", pattern = "^[A-Za-z0-9._-]{1,249}$")]
    pub topic_name: String,
    /// Partitioning key: one key always lands in one partition, in order.
    #[serde(default)]
    pub key: Option<String>,
    /// The payload, any JSON; stored as its JSON text.
    #[schema(value_type = Object)]
    pub value: Box<RawValue>,
    /// Headers, delivered unchanged.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// `normal` (default); `delay` and `transaction` are refused until this server
    /// supports them.
    #[serde(default)]
    pub message_type: Option<MessageType>,
    /// Delay for `messageType: delay`; must be 0 (or absent) otherwise.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub delay_seconds: Option<u64>,
}

/// Where a message was stored.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendResult {
    /// Unique message id (ULID).
    pub message_id: String,
    /// Topic.
    pub topic_name: String,
    /// Partition.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// Store time, RFC 3339.
    pub timestamp: String,
}

impl From<Receipt> for SendResult {
    fn from(r: Receipt) -> Self {
        Self {
            message_id: r.id,
            topic_name: r.topic,
            partition: r.partition,
            offset: r.offset,
            timestamp: rfc3339(r.timestamp),
        }
    }
}

/// Many messages in one request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendBatchRequest {
    /// The messages, stored in this order (per partition).
    pub messages: Vec<SendMessageRequest>,
}

/// Results of a batch, in request order.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendBatchResult {
    /// One result per message.
    pub results: Vec<SendResult>,
}

fn to_message(p: &Principal, req: SendMessageRequest) -> Result<Message, ApiError> {
    match req.message_type.unwrap_or_default() {
        MessageType::Normal => {}
        MessageType::Delay => {
            return Err(ApiError::bad_request(
                "messageType \"delay\" is not available on this server yet; send normal messages",
            ))
        }
        MessageType::Transaction => return Err(ApiError::bad_request(
            "messageType \"transaction\" is not available on this server yet; send normal messages",
        )),
    }
    if req.delay_seconds.unwrap_or(0) != 0 {
        return Err(ApiError::bad_request(
            "delaySeconds needs messageType \"delay\", which is not available on this server yet",
        ));
    }
    if req.topic_name.is_empty() {
        return Err(ApiError::bad_request("topicName must not be empty"));
    }
    p.check_topic(&req.topic_name)?;
    let value = bytes::Bytes::from(Box::<str>::from(req.value).into_boxed_bytes());
    let mut msg = Message::new(req.topic_name, value);
    if let Some(k) = req.key {
        msg = msg.key(k);
    }
    for (k, v) in req.headers.unwrap_or_default() {
        msg = msg.header(k, v);
    }
    Ok(msg)
}

/// Sends one message; answers after it is stored.
#[utoipa::path(
    post, path = "/api/v1/mq/messages", tag = "messages",
    request_body = SendMessageRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "stored", body = Envelope<SendResult>),
        (status = 400, description = "invalid message, or a messageType this server does not offer yet", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "topic not granted, or client address not allowed", body = ErrorEnvelope),
        (status = 404, description = "topic does not exist", body = ErrorEnvelope),
        (status = 413, description = "message or body too large", body = ErrorEnvelope),
        (status = 429, description = "rate limit; see Retry-After", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn send(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    ApiJson(req): ApiJson<SendMessageRequest>,
) -> ApiResult<Json<Envelope<SendResult>>> {
    let msg = to_message(&p, req)?;
    state.require_topic(&msg.topic).await?;
    let receipt = state.producer.send(msg).await?;
    Ok(ok("message sent", receipt.into()))
}

/// Sends many messages; all are validated before any is sent, and the answer comes
/// after every one is stored.
#[utoipa::path(
    post, path = "/api/v1/mq/messages/batch", tag = "messages",
    request_body = SendBatchRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "all stored", body = Envelope<SendBatchResult>),
        (status = 400, description = "a message is invalid (nothing was sent)", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "a topic is not granted", body = ErrorEnvelope),
        (status = 404, description = "a topic does not exist", body = ErrorEnvelope),
        (status = 413, description = "too many messages, or one too large", body = ErrorEnvelope),
        (status = 429, description = "rate limit; see Retry-After", body = ErrorEnvelope),
        (status = 500, description = "backend failure (some messages may be stored)", body = ErrorEnvelope),
    )
)]
pub async fn send_batch(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    ApiJson(req): ApiJson<SendBatchRequest>,
) -> ApiResult<Json<Envelope<SendBatchResult>>> {
    if req.messages.len() > state.config.max_batch {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {} messages per batch", state.config.max_batch),
        ));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        msgs.push(to_message(&p, m)?);
    }
    let mut checked: Vec<&str> = Vec::new();
    for m in &msgs {
        if !checked.contains(&m.topic.as_str()) {
            state.require_topic(&m.topic).await?;
            checked.push(&m.topic);
        }
    }
    let receipts = state.producer.send_batch(msgs).await?;
    Ok(ok(
        "messages sent",
        SendBatchResult {
            results: receipts.into_iter().map(Into::into).collect(),
        },
    ))
}
