//! relay-auth: who is calling.
//!
//! Verifies API keys against HMAC-SHA256(pepper, secret) hashes (the secret itself is never stored or
//! logged) and returns the caller's [`Principal`]: its place in the org → team → key hierarchy, allowed
//! models and addresses, and the limits and budget of every level. Virtual keys (`rk_<id>_<secret>`) live in
//! the database ([`store`]) and are managed through the admin API ([`admin`]); static keys may also come
//! from config. What does not belong here: enforcing limits (relay-limits, on the edge), HTTP serving of
//! client traffic, anything about upstreams.

pub mod admin;
pub mod keys;
pub mod store;

use std::collections::HashMap;

use relay_core::contracts::{Authenticator, Result};
use relay_core::pb::auth::v1::{
    AuthenticateRequest, AuthenticateResponse, Budget, BudgetPeriod, Limits, Principal, Scope, ScopeKind,
};
use relay_core::pb::common::v1::Money;
use relay_core::{ErrorCode, RelayError, Secret};
use serde::Deserialize;

const HASH_PREFIX: &str = "hmac-sha256:";

/// `[auth]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Server-side secret mixed into every key hash. Set it from the environment in production
    /// (`RELAY__AUTH__PEPPER`); changing it invalidates every key.
    pub pepper: Secret,
    /// How long an edge may cache a successful authentication (revocations also evict at once over the bus).
    pub cache_ttl_secs: u32,
    /// Bearer token for the admin API (`/admin/v1`); unset = admin API off.
    pub admin_token: Option<Secret>,
    pub keys: Vec<KeyConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { pepper: Secret::default(), cache_ttl_secs: 30, admin_token: None, keys: Vec::new() }
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
    /// Data residency: deployment region tags this key may be served in; empty = any.
    #[serde(default)]
    pub allowed_regions: Vec<String>,
    /// Routing strategy for this key's requests (weighted, priority, cost, latency, balanced,
    /// headroom); unset = the model group's.
    #[serde(default)]
    pub strategy: Option<String>,
    /// Store none of this key's content (Responses state, logged prompts and answers).
    #[serde(default)]
    pub zero_retention: bool,
    /// Cache this key's answers this many seconds (0 = the model group's setting).
    #[serde(default)]
    pub response_cache_ttl_secs: u32,
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
        if self.admin_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            errors.push("auth.admin_token: must be at least 16 characters".into());
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

/// `hmac-sha256:<hex>` of `secret` under `pepper`: what the config stores for a static key.
pub fn hash_key(pepper: &Secret, secret: &str) -> String {
    format!("{HASH_PREFIX}{}", hex::encode(keys::digest(pepper, secret)))
}

struct KeyEntry {
    principal: Principal,
    enabled: bool,
}

/// The local auth service.
pub struct AuthService {
    pepper: Secret,
    cache_ttl_secs: u32,
    /// Static keys from config, indexed by the HMAC digest: a lookup reveals nothing about other secrets.
    keys: HashMap<[u8; 32], KeyEntry>,
    /// Virtual keys.
    store: Option<store::KeyStore>,
}

impl AuthService {
    pub fn new(cfg: &AuthConfig, store: Option<store::KeyStore>) -> anyhow::Result<Self> {
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
                allowed_regions: k.allowed_regions.clone(),
                routing_strategy: k.strategy.clone().unwrap_or_default(),
                zero_retention: k.zero_retention,
                response_cache_ttl_secs: k.response_cache_ttl_secs,
                expires_at: k.expires_at.unwrap_or(0),
                ..Default::default()
            };
            keys.insert(hash, KeyEntry { principal, enabled: k.enabled });
        }
        Ok(Self { pepper: cfg.pepper.clone(), cache_ttl_secs: cfg.cache_ttl_secs, keys, store })
    }
}

fn invalid_key() -> RelayError {
    RelayError::new(
        ErrorCode::Unauthenticated,
        "Invalid API key. Check the key you are sending in the Authorization header.",
    )
}

fn unauthenticated(msg: &str) -> RelayError {
    RelayError::new(ErrorCode::Unauthenticated, msg)
}

fn period(p: &str) -> BudgetPeriod {
    match p {
        "daily" => BudgetPeriod::Daily,
        "monthly" => BudgetPeriod::Monthly,
        "prepaid" => BudgetPeriod::Prepaid,
        _ => BudgetPeriod::Total,
    }
}

fn scope(kind: ScopeKind, id: &str, p: &store::Policy) -> Scope {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Scope {
        kind: kind as i32,
        id: id.to_owned(),
        limits: Some(Limits {
            requests_per_minute: u32::try_from(p.rpm).unwrap_or(0),
            tokens_per_minute: n(p.tpm),
            max_concurrent: u32::try_from(p.max_concurrent).unwrap_or(0),
        }),
        budget: Some(Budget {
            limit: Some(Money { micros: p.budget_micros.max(0), currency: "USD".into() }),
            period: period(&p.budget_period) as i32,
        }),
    }
}

