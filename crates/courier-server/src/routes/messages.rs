//! `POST /messages` and `POST /messages/batch` (seed 004 §5.2.1).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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
    /// Visible `delaySeconds` after it is stored (not before; promptly after).
    Delay,
    /// Two-phase transactional (half) message: stored but invisible until
    /// `POST /transactions/{messageId}/commit`; `/rollback` discards it.
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
    /// `normal` (default), `delay` or `transaction` (single sends only).
    #[serde(default)]
    pub message_type: Option<MessageType>,
    /// Delay for `messageType: delay` (at least 1, at most one year); must be 0 (or
    /// absent) otherwise.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 31536000)]
    pub delay_seconds: Option<u64>,
}

/// Where a message was stored.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendResult {
    /// Unique message id (ULID); for a transaction message, the half id to commit or
    /// roll back (the message is delivered under this id).
    pub message_id: String,
    /// Topic.
    pub topic_name: String,
    /// Partition (for delay and transaction messages: of the schedule log holding it
    /// until it is due or committed).
    pub partition: u32,
    /// Offset within that partition.
    pub offset: u64,
    /// Store time, RFC 3339.
    pub timestamp: String,
    /// For delay messages: when it becomes visible, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliver_at: Option<String>,
}

impl From<Receipt> for SendResult {
    fn from(r: Receipt) -> Self {
        Self {
            message_id: r.id,
            topic_name: r.topic,
            partition: r.partition,
            offset: r.offset,
            timestamp: rfc3339(r.timestamp),
            deliver_at: None,
        }
    }
}

impl SendResult {
    /// The result for `msg` stored with `receipt`: names the target topic (a delayed
    /// or half message's receipt names the schedule log) and the due time.
    fn of(msg_topic: String, deliver_at: Option<i64>, receipt: Receipt) -> Self {
        Self {
            topic_name: msg_topic,
            deliver_at: deliver_at.map(rfc3339),
            ..receipt.into()
        }
    }
}

/// The longest accepted `delaySeconds` (one year).
const MAX_DELAY_SECONDS: u64 = 365 * 24 * 3600;

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

fn to_message(p: &Principal, req: SendMessageRequest) -> Result<(Message, MessageType), ApiError> {
    let kind = req.message_type.unwrap_or_default();
    let delay = req.delay_seconds.unwrap_or(0);
    match kind {
        MessageType::Delay if delay == 0 => {
            return Err(ApiError::bad_request(
                "messageType \"delay\" needs delaySeconds of at least 1",
            ))
        }
        MessageType::Delay if delay > MAX_DELAY_SECONDS => {
            return Err(ApiError::bad_request(format!(
                "delaySeconds must be at most {MAX_DELAY_SECONDS}"
            )))
        }
        MessageType::Normal | MessageType::Transaction if delay != 0 => {
            return Err(ApiError::bad_request(
                "delaySeconds needs messageType \"delay\"",
            ))
        }
        _ => {}
    }
    if req.topic_name.is_empty() {
        return Err(ApiError::bad_request("topicName must not be empty"));
    }
    crate::state::refuse_internal(&req.topic_name)?;
    p.check_topic(&req.topic_name)?;
    let value = bytes::Bytes::from(Box::<str>::from(req.value).into_boxed_bytes());
    let mut msg = Message::new(req.topic_name, value);
    if let Some(k) = req.key {
        msg = msg.key(k);
    }
    for (k, v) in req.headers.unwrap_or_default() {
        msg = msg.header(k, v);
    }
    if kind == MessageType::Delay {
        msg = msg.delay(Duration::from_secs(delay));
    }
    Ok((msg, kind))
}

/// Sends one message; answers after it is stored.
#[utoipa::path(
    post, path = "/api/v1/mq/messages", tag = "messages",
    request_body = SendMessageRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "stored", body = Envelope<SendResult>),
        (status = 400, description = "invalid message, delaySeconds without messageType delay, or an internal topic", body = ErrorEnvelope),
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
    let (msg, kind) = to_message(&p, req)?;
    state.require_topic(&msg.topic).await?;
    let (topic, deliver_at) = (msg.topic.clone(), msg.deliver_at);
    match kind {
        MessageType::Normal => {
            let receipt = state.producer.send(msg).await?;
            Ok(ok("message sent", receipt.into()))
        }
        MessageType::Delay => {
            let receipt = state.producer.send(msg).await?;
            Ok(ok(
                "message scheduled",
                SendResult::of(topic, deliver_at, receipt),
            ))
        }
        MessageType::Transaction => {
            let half = state.producer.prepare(msg).await?;
            state.halves.prepared(half.id(), &p.name);
            let result = SendResult::of(topic, None, half.receipt().clone());
            // Decided later by id through POST /transactions/{id}/commit|rollback.
            drop(half);
            Ok(ok("half message prepared; commit or roll it back", result))
        }
    }
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
        let (msg, kind) = to_message(&p, m)?;
        if kind == MessageType::Transaction {
            return Err(ApiError::bad_request(
                "transaction messages are prepared one at a time with POST /messages",
            ));
        }
        msgs.push(msg);
    }
    let mut checked: Vec<&str> = Vec::new();
    for m in &msgs {
        if !checked.contains(&m.topic.as_str()) {
            state.require_topic(&m.topic).await?;
            checked.push(&m.topic);
        }
    }
    let targets: Vec<(String, Option<i64>)> = msgs
        .iter()
        .map(|m| (m.topic.clone(), m.deliver_at))
        .collect();
    let receipts = state.producer.send_batch(msgs).await?;
    Ok(ok(
        "messages sent",
        SendBatchResult {
            results: receipts
                .into_iter()
                .zip(targets)
                .map(|(r, (topic, at))| SendResult::of(topic, at, r))
                .collect(),
        },
    ))
}
