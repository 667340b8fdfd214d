//! Who is calling: the API key from the request, resolved through a local cache so a repeat caller costs a
//! hash and a map probe, not a network round trip. The cache is keyed by SHA-256 of the key, so the secret
//! itself is never kept.
//!
//! Under attack: refused keys are remembered for a while (a client hammering with a bad key costs auth
//! nothing), concurrent lookups of one key share a single call to auth, and an address that keeps failing
//! is refused without a lookup (keys already cached still work from it, so one bad client behind a shared
//! NAT does not lock out the others). An invalidation that lands while a lookup is in flight wins: that
//! lookup's answer is not cached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use relay_core::contracts::Authenticator;
use relay_core::pb::auth::v1::{AuthenticateRequest, Principal};
use relay_core::{ErrorCode, RelayError};
use sha2::{Digest, Sha256};

use crate::cache::TtlCache;

/// How long a refused key is answered from memory.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Most client addresses whose failures are counted at once (older windows are dropped first).
const MAX_TRACKED_ADDRESSES: usize = 100_000;

type Lookup = Shared<BoxFuture<'static, Result<(Arc<Principal>, Duration), RelayError>>>;

pub struct PrincipalCache {
    known: TtlCache<[u8; 32], Arc<Principal>>,
    refused: TtlCache<[u8; 32], RelayError>,
    in_flight: Mutex<HashMap<[u8; 32], Lookup>>,
    /// Bumped by every invalidation: a lookup that began before it does not cache its answer.
    generation: AtomicU64,
    failures: Mutex<Failures>,
    failures_per_minute: u32,
}

/// Failed authentications per client address in the current minute.
#[derive(Default)]
struct Failures {
    minute: i64,
    counts: HashMap<String, u32>,
}

/// The presented key: `Authorization: Bearer <key>`, else `x-api-key` (Anthropic clients), else
/// `x-goog-api-key` (Gemini clients), else empty.
pub fn presented_key(headers: &HeaderMap) -> &str {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return v[7..].trim();
        }
        return "";
    }
    headers
        .get("x-api-key")
        .or_else(|| headers.get("x-goog-api-key"))
        .and_then(|v| v.to_str().ok())
        .map_or("", str::trim)
}

impl PrincipalCache {
    pub fn new(capacity: usize) -> Self {
        Self::with_failure_limit(capacity, 0)
    }

    /// As [`Self::new`]; past `failures_per_minute` failed lookups (0 = no limit) an address gets 429s.
    pub fn with_failure_limit(capacity: usize, failures_per_minute: u32) -> Self {
        Self {
            known: TtlCache::new(capacity),
            refused: TtlCache::new(capacity.clamp(1, 100_000)),
            in_flight: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            failures: Mutex::new(Failures::default()),
            failures_per_minute,
        }
    }

    /// Drops cached principals of a key, team or org (`key:<id>`, `team:<id>`, `org:<id>`), and every
    /// remembered refusal (a re-enabled key works at once).
    pub fn invalidate(&self, target: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.refused.clear();
        let Some((kind, id)) = target.split_once(':') else { return };
        self.known.retain(|p| match kind {
            "key" => p.key_id != id,
            "team" => p.team_id != id,
            "org" => p.org_id != id,
            _ => true,
        });
    }

    /// The caller, and a check of its address against the key's allowlist (cached or not).
    pub async fn authenticate(
        &self,
        auth: &Arc<dyn Authenticator>,
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
        auth: &Arc<dyn Authenticator>,
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
        if let Some(p) = self.known.get(&digest) {
            metrics::counter!("relay_edge_auth_cache_total", "result" => "hit").increment(1);
            return Ok(p);
        }
        if let Some(e) = self.refused.get(&digest) {
            metrics::counter!("relay_edge_auth_cache_total", "result" => "refused").increment(1);
            self.failed(client_ip);
            return Err(e);
        }
        // A throttled address may still refresh a key it used successfully before (its entry expired):
        // one client failing behind a shared NAT does not lock out the others' known keys.
        if !self.known.remembers(&digest) {
            self.check_failures(client_ip)?;
        }
        metrics::counter!("relay_edge_auth_cache_total", "result" => "miss").increment(1);
        let generation = self.generation.load(Ordering::SeqCst);
        let lookup = self.join_or_start(auth, digest, key);
        // Whoever finishes (or gives up) first clears the entry; later joiners hold their own clone.
        let _clear = ClearOnDrop(&self.in_flight, digest);
        let result = lookup.await;
        let unchanged = self.generation.load(Ordering::SeqCst) == generation;
        match result {
            Ok((principal, ttl)) => {
                if unchanged {
                    self.known.insert(digest, principal.clone(), ttl);
                }
                Ok(principal)
            }
            Err(e) => {
                // Only a definite "no" is remembered; an outage is not a verdict on the key.
                if e.code == ErrorCode::Unauthenticated && unchanged {
                    self.refused.insert(digest, e.clone(), NEGATIVE_TTL);
                }
                if e.code == ErrorCode::Unauthenticated {
                    self.failed(client_ip);
                }
                Err(e)
            }
        }
    }

