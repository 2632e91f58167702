//! The `{code, message, data}` envelope every response uses (seed 004 §5.2), and the
//! one error type handlers return.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use courier::Error;
use serde::Serialize;
use utoipa::ToSchema;

/// A successful response: `code` is the HTTP status, `data` the payload.
#[derive(Debug, Serialize, ToSchema)]
pub struct Envelope<T> {
    /// The HTTP status code, repeated in the body.
    pub code: u16,
    /// Human-readable outcome.
    pub message: String,
    /// The payload.
    pub data: T,
}

/// Any error response: same envelope, `data` is always `null`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEnvelope {
    /// The HTTP status code, repeated in the body.
    pub code: u16,
    /// What went wrong, safe to show (never contains secrets).
    pub message: String,
    /// Always `null` on errors.
    #[schema(value_type = Option<Object>)]
    pub data: Option<()>,
}

/// Wraps `data` in a 200 envelope.
pub fn ok<T: Serialize>(message: &str, data: T) -> Json<Envelope<T>> {
    Json(Envelope {
        code: 200,
        message: message.to_string(),
        data,
    })
}

/// An error with the HTTP status it maps to; rendered as an [`ErrorEnvelope`].
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message for the client.
    pub message: String,
    /// Seconds for `Retry-After` (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    /// 429 with `Retry-After: secs`.
    pub fn too_many(message: impl Into<String>, secs: u64) -> Self {
        Self {
            retry_after: Some(secs.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }
}

/// The HTTP status for a Courier error (a failed batch takes its cause's status).
fn status_of(e: &Error) -> StatusCode {
    match e.root_cause() {
        Error::EmptyTopic
        | Error::NoTopics
        | Error::EmptyGroupId
        | Error::InvalidTopic { .. }
        | Error::InvalidArgument(_)
        | Error::Config(_)
        | Error::Serialization(_) => StatusCode::BAD_REQUEST,
        Error::MessageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Error::TopicNotFound(_) | Error::GroupNotFound(_) | Error::TxnNotFound(_) => {
            StatusCode::NOT_FOUND
        }
        Error::TopicExists(_) => StatusCode::CONFLICT,
        Error::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
        Error::ClientClosed | Error::ProducerClosed | Error::ConsumerClosed => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = status_of(&e);
        if status == StatusCode::TOO_MANY_REQUESTS {
            return ApiError::too_many(e.to_string(), 1);
        }
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorEnvelope {
            code: self.status.as_u16(),
            message: self.message,
            data: None,
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"courier\""),
            );
        }
        resp
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
