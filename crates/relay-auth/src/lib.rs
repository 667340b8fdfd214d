//! relay-auth: who is calling.
//!
//! Verifies API keys against HMAC-SHA256(pepper, secret) hashes (the secret itself is never stored or
//! logged) and returns the caller's [`Principal`]: its org/team, allowed models, limits and budget.
//! Keys come from config for now; the key store, admin API, rate limits and budgets build on this crate.
//! What does not belong here: HTTP handling (the edge), or anything about upstreams.

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use relay_core::contracts::{Authenticator, Result};
use relay_core::pb::auth::v1::{AuthenticateRequest, AuthenticateResponse, Principal};
use relay_core::{ErrorCode, RelayError, Secret};
use serde::Deserialize;
use sha2::Sha256;

const HASH_PREFIX: &str = "hmac-sha256:";

/// `[auth]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Server-side secret mixed into every key hash. Set it from the environment in production
    /// (`RELAY__AUTH__PEPPER`); changing it invalidates every key.
    pub pepper: Secret,
    /// How long an edge may cache a successful authentication.
    pub cache_ttl_secs: u32,
    pub keys: Vec<KeyConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { pepper: Secret::default(), cache_ttl_secs: 30, keys: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Public id, safe to log.
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// `hmac-sha256:<hex>`; produce it with `relay hash-key`.
    pub hash: String,
    #[serde(default = "default_scope")]
    pub team: String,
    #[serde(default = "default_scope")]
    pub org: String,
    /// Exact names or globs; empty = every model.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Unix seconds; absent = never.
    #[serde(default)]
    pub expires_at: Option<i64>,
}

fn default_scope() -> String {
    "default".into()
}

fn yes() -> bool {
    true
}

impl AuthConfig {
    pub fn validate(&self, errors: &mut Vec<String>) {
        if self.pepper.expose().len() < 16 {
            errors.push("auth.pepper: must be at least 16 characters (set RELAY__AUTH__PEPPER)".into());
        }
        let mut ids = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            if k.id.is_empty() || !ids.insert(&k.id) {
                errors.push(format!("auth.keys[{i}].id: must be non-empty and unique"));
            }
            if parse_hash(&k.hash).is_none() {
                errors.push(format!("auth.keys[{i}].hash: expected `{HASH_PREFIX}<64 hex digits>`"));
            }
        }
    }
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(s.strip_prefix(HASH_PREFIX)?).ok()?;
    bytes.try_into().ok()
}

/// `hmac-sha256:<hex>` of `secret` under `pepper`: what the config stores for a key.
pub fn hash_key(pepper: &Secret, secret: &str) -> String {
    format!("{HASH_PREFIX}{}", hex::encode(digest(pepper, secret)))
}

fn digest(pepper: &Secret, secret: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(pepper.expose().as_bytes())
        .unwrap_or_else(|_| unreachable_hmac());
    mac.update(secret.as_bytes());
    mac.finalize().into_bytes().into()
}

// HMAC accepts keys of any length; this cannot happen.
fn unreachable_hmac() -> Hmac<Sha256> {
    panic!("HMAC-SHA256 rejected a key")
}

struct KeyEntry {
    principal: Principal,
    enabled: bool,
}

/// The local auth service.
pub struct AuthService {
    pepper: Secret,
    cache_ttl_secs: u32,
    /// Indexed by the HMAC digest: looking up a digest reveals nothing about other keys' secrets.
    keys: HashMap<[u8; 32], KeyEntry>,
}

impl AuthService {
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Self> {
        let mut keys = HashMap::new();
        for k in &cfg.keys {
            let hash =
                parse_hash(&k.hash).ok_or_else(|| anyhow::anyhow!("key `{}` has an invalid hash", k.id))?;
            let principal = Principal {
                key_id: k.id.clone(),
                key_name: k.name.clone(),
                team_id: k.team.clone(),
                org_id: k.org.clone(),
                allowed_models: k.allowed_models.clone(),
                expires_at: k.expires_at.unwrap_or(0),
                ..Default::default()
            };
            keys.insert(hash, KeyEntry { principal, enabled: k.enabled });
        }
        Ok(Self { pepper: cfg.pepper.clone(), cache_ttl_secs: cfg.cache_ttl_secs, keys })
    }
}

