//! Server settings: the `[server]` table of the Courier config file (TOML or JSON).
//! Tokens appear only as SHA-256 hashes, never in clear.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Produce and consume on granted topics.
    Service,
    /// Everything, including topic and group management.
    Admin,
}

/// One bearer token from the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (appears in the audit log; not a secret).
    pub name: String,
    /// Hex SHA-256 of the token (`printf %s TOKEN | sha256sum`).
    pub sha256: String,
    /// The role.
    pub role: Role,
    /// Topic patterns a `service` token may use: exact names, or `*` wildcards
    /// (`user.*`, `*`). Ignored for `admin`.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Request rate for this token (overrides `rateLimit.perSecond`).
    pub rate_per_second: Option<u32>,
}

/// Per-token request rate (token bucket).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RateLimitConfig {
    /// Sustained requests per second per token; 0 disables limiting.
    pub per_second: u32,
    /// Bucket size (bursts above the sustained rate).
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_second: 10_000,
            burst: 20_000,
        }
    }
}

/// TLS certificate and key (PEM). When set, the server speaks only HTTPS.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

/// Everything `courier serve` reads from the `[server]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address (`--listen` overrides it).
    pub listen: Option<String>,
    /// Tokens (hashed).
    pub tokens: Vec<TokenConfig>,
    /// Client addresses allowed to connect (CIDR); empty = everyone.
    pub allow_ips: Vec<IpNet>,
    /// Per-token rate limit.
    pub rate_limit: RateLimitConfig,
    /// Largest accepted request body (bytes).
    pub max_body_bytes: usize,
    /// Most messages in one batch request.
    pub max_batch: usize,
    /// Most partitions a topic may be created with or grown to through the API.
    pub max_partitions: u32,
    /// HTTPS.
    pub tls: Option<TlsConfig>,
    /// Where the generated admin token's hash is kept (default: in the data directory
    /// for `file://`, else next to the config file, else the working directory).
    pub admin_token_file: Option<PathBuf>,
    /// Audit log file (JSON lines); always also logged under the `courier::audit` target.
    pub audit_log: Option<PathBuf>,
    /// Default time a fetched, uncommitted record stays invisible before it is
    /// delivered again (ms).
    pub visibility_timeout_ms: u64,
    /// The longest a fetch waits for records (ms); longer requested waits are cut.
    pub max_poll_ms: u64,
    /// An HTTP consumer that has not fetched for this long leaves its group (ms).
    pub member_timeout_ms: u64,
    /// The fastest a `POST /dead-letters/retry` re-publishes letters (per second);
    /// requested rates above it, and "no limit", are cut to it.
    pub max_redrive_per_second: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: None,
            tokens: Vec::new(),
            allow_ips: Vec::new(),
            rate_limit: RateLimitConfig::default(),
            max_body_bytes: 16 * 1024 * 1024,
            max_batch: 10_000,
            max_partitions: 1024,
            tls: None,
            admin_token_file: None,
            audit_log: None,
            visibility_timeout_ms: 30_000,
            max_poll_ms: 30_000,
            member_timeout_ms: 60_000,
            max_redrive_per_second: 1_000,
        }
    }
}

#[derive(Deserialize, Default)]
struct FileShape {
    #[serde(default)]
    server: Option<ServerConfig>,
}

impl ServerConfig {
    /// Reads the `[server]` table (or `"server"` object for `.json`) of `path`; the
    /// rest of the file is Courier's client configuration and is ignored here.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let shape: FileShape = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text)?
        } else {
            toml::from_str(&text)?
        };
        let config = shape.server.unwrap_or_default();
        config.validate()?;
        Ok(config)
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        for t in &self.tokens {
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                anyhow::bail!("token {:?}: sha256 must be 64 hex digits", t.name);
            }
        }
        if self.max_body_bytes < 1024 {
            anyhow::bail!("maxBodyBytes must be at least 1024");
        }
        if self.max_redrive_per_second == 0 {
            anyhow::bail!("maxRedrivePerSecond must be at least 1");
        }
        if self.max_batch == 0 {
            anyhow::bail!("maxBatch must be at least 1");
        }
        Ok(())
    }
}
