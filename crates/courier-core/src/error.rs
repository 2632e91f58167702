//! The one error type of Courier (SPEC C8): every failure a user can match on.

use std::time::Duration;

/// A boxed error, what handlers return and what backends wrap.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result with Courier's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure Courier reports. Input errors (`Empty*`, `NoTopics`, `InvalidTopic`,
/// `MessageTooLarge`, `InvalidUrl`, `UnsupportedBackend`, `Config`) are raised before
/// anything is sent, so nothing is half-written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration names no broker for a backend that needs one.
    #[error("no brokers configured")]
    NoBrokers,
    /// The client was shut down; it hands out nothing more.
    #[error("client is closed")]
    ClientClosed,
    /// The producer was closed; sends after close are refused.
    #[error("producer is closed")]
    ProducerClosed,
    /// The consumer was closed.
    #[error("consumer is closed")]
    ConsumerClosed,
    /// A consumer was built with an empty group id.
    #[error("group id must not be empty")]
    EmptyGroupId,
    /// A message or request named an empty topic.
    #[error("topic must not be empty")]
    EmptyTopic,
    /// `subscribe` was called with no topics.
    #[error("no topics to subscribe to")]
    NoTopics,
    /// A topic name that no backend accepts (characters, length).
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopic {
        /// The rejected name.
        topic: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The message is larger than the configured or topic maximum.
    #[error("message of {size} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge {
        /// Encoded size of key + value + headers.
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// The URL's scheme names no backend compiled into this build.
    #[error("unsupported backend {scheme:?}; this build supports: {}", supported.join(", "))]
    UnsupportedBackend {
        /// The scheme that was asked for.
        scheme: String,
        /// Schemes compiled in.
        supported: Vec<&'static str>,
    },
    /// The URL could not be parsed or lacks a required part.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Invalid configuration value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Invalid argument to an API call.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A single send failed after the backend's retries.
    #[error("send to {topic:?} failed: {source}")]
    SendFailed {
        /// Topic of the failed message.
        topic: String,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// Part or all of a batch failed; `failed` of `total` messages were not stored.
    #[error("batch send failed for {failed} of {total} messages: {source}")]
    BatchSendFailed {
        /// How many messages failed.
        failed: usize,
        /// Batch size.
        total: usize,
        /// The first error.
        #[source]
        source: Box<Error>,
    },
    /// The producer's buffer is full; retry later or flush.
    #[error("producer queue is full ({0} messages buffered)")]
    QueueFull(usize),
    /// The topic does not exist.
    #[error("topic {0:?} not found")]
    TopicNotFound(String),
    /// The topic already exists.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// The consumer group does not exist.
    #[error("group {0:?} not found")]
    GroupNotFound(String),
    /// A commit or rollback named a half message this client's scheduler member owns
    /// but does not hold: never prepared, already decided, or settled by check-back.
    #[error("transaction {0:?} not found: unknown or already decided")]
    TxnNotFound(String),
    /// The backend cannot do this, natively or emulated.
    #[error("{feature} is not supported by the {backend} backend")]
    Unsupported {
        /// What was asked for.
        feature: &'static str,
        /// Backend name.
        backend: &'static str,
    },
    /// The backend could not be reached or the connection broke.
    #[error("{backend} connection error: {message}")]
    Connection {
        /// Backend name.
        backend: &'static str,
        /// What happened.
        message: String,
    },
    /// Any other backend error.
    #[error("{backend} error: {message}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What happened.
        message: String,
    },
    /// An operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A readiness check failed: a consumer has no partitions or lost its backend.
    #[error("not ready: {0}")]
    NotReady(String),
    /// A value could not be (de)serialized.
    #[error("serialization error: {0}")]
    Serialization(String),
    /// Local storage I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A [`Error::Backend`] from any displayable error.
    pub fn backend(backend: &'static str, e: impl std::fmt::Display) -> Self {
        Error::Backend {
            backend,
            message: e.to_string(),
        }
    }

    /// A [`Error::Connection`] from any displayable error.
    pub fn connection(backend: &'static str, e: impl std::fmt::Display) -> Self {
        Error::Connection {
            backend,
            message: e.to_string(),
        }
    }

    /// The Courier error at the root of a send failure: a [`Error::SendFailed`] or
    /// [`Error::BatchSendFailed`] is unwrapped to the error the backend reported (also
    /// when a batch's one error is shared by all its messages); any other error is
    /// its own cause. Lets callers match on the typed reason, e.g. a backend's
    /// [`Error::MessageTooLarge`], without reading error text.
    pub fn root_cause(&self) -> &Error {
        match self {
            Error::SendFailed { source, .. } => {
                if let Some(inner) = source.downcast_ref::<Error>() {
                    inner.root_cause()
                } else if let Some(shared) = source.downcast_ref::<std::sync::Arc<Error>>() {
                    shared.root_cause()
                } else {
                    self
                }
            }
            Error::BatchSendFailed { source, .. } => source.root_cause(),
            _ => self,
        }
    }

    /// True for errors caused by the caller's input, which retrying cannot fix.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::EmptyGroupId
                | Error::EmptyTopic
                | Error::NoTopics
                | Error::InvalidTopic { .. }
                | Error::MessageTooLarge { .. }
                | Error::UnsupportedBackend { .. }
                | Error::InvalidUrl { .. }
                | Error::Config(_)
                | Error::InvalidArgument(_)
        )
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Serialization(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn cause_sees_through_send_failures_shared_or_not() {
        let too_large = || Error::MessageTooLarge { size: 10, max: 5 };
        let direct = Error::SendFailed {
            topic: "t".into(),
            source: Box::new(too_large()),
        };
        let shared = Error::SendFailed {
            topic: "t".into(),
            source: Box::new(Arc::new(Error::BatchSendFailed {
                failed: 2,
                total: 2,
                source: Box::new(too_large()),
            })),
        };
        for e in [direct, shared] {
            assert!(
                matches!(e.root_cause(), Error::MessageTooLarge { size: 10, max: 5 }),
                "{e}"
            );
        }
        let opaque = Error::SendFailed {
            topic: "t".into(),
            source: "disk on fire".into(),
        };
        assert!(matches!(opaque.root_cause(), Error::SendFailed { .. }));
        assert!(matches!(Error::EmptyTopic.root_cause(), Error::EmptyTopic));
    }
}
