//! How the suite reaches a backend.

use std::time::Duration;

use async_trait::async_trait;
use courier::{Client, Config, Result};

/// A name no other test uses: `prefix-<ulid>` in lower case.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// A backend under test. Every call to [`Harness::client`] must reach the same stored
/// data (the restart tests reconnect).
#[async_trait]
pub trait Harness: Send + Sync {
    /// Backend name for messages.
    fn name(&self) -> &str;
    /// A new client on the backend.
    async fn client(&self) -> Result<Client>;
    /// `Some(reason)` when `test` cannot pass on this backend by design.
    fn unsupported(&self, _test: &str) -> Option<&'static str> {
        None
    }
    /// How long the suite waits for a consumer to receive what it expects.
    fn patience(&self) -> Duration {
        Duration::from_secs(20)
    }
}

/// A harness that connects to a URL with a base configuration.
pub struct UrlHarness {
    name: String,
    config: Config,
    _dir: Option<tempfile::TempDir>,
    unsupported: Vec<(&'static str, &'static str)>,
    patience: Duration,
}

impl UrlHarness {
    /// Connects to `url` with `config` (its `url` is overwritten).
    pub fn new(name: &str, url: impl Into<String>, mut config: Config) -> Self {
        config.url = Some(url.into());
        Self {
            name: name.to_string(),
            config,
            _dir: None,
            unsupported: Vec::new(),
            patience: Duration::from_secs(20),
        }
    }

    /// A private `memory://` store for one test.
    pub fn memory() -> Self {
        Self::new(
            "memory",
            format!("memory://{}", unique("conf")),
            fast_config(),
        )
    }

    /// A `file://` store in a fresh temporary directory, removed afterwards.
    pub fn file() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("file://{}", dir.path().display());
        let mut h = Self::new("file", url, fast_config());
        h._dir = Some(dir);
        h
    }

    /// Marks `test` as unsupported on this backend for `reason`.
    pub fn skip(mut self, test: &'static str, reason: &'static str) -> Self {
        self.unsupported.push((test, reason));
        self
    }

    /// Sets how long consumers are waited for.
    pub fn patience(mut self, d: Duration) -> Self {
        self.patience = d;
        self
    }
}

/// Development defaults with quick commits, so tests need not wait for timers.
pub fn fast_config() -> Config {
    let mut c = Config::default();
    c.consumer.auto_commit_interval_ms = 100;
    c
}

#[async_trait]
impl Harness for UrlHarness {
    fn name(&self) -> &str {
        &self.name
    }

    async fn client(&self) -> Result<Client> {
        Client::connect_with(self.config.clone()).await
    }

    fn unsupported(&self, test: &str) -> Option<&'static str> {
        self.unsupported
            .iter()
            .find(|(t, _)| *t == test)
            .map(|(_, r)| *r)
    }

    fn patience(&self) -> Duration {
        self.patience
    }
}
