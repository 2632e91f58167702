//! Bearer tokens with roles and topic grants (SPEC S2). Tokens are kept only as
//! SHA-256 hashes; a presented token is hashed and looked up, so the clear token is
//! never stored or logged.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::{RateLimitConfig, Role, ServerConfig};
use crate::envelope::ApiError;
use crate::state::AppState;

/// An authenticated caller.
pub struct Principal {
    /// Token name (audit log).
    pub name: String,
    /// Role.
    pub role: Role,
    topics: Vec<String>,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish()
    }
}

impl Principal {
    fn new(
        name: String,
        role: Role,
        topics: Vec<String>,
        rate: &RateLimitConfig,
        own: Option<u32>,
    ) -> Self {
        let per_second = own.unwrap_or(rate.per_second);
        let limiter = NonZeroU32::new(per_second).map(|ps| {
            // A token's own rate comes with one second's worth of burst.
            let burst = match own {
                Some(_) => ps,
                None => NonZeroU32::new(rate.burst.max(per_second)).unwrap_or(ps),
            };
            RateLimiter::direct(Quota::per_second(ps).allow_burst(burst))
        });
        Self {
            name,
            role,
            topics,
            limiter,
        }
    }

    /// True for admin tokens.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// True when this caller may produce to / consume from `topic`.
    pub fn may_use(&self, topic: &str) -> bool {
        self.is_admin() || self.topics.iter().any(|p| pattern_matches(p, topic))
    }

    /// 403 unless the caller may use `topic`.
    pub fn check_topic(&self, topic: &str) -> Result<(), ApiError> {
        if self.may_use(topic) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "token {:?} is not granted topic {topic:?}",
                self.name
            )))
        }
    }

    /// Takes one request from the token's bucket; 429 with the wait when empty.
    fn take(&self) -> Result<(), ApiError> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        l.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::too_many(
                "rate limit exceeded for this token",
                wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            )
        })
    }
}

/// Glob match with `*` (any run of characters, dots included).
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Known tokens by hash.
pub struct TokenStore {
    by_hash: HashMap<[u8; 32], Arc<Principal>>,
}

impl TokenStore {
    /// The principal holding `token`, if any.
    pub fn lookup(&self, token: &str) -> Option<Arc<Principal>> {
        self.by_hash.get(&hash_token(token)).cloned()
    }
}

/// How the admin token came to be, for the start-up banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminToken {
    /// `COURIER_ADMIN_TOKEN` is set (not printed).
    FromEnv,
    /// Generated now; printed once, only its hash is stored in the file.
    Generated {
        /// The clear token (shown once).
        token: String,
        /// Where its hash is kept.
        file: std::path::PathBuf,
    },
    /// Generated on an earlier start; its hash is in this file.
    Stored(std::path::PathBuf),
}

/// Builds the token store from the config, `COURIER_ADMIN_TOKEN`, and the stored
/// (or newly generated) admin token hash in `admin_file`.
pub fn build_tokens(
    config: &ServerConfig,
    env_admin: Option<&str>,
    admin_file: &Path,
) -> anyhow::Result<(TokenStore, AdminToken)> {
    let mut by_hash = HashMap::new();
    for t in &config.tokens {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&t.sha256, &mut hash)
            .map_err(|e| anyhow::anyhow!("token {:?}: {e}", t.name))?;
        let p = Principal::new(
            t.name.clone(),
            t.role,
            t.topics.clone(),
            &config.rate_limit,
            t.rate_per_second,
        );
        by_hash.insert(hash, Arc::new(p));
    }
    let admin = |name: &str| {
        Arc::new(Principal::new(
            name.into(),
            Role::Admin,
            Vec::new(),
            &config.rate_limit,
            None,
        ))
    };
    let origin = match env_admin.filter(|t| !t.is_empty()) {
        Some(token) => {
            by_hash.insert(hash_token(token), admin("env-admin"));
            AdminToken::FromEnv
        }
        None => match std::fs::read_to_string(admin_file) {
            Ok(text) => {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut hash).map_err(|e| {
                    anyhow::anyhow!("{}: not a sha256 hex digest: {e}", admin_file.display())
                })?;
                by_hash.insert(hash, admin("generated-admin"));
                AdminToken::Stored(admin_file.to_path_buf())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = generate_token();
                let hash = hash_token(&token);
                write_private(admin_file, &hex::encode(hash))?;
                by_hash.insert(hash, admin("generated-admin"));
                AdminToken::Generated {
                    token,
                    file: admin_file.to_path_buf(),
                }
            }
            Err(e) => anyhow::bail!("cannot read {}: {e}", admin_file.display()),
        },
    };
    Ok((TokenStore { by_hash }, origin))
}

/// A fresh random token: 32 bytes from the OS generator, base64url.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "cour_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let mut f = opts
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    f.write_all(format!("{text}\n").as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Middleware: authenticates the bearer token, applies its rate limit, and puts the
/// [`Principal`] into the request extensions.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let principal = match token {
        None => {
            return ApiError::unauthorized("missing bearer token (Authorization: Bearer …)")
                .into_response()
        }
        Some(t) => match state.tokens.lookup(t) {
            Some(p) => p,
            None => return ApiError::unauthorized("invalid token").into_response(),
        },
    };
    if let Err(e) = principal.take() {
        return e.into_response();
    }
    req.extensions_mut().insert(principal.clone());
    let mut resp = next.run(req).await;
    // Read back by the audit layer, which sits outside this one.
    resp.extensions_mut().insert(principal);
    resp
}

/// Middleware for admin-only routes (inside [`require_token`]): 403 for other roles.
pub async fn require_admin(req: Request, next: Next) -> Response {
    let allowed = req
        .extensions()
        .get::<Arc<Principal>>()
        .is_some_and(|p| p.is_admin());
    if !allowed {
        return ApiError::forbidden("this operation needs an admin token").into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "a.b"));
        assert!(pattern_matches("user.*", "user.events"));
        assert!(!pattern_matches("user.*", "users.events"));
        assert!(pattern_matches("*.dlq", "user.events.dlq"));
        assert!(pattern_matches("a*b*c", "axxbyyc"));
        assert!(!pattern_matches("a*b*c", "axxc"));
        assert!(!pattern_matches("ab*ba", "aba"));
        assert!(pattern_matches("exact", "exact"));
        assert!(!pattern_matches("exact", "exact2"));
    }
}