impl AuthService {
    async fn virtual_key(&self, id: &str, secret: &str) -> Result<AuthenticateResponse> {
        let store = self.store.as_ref().ok_or_else(invalid_key)?;
        let found = store.for_auth(id).await.map_err(|e| {
            tracing::error!(error = %e, "key store lookup failed");
            RelayError::new(ErrorCode::Unavailable, "authentication is temporarily unavailable")
        })?;
        // Unknown id and wrong secret get the same 401, so a caller learns nothing about which ids exist.
        let Some(k) = found.filter(|k| keys::verify(&self.pepper, secret, &k.secret_hash)) else {
            return Err(invalid_key());
        };
        if k.key.revoked_at_ms != 0 {
            return Err(unauthenticated("This API key has been revoked."));
        }
        if !(k.key.enabled && k.team.enabled && k.org.enabled) {
            return Err(unauthenticated("This API key has been disabled."));
        }
        let now = relay_core::ids::now_ms();
        if k.key.expires_at_ms != 0 && k.key.expires_at_ms <= now {
            return Err(unauthenticated("This API key has expired."));
        }
        let metadata = match &k.key.metadata {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(a, b)| (a.clone(), b.as_str().map_or_else(|| b.to_string(), str::to_owned)))
                .collect(),
            _ => HashMap::new(),
        };
        let principal = Principal {
            key_id: k.key.id.clone(),
            key_name: k.key.name.clone(),
            team_id: k.team.id.clone(),
            org_id: k.org.id.clone(),
            allowed_models: k.key.allowed_models.clone(),
            limits: scope(ScopeKind::Key, &k.key.id, &k.key.policy).limits,
            budget: scope(ScopeKind::Key, &k.key.id, &k.key.policy).budget,
            metadata,
            expires_at: k.key.expires_at_ms / 1000,
            scopes: vec![
                scope(ScopeKind::Key, &k.key.id, &k.key.policy),
                scope(ScopeKind::Team, &k.team.id, &k.team.policy),
                scope(ScopeKind::Org, &k.org.id, &k.org.policy),
            ],
            ip_allowlist: k.key.ip_allowlist.clone(),
            allowed_regions: k.key.allowed_regions.clone(),
            routing_strategy: k.key.routing_strategy.clone(),
            zero_retention: k.key.zero_retention,
            response_cache_ttl_secs: u32::try_from(k.key.response_cache_ttl_secs).unwrap_or(0),
        };
        let ttl = if k.key.expires_at_ms == 0 {
            self.cache_ttl_secs
        } else {
            self.cache_ttl_secs.min(u32::try_from((k.key.expires_at_ms - now) / 1000).unwrap_or(u32::MAX))
        };
        Ok(AuthenticateResponse { principal: Some(principal), cache_ttl_secs: ttl })
    }
}

#[async_trait::async_trait]
impl Authenticator for AuthService {
    async fn authenticate(&self, req: AuthenticateRequest) -> Result<AuthenticateResponse> {
        if req.api_key.is_empty() {
            return Err(unauthenticated("Missing API key. Send it as `Authorization: Bearer <key>`."));
        }
        let resp = match keys::parse(&req.api_key) {
            Some((id, secret)) => self.virtual_key(id, secret).await?,
            None => self.static_key(&req.api_key)?,
        };
        let principal = resp.principal.as_ref().ok_or_else(|| RelayError::internal("no principal"))?;
        if !req.client_ip.is_empty() && !relay_core::ip_allowed(&principal.ip_allowlist, &req.client_ip) {
            return Err(RelayError::new(
                ErrorCode::PermissionDenied,
                "This API key may not be used from this address.",
            ));
        }
        Ok(resp)
    }
}

impl AuthService {
    fn static_key(&self, api_key: &str) -> Result<AuthenticateResponse> {
        let entry = self.keys.get(&keys::digest(&self.pepper, api_key)).ok_or_else(invalid_key)?;
        if !entry.enabled {
            return Err(unauthenticated("This API key has been disabled."));
        }
        let now = relay_core::ids::now_ms() / 1000;
        let p = &entry.principal;
        if p.expires_at != 0 && p.expires_at <= now {
            return Err(unauthenticated("This API key has expired."));
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
        AuthConfig {
            pepper: Secret::new("pepper-pepper-pepper"),
            cache_ttl_secs: 30,
            admin_token: None,
            keys,
        }
    }

    fn key(id: &str, secret: &str) -> KeyConfig {
        KeyConfig {
            id: id.into(),
            name: String::new(),
            hash: hash_key(&Secret::new("pepper-pepper-pepper"), secret),
            team: "t".into(),
            org: "o".into(),
            allowed_models: vec![],
            allowed_regions: vec![],
            strategy: None,
            zero_retention: false,
            response_cache_ttl_secs: 0,
            enabled: true,
            expires_at: None,
        }
    }

    async fn auth(svc: &AuthService, k: &str) -> Result<AuthenticateResponse> {
        svc.authenticate(AuthenticateRequest { api_key: k.into(), client_ip: String::new() }).await
    }

    #[tokio::test]
    async fn valid_keys_resolve_to_their_principal() {
        let svc = AuthService::new(&cfg(vec![key("k1", "sk-one"), key("k2", "sk-two")]), None).unwrap();
        let p = auth(&svc, "sk-two").await.unwrap().principal.unwrap();
        assert_eq!((p.key_id.as_str(), p.team_id.as_str(), p.org_id.as_str()), ("k2", "t", "o"));
    }

    #[tokio::test]
    async fn bad_missing_disabled_and_expired_keys_are_401_without_echo() {
        let mut disabled = key("k3", "sk-off");
        disabled.enabled = false;
        let mut expired = key("k4", "sk-old");
        expired.expires_at = Some(1);
        let svc = AuthService::new(&cfg(vec![key("k1", "sk-one"), disabled, expired]), None).unwrap();
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