fn invalid_key() -> RelayError {
    RelayError::new(
        ErrorCode::Unauthenticated,
        "Invalid API key. Check the key you are sending in the Authorization header.",
    )
}

#[async_trait::async_trait]
impl Authenticator for AuthService {
    async fn authenticate(&self, req: AuthenticateRequest) -> Result<AuthenticateResponse> {
        if req.api_key.is_empty() {
            return Err(RelayError::new(
                ErrorCode::Unauthenticated,
                "Missing API key. Send it as `Authorization: Bearer <key>`.",
            ));
        }
        let entry = self.keys.get(&digest(&self.pepper, &req.api_key)).ok_or_else(invalid_key)?;
        if !entry.enabled {
            return Err(RelayError::new(ErrorCode::Unauthenticated, "This API key has been disabled."));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let p = &entry.principal;
        if p.expires_at != 0 && p.expires_at <= now {
            return Err(RelayError::new(ErrorCode::Unauthenticated, "This API key has expired."));
        }
        // Never cache past expiry.
        let ttl = if p.expires_at == 0 {
            self.cache_ttl_secs
        } else {
            self.cache_ttl_secs.min(u32::try_from(p.expires_at - now).unwrap_or(u32::MAX))
        };
        Ok(AuthenticateResponse { principal: Some(p.clone()), cache_ttl_secs: ttl })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(keys: Vec<KeyConfig>) -> AuthConfig {
        AuthConfig { pepper: Secret::new("pepper-pepper-pepper"), cache_ttl_secs: 30, keys }
    }

    fn key(id: &str, secret: &str) -> KeyConfig {
        KeyConfig {
            id: id.into(),
            name: String::new(),
            hash: hash_key(&Secret::new("pepper-pepper-pepper"), secret),
            team: "t".into(),
            org: "o".into(),
            allowed_models: vec![],
            enabled: true,
            expires_at: None,
        }
    }

    async fn auth(svc: &AuthService, k: &str) -> Result<AuthenticateResponse> {
        svc.authenticate(AuthenticateRequest { api_key: k.into(), client_ip: String::new() }).await
    }

    #[tokio::test]
    async fn valid_keys_resolve_to_their_principal() {
        let svc = AuthService::new(&cfg(vec![key("k1", "sk-one"), key("k2", "sk-two")])).unwrap();
        let p = auth(&svc, "sk-two").await.unwrap().principal.unwrap();
        assert_eq!((p.key_id.as_str(), p.team_id.as_str(), p.org_id.as_str()), ("k2", "t", "o"));
    }

    #[tokio::test]
    async fn bad_missing_disabled_and_expired_keys_are_401_without_echo() {
        let mut disabled = key("k3", "sk-off");
        disabled.enabled = false;
        let mut expired = key("k4", "sk-old");
        expired.expires_at = Some(1);
        let svc = AuthService::new(&cfg(vec![key("k1", "sk-one"), disabled, expired])).unwrap();
        for k in ["sk-nope", "", "sk-off", "sk-old"] {
            let e = auth(&svc, k).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthenticated, "{k}");
            assert!(k.is_empty() || !e.message.contains(k), "secret echoed: {}", e.message);
        }
    }

    #[test]
    fn hashes_depend_on_pepper_and_never_contain_the_secret() {
        let a = hash_key(&Secret::new("pepper-aaaaaaaaaaaa"), "sk-secret");
        let b = hash_key(&Secret::new("pepper-bbbbbbbbbbbb"), "sk-secret");
        assert_ne!(a, b);
        assert!(!a.contains("sk-secret"));
        assert!(parse_hash(&a).is_some());
        let mut errs = vec![];
        AuthConfig {
            pepper: Secret::new("short"),
            keys: vec![KeyConfig { hash: "x".into(), ..key("", "s") }],
            ..cfg(vec![])
        }
        .validate(&mut errs);
        assert_eq!(errs.len(), 3, "{errs:?}");
    }
}