    /// The lookup of `digest` already under way, or a new one that later callers will join.
    /// The address allowlist is checked here for every request, cached or not, so the lookup carries no
    /// address: callers from different addresses can share it.
    fn join_or_start(&self, auth: &Arc<dyn Authenticator>, digest: [u8; 32], key: &str) -> Lookup {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = in_flight.get(&digest) {
            metrics::counter!("relay_edge_auth_cache_total", "result" => "joined").increment(1);
            return l.clone();
        }
        let (auth, req) =
            (auth.clone(), AuthenticateRequest { api_key: key.to_owned(), client_ip: String::new() });
        let lookup = async move {
            let resp = auth.authenticate(req).await?;
            let ttl = Duration::from_secs(u64::from(resp.cache_ttl_secs));
            let principal =
                resp.principal.ok_or_else(|| RelayError::internal("auth returned no principal"))?;
            Ok((Arc::new(principal), ttl))
        }
        .boxed()
        .shared();
        in_flight.insert(digest, lookup.clone());
        lookup
    }

    /// Refuses an address that failed too often this minute (before any lookup).
    fn check_failures(&self, client_ip: &str) -> Result<(), RelayError> {
        if self.failures_per_minute == 0 {
            return Ok(());
        }
        let now = relay_core::ids::now_ms();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.roll(now);
        if f.counts.get(client_ip).is_some_and(|n| *n >= self.failures_per_minute) {
            metrics::counter!("relay_edge_auth_throttled_total").increment(1);
            let reset = u32::try_from(60 - now.rem_euclid(60_000) / 1000).unwrap_or(60).max(1);
            return Err(RelayError::new(
                ErrorCode::RateLimited,
                "Too many failed authentication attempts from this address; try again later.",
            )
            .with_retry_after(Some(reset)));
        }
        Ok(())
    }

    fn failed(&self, client_ip: &str) {
        if self.failures_per_minute == 0 {
            return;
        }
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.roll(relay_core::ids::now_ms());
        if f.counts.len() >= MAX_TRACKED_ADDRESSES && !f.counts.contains_key(client_ip) {
            return;
        }
        *f.counts.entry(client_ip.to_owned()).or_default() += 1;
    }
}

struct ClearOnDrop<'a>(&'a Mutex<HashMap<[u8; 32], Lookup>>, [u8; 32]);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

impl Failures {
    fn roll(&mut self, now_ms: i64) {
        let minute = now_ms.div_euclid(60_000);
        if minute != self.minute {
            self.minute = minute;
            self.counts.clear();
        }
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

    /// Knows `sk-good`; takes `delay` per lookup; counts calls.
    struct Slow {
        calls: std::sync::atomic::AtomicUsize,
        delay: Duration,
    }

    #[async_trait::async_trait]
    impl Authenticator for Slow {
        async fn authenticate(
            &self,
            req: AuthenticateRequest,
        ) -> relay_core::contracts::Result<relay_core::pb::auth::v1::AuthenticateResponse> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if req.api_key != "sk-good" {
                return Err(RelayError::new(ErrorCode::Unauthenticated, "Invalid API key."));
            }
            let principal = Principal { key_id: "k1".into(), ..Default::default() };
            Ok(relay_core::pb::auth::v1::AuthenticateResponse {
                principal: Some(principal),
                cache_ttl_secs: 60,
            })
        }
    }

