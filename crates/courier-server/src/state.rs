//! Shared state of one running server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{Client, Producer};
use parking_lot::RwLock;

use crate::audit::AuditLog;
use crate::auth::TokenStore;
use crate::config::ServerConfig;
use crate::consume::Members;
use crate::monitor::History;

/// Everything handlers need. One `Arc`: axum clones the state for every request and
/// every middleware, and a struct of ten `Arc`s made that a visible cost under load.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl From<Shared> for AppState {
    fn from(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

/// The fields behind an [`AppState`].
pub struct Shared {
    /// The backend.
    pub client: Client,
    /// The one producer all requests share (its adaptive batching merges concurrent
    /// requests into one backend write).
    pub producer: Producer,
    /// Known tokens.
    pub tokens: Arc<TokenStore>,
    /// Settings.
    pub config: Arc<ServerConfig>,
    /// HTTP consumer group members.
    pub members: Arc<Members>,
    /// Offset samples for rates.
    pub history: Arc<History>,
    /// Audit sink.
    pub audit: AuditLog,
    /// Topics seen to exist recently (saves a backend round trip per send).
    pub topics_seen: Arc<RwLock<HashMap<String, Instant>>>,
    /// Who prepared which half message.
    pub halves: Arc<crate::halves::Halves>,
}

/// Prefix of Courier's own topics (the schedule log of delayed and half messages).
const INTERNAL_PREFIX: &str = "__courier.";

/// 400 for Courier's internal topics: writing to them by hand would corrupt the
/// scheduler's state.
pub fn refuse_internal(topic: &str) -> Result<(), crate::envelope::ApiError> {
    if topic.starts_with(INTERNAL_PREFIX) {
        return Err(crate::envelope::ApiError::bad_request(format!(
            "topic {topic:?} is internal to Courier"
        )));
    }
    Ok(())
}

/// How long a positive "topic exists" answer is trusted.
const TOPIC_CACHE_TTL: Duration = Duration::from_secs(5);

impl AppState {
    /// 404 unless `topic` exists (cached briefly).
    pub async fn require_topic(&self, topic: &str) -> Result<(), crate::envelope::ApiError> {
        if let Some(at) = self.topics_seen.read().get(topic) {
            if at.elapsed() < TOPIC_CACHE_TTL {
                return Ok(());
            }
        }
        if self.client.admin().topic_exists(topic).await? {
            self.topics_seen
                .write()
                .insert(topic.to_string(), Instant::now());
            Ok(())
        } else {
            Err(crate::envelope::ApiError::not_found(format!(
                "topic {topic:?} not found (create it with POST /api/v1/mq/topics)"
            )))
        }
    }

    /// Forgets a topic (after delete).
    pub fn forget_topic(&self, topic: &str) {
        self.topics_seen.write().remove(topic);
    }
}
