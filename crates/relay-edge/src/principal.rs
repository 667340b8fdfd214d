//! Who is calling: the API key from the request, resolved through a local cache so a repeat caller costs a
//! hash and a map probe, not a network round trip. The cache is keyed by SHA-256 of the key, so the secret
//! itself is never kept.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use relay_core::contracts::Authenticator;
use relay_core::pb::auth::v1::{AuthenticateRequest, Principal};
use relay_core::{ErrorCode, RelayError};
use sha2::{Digest, Sha256};

use crate::cache::TtlCache;

pub struct PrincipalCache(TtlCache<[u8; 32], Arc<Principal>>);

/// The presented key: `Authorization: Bearer <key>`, else `x-api-key` (Anthropic clients), else empty.
pub fn presented_key(headers: &HeaderMap) -> &str {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return v[7..].trim();
        }
        return "";
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map_or("", str::trim)
}

impl PrincipalCache {
    pub fn new(capacity: usize) -> Self {
        Self(TtlCache::new(capacity))
    }

    /// Drops cached principals of a key, team or org (`key:<id>`, `team:<id>`, `org:<id>`).
    pub fn invalidate(&self, target: &str) {
        let Some((kind, id)) = target.split_once(':') else { return };
        self.0.retain(|p| match kind {
            "key" => p.key_id != id,
            "team" => p.team_id != id,
            "org" => p.org_id != id,
            _ => true,
        });
    }

    /// The caller, and a check of its address against the key's allowlist (cached or not).
    pub async fn authenticate(
        &self,
        auth: &dyn Authenticator,
        headers: &HeaderMap,
        client_ip: &str,
    ) -> Result<Arc<Principal>, RelayError> {
        let p = self.lookup(auth, headers, client_ip).await?;
        if !relay_core::ip_allowed(&p.ip_allowlist, client_ip) {
            return Err(RelayError::new(
                ErrorCode::PermissionDenied,
                "This API key may not be used from this address.",
            ));
        }
        Ok(p)
    }

    async fn lookup(
        &self,
        auth: &dyn Authenticator,
        headers: &HeaderMap,
        client_ip: &str,
    ) -> Result<Arc<Principal>, RelayError> {
        let key = presented_key(headers);
        if key.is_empty() {
            return Err(RelayError::new(
                ErrorCode::Unauthenticated,
                "Missing API key. Send it as `Authorization: Bearer <key>`.",
            ));
        }
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(p) = self.0.get(&digest) {
            metrics::counter!("relay_edge_auth_cache_total", "result" => "hit").increment(1);
            return Ok(p);
        }
        metrics::counter!("relay_edge_auth_cache_total", "result" => "miss").increment(1);
        let resp = auth
            .authenticate(AuthenticateRequest { api_key: key.to_owned(), client_ip: client_ip.to_owned() })
            .await?;
        let principal =
            Arc::new(resp.principal.ok_or_else(|| RelayError::internal("auth returned no principal"))?);
        self.0.insert(digest, principal.clone(), Duration::from_secs(u64::from(resp.cache_ttl_secs)));
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        assert_eq!(presented_key(&h(&[("authorization", "Bearer sk-1")])), "sk-1");
        assert_eq!(presented_key(&h(&[("authorization", "bearer  sk-2 ")])), "sk-2");
        assert_eq!(presented_key(&h(&[("x-api-key", "sk-3")])), "sk-3");
        assert_eq!(presented_key(&h(&[("authorization", "Basic abc")])), "");
        assert_eq!(presented_key(&h(&[])), "");
    }
}