    fn slow(ms: u64) -> (Arc<Slow>, Arc<dyn Authenticator>) {
        let a = Arc::new(Slow { calls: Default::default(), delay: Duration::from_millis(ms) });
        (a.clone(), a)
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert("authorization", format!("Bearer {key}").parse().unwrap());
        m
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_key_share_a_single_call() {
        let (counter, auth) = slow(50);
        let cache = PrincipalCache::new(100);
        let h = bearer("sk-good");
        let all =
            futures_util::future::join_all((0..50).map(|_| cache.authenticate(&auth, &h, "10.0.0.1"))).await;
        assert!(all.iter().all(Result::is_ok));
        assert_eq!(counter.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refused_keys_are_remembered_until_an_invalidation() {
        let (counter, auth) = slow(0);
        let cache = PrincipalCache::new(100);
        for _ in 0..5 {
            let e = cache.authenticate(&auth, &bearer("sk-bogus"), "10.0.0.1").await.unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthenticated);
        }
        assert_eq!(counter.calls.load(Ordering::SeqCst), 1, "one lookup for five refusals");
        cache.invalidate("key:anything");
        assert!(cache.authenticate(&auth, &bearer("sk-bogus"), "10.0.0.1").await.is_err());
        assert_eq!(counter.calls.load(Ordering::SeqCst), 2, "asked again after the invalidation");
    }

    #[tokio::test]
    async fn an_address_that_keeps_failing_is_refused_without_lookups() {
        let (counter, auth) = slow(0);
        let cache = PrincipalCache::with_failure_limit(100, 3);
        cache.authenticate(&auth, &bearer("sk-good"), "10.0.0.9").await.unwrap();
        for i in 0..3 {
            let e =
                cache.authenticate(&auth, &bearer(&format!("sk-random-{i}")), "10.0.0.9").await.unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthenticated);
        }
        let before = counter.calls.load(Ordering::SeqCst);
        let e = cache.authenticate(&auth, &bearer("sk-random-x"), "10.0.0.9").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.retry_after_secs.is_some());
        assert_eq!(counter.calls.load(Ordering::SeqCst), before, "no lookup once throttled");
        assert!(
            cache.authenticate(&auth, &bearer("sk-good"), "10.0.0.9").await.is_ok(),
            "cached keys still work"
        );
        let digest: [u8; 32] = Sha256::digest(b"sk-good").into();
        let p = cache.known.get(&digest).unwrap();
        cache.known.insert(digest, p, Duration::from_nanos(1)); // its cache entry expires
        tokio::time::sleep(Duration::from_millis(2)).await;
        let refreshed = cache.authenticate(&auth, &bearer("sk-good"), "10.0.0.9").await;
        assert!(refreshed.is_ok(), "a known key refreshes from a throttled address");
        let e = cache.authenticate(&auth, &bearer("sk-new"), "10.0.0.9").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited, "a key never seen from it does not");
        let e = cache.authenticate(&auth, &bearer("sk-other"), "10.0.0.10").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthenticated, "other addresses are unaffected");
    }

    #[tokio::test]
    async fn an_invalidation_during_a_lookup_keeps_its_answer_out_of_the_cache() {
        let (counter, auth) = slow(100);
        let cache = Arc::new(PrincipalCache::new(100));
        let (c, a) = (cache.clone(), auth.clone());
        let lookup = tokio::spawn(async move { c.authenticate(&a, &bearer("sk-good"), "").await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        cache.invalidate("key:k1"); // the key is revoked while auth is still answering
        assert!(lookup.await.unwrap().is_ok(), "the answer in flight is given");
        cache.authenticate(&auth, &bearer("sk-good"), "").await.unwrap();
        assert_eq!(counter.calls.load(Ordering::SeqCst), 2, "but not cached: the next request asks again");
    }

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        assert_eq!(presented_key(&h(&[("authorization", "Bearer sk-1")])), "sk-1");
        assert_eq!(presented_key(&h(&[("authorization", "bearer  sk-2 ")])), "sk-2");
        assert_eq!(presented_key(&h(&[("x-api-key", "sk-3")])), "sk-3");
        assert_eq!(presented_key(&h(&[("x-goog-api-key", "sk-4")])), "sk-4");
        assert_eq!(presented_key(&h(&[("authorization", "Basic abc")])), "");
        assert_eq!(presented_key(&h(&[])), "");
    }
}
