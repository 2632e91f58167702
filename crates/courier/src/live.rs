//! Live configuration (SPEC C7): a [`ConfigSource`] pushes new configurations into a
//! running [`Client`](crate::Client) with
//! [`Client::watch_config`](crate::Client::watch_config).
//!
//! What changes while running, and when:
//!
//! - `producerConfig.compressionThreshold`: from the next message sent.
//! - `producerConfig.batchSize`, `lingerMs`: taken into
//!   [`Client::current_config`](crate::Client::current_config) but changing nothing
//!   while running: they are librdkafka's settings, and a Kafka producer keeps the
//!   `batch.size`/`linger.ms` it was created with (reconnect to change them). Courier's
//!   own producer batches adaptively on the other backends (a batch leaves as soon as
//!   the previous publish is stored; it never waits to fill one).
//! - `consumerConfig.autoCommitIntervalMs`, `sessionTimeoutMs`, `autoOffsetReset`:
//!   consumers that did not set the value on their builder finish every message they
//!   hold, commit, leave the group and join again with the new value — nothing is
//!   lost or handled twice.
//! - Everything else (URL, brokers, security, acks, limits, backend keys) needs a new
//!   client: a change is logged as a warning and ignored.
//!
//! An update that fails [`Config::validate`] is ignored with a warning; the last good
//! configuration stays in force.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use courier_core::Config;
use tokio::sync::watch;

/// Pushes configuration updates to a client ([`Client::watch_config`](crate::Client::watch_config)).
/// Implement it for a config centre; [`FileConfigSource`] is the built-in one.
#[async_trait]
pub trait ConfigSource: Send + 'static {
    /// Waits for the next configuration. `None` ends the watch. A source that cannot
    /// read or parse its input logs it and keeps waiting rather than returning a
    /// broken configuration.
    async fn next(&mut self) -> Option<Config>;
}

/// Default interval at which [`FileConfigSource`] looks at its file.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Watches a TOML or JSON config file (the format [`Config::from_file`] reads) by
/// polling its modification time and size. Each version is parsed and then given
/// the `COURIER_*` environment overrides, like [`Config::load`]; a file that does not
/// parse is ignored with a warning (the last good configuration stays in force) until
/// it changes again.
#[derive(Debug)]
pub struct FileConfigSource {
    path: PathBuf,
    interval: Duration,
    seen: Option<(Option<SystemTime>, u64)>,
    first: bool,
}

impl FileConfigSource {
    /// Watches `path`, looking every [`DEFAULT_POLL_INTERVAL`]. The first call to
    /// [`next`](ConfigSource::next) returns the file's current content.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            interval: DEFAULT_POLL_INTERVAL,
            seen: None,
            first: true,
        }
    }

    /// Looks at the file every `interval` instead (at least 1 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The watched path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed file when it changed since the last look, else `None`.
    fn look(&mut self) -> Option<Config> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => {
                if self.seen.is_some() {
                    tracing::warn!(path = %self.path.display(), error = %e, "config file unreadable; keeping the last good config");
                    self.seen = None;
                }
                return None;
            }
        };
        let stamp = (meta.modified().ok(), meta.len());
        if self.seen == Some(stamp) {
            return None;
        }
        self.seen = Some(stamp);
        match Config::from_file(&self.path).and_then(|mut c| {
            c.apply_env(std::env::vars())?;
            Ok(c)
        }) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "config file ignored; keeping the last good config");
                None
            }
        }
    }
}

#[async_trait]
impl ConfigSource for FileConfigSource {
    async fn next(&mut self) -> Option<Config> {
        loop {
            if !std::mem::take(&mut self.first) {
                tokio::time::sleep(self.interval).await;
            }
            if let Some(c) = self.look() {
                return Some(c);
            }
        }
    }
}

/// The configuration in force and the producer setting read on the hot path.
pub(crate) struct Live {
    tx: watch::Sender<Arc<Config>>,
    compression_threshold: AtomicUsize,
}

impl Live {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(config.clone())),
            compression_threshold: AtomicUsize::new(config.producer.compression_threshold),
        }
    }

    /// The configuration in force.
    pub(crate) fn current(&self) -> Arc<Config> {
        self.tx.borrow().clone()
    }

    /// Notified on every applied change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.tx.subscribe()
    }

    /// Values above this are compressed (backends without a native codec).
    pub(crate) fn compression_threshold(&self) -> usize {
        self.compression_threshold.load(Relaxed)
    }

    /// Applies the live part of `new`; returns true when something changed.
    pub(crate) fn apply(&self, new: Config) -> bool {
        if let Err(e) = new.validate() {
            tracing::warn!(error = %e, "config update ignored; keeping the last good config");
            return false;
        }
        let cur = self.current();
        let mut next = (*cur).clone();
        next.producer.batch_size = new.producer.batch_size;
        next.producer.linger_ms = new.producer.linger_ms;
        next.producer.compression_threshold = new.producer.compression_threshold;
        next.consumer.auto_commit_interval_ms = new.consumer.auto_commit_interval_ms;
        next.consumer.session_timeout_ms = new.consumer.session_timeout_ms;
        next.consumer.auto_offset_reset = new.consumer.auto_offset_reset;
        if next != new {
            // Connection-level settings cannot move under a running client.
            tracing::warn!(
                "config update changes settings that need a new client (url, brokers, security, acks, limits, backend keys); those are ignored"
            );
        }
        if next == *cur {
            return false;
        }
        tracing::info!(
            batch_size = next.producer.batch_size,
            linger_ms = next.producer.linger_ms,
            compression_threshold = next.producer.compression_threshold,
            commit_interval_ms = next.consumer.auto_commit_interval_ms,
            session_timeout_ms = next.consumer.session_timeout_ms,
            auto_offset_reset = ?next.consumer.auto_offset_reset,
            "config updated"
        );
        // The atomic first: whoever sees the new config must already compress by it.
        self.compression_threshold
            .store(next.producer.compression_threshold, Relaxed);
        self.tx.send_replace(Arc::new(next));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_live_fields_change_and_bad_updates_are_ignored() {
        let live = Live::new(&Config::with_url("memory://x"));
        let mut new = Config::with_url("memory://other");
        new.producer.compression_threshold = 7;
        new.consumer.auto_commit_interval_ms = 5;
        assert!(live.apply(new.clone()));
        let cur = live.current();
        assert_eq!(cur.url.as_deref(), Some("memory://x"));
        assert_eq!(cur.producer.compression_threshold, 7);
        assert_eq!(live.compression_threshold(), 7);
        assert_eq!(cur.consumer.auto_commit_interval_ms, 5);
        assert!(!live.apply(new.clone()), "no change the second time");
        let mut bad = new;
        bad.default_partitions = 0;
        bad.producer.compression_threshold = 9;
        assert!(!live.apply(bad));
        assert_eq!(live.compression_threshold(), 7);
    }
}
