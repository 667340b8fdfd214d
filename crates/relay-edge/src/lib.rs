//! relay-edge: the HTTP API clients talk to (OpenAI-shaped today; Anthropic and Responses build on it).
//!
//! Authenticates from a local cache, routes from a local cache, calls the adapter and forwards its bytes
//! as they arrive, fails over before the first byte, and emits one usage event per authenticated request.
//! Every failure is answered in the client protocol's error shape. What does not belong here: protocol
//! conversion (adapter), key storage (auth), route selection (routing), recording usage (billing).

pub mod admin;
mod answer;
mod cache;
mod chat;
mod dispatch;
mod error;
mod failover;
pub mod principal;
mod request;
mod routes;
mod usage;

use std::sync::Arc;

use relay_core::contracts::Services;
use serde::Deserialize;
use tokio_util::task::TaskTracker;

pub use principal::PrincipalCache;
pub use routes::router;

/// `[edge]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Largest request body accepted; larger ones get 413 and are never forwarded.
    pub max_body_bytes: usize,
    /// Most authenticated keys kept in the local cache.
    pub auth_cache_entries: usize,
    /// Take the client address from the first `X-Forwarded-For` entry (only behind a proxy you run).
    pub trust_forwarded_for: bool,
    /// Longest time an abandoned answer is read on (disconnect policy `drain`) to bill the provider's own
    /// usage; past it the upstream is cancelled and what it produced is billed.
    pub drain_max_secs: u64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            auth_cache_entries: 100_000,
            trust_forwarded_for: false,
            drain_max_secs: 300,
        }
    }
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct Edge {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: EdgeConfig,
    services: Services,
    principals: principal::PrincipalCache,
    routes: cache::TtlCache<String, Arc<relay_core::pb::routing::v1::RouteResponse>>,
    /// Answers in flight (drains included) and usage hand-offs; shutdown waits for them.
    background: TaskTracker,
    /// Cancelled at shutdown: drains stop reading and book what they have.
    stopping: tokio_util::sync::CancellationToken,
    /// Per-request deployment order and each deployment's breaker, from the outcomes seen here and the
    /// breaker changes other replicas announce.
    selector: relay_select::Selector,
    /// Tells the other replicas (the bus) when a breaker here changes state.
    announce: Option<Announce>,
}

/// Sends one announcement (`breaker:...`) to every edge replica, this one included.
pub type Announce = Arc<dyn Fn(String) + Send + Sync>;

impl Edge {
    pub fn new(cfg: EdgeConfig, services: Services) -> Self {
        Self::with_announce(cfg, services, None)
    }

    /// As [`Self::new`], sharing breaker changes with the other replicas through `announce`.
    pub fn with_announce(cfg: EdgeConfig, services: Services, announce: Option<Announce>) -> Self {
        let principals = principal::PrincipalCache::new(cfg.auth_cache_entries);
        Self {
            inner: Arc::new(Inner {
                cfg,
                services,
                principals,
                routes: cache::TtlCache::new(10_000),
                background: TaskTracker::new(),
                stopping: tokio_util::sync::CancellationToken::new(),
                selector: relay_select::Selector::default(),
                announce,
            }),
        }
    }

    /// Applies an access change announced on the bus (`key:<id>`, `team:<id>`, `org:<id>`): cached
    /// principals it covers are dropped, so the next request asks auth again.
    pub fn invalidate(&self, target: &str) {
        if let Some((deployment, t)) = relay_select::Transition::parse(target) {
            self.inner.selector.apply(deployment, t);
            metrics::counter!("relay_edge_breaker_changes_total").increment(1);
            return;
        }
        self.inner.principals.invalidate(target);
        metrics::counter!("relay_edge_invalidations_total").increment(1);
    }

    /// The caller of a request, from the cache when possible, checked against the key's address allowlist.
    pub(crate) async fn principal(
        &self,
        ctx: &request::RequestCtx,
        headers: &axum::http::HeaderMap,
    ) -> Result<std::sync::Arc<relay_core::pb::auth::v1::Principal>, relay_core::RelayError> {
        self.inner.principals.authenticate(self.inner.services.auth.as_ref(), headers, &ctx.client_ip).await
    }

    pub(crate) fn announce(&self, msg: String) {
        tracing::warn!(change = %msg, "deployment breaker changed");
        if let Some(a) = &self.inner.announce {
            a(msg);
        }
    }

    /// Stops drains of abandoned answers (they book what they have) and waits until every usage event
    /// produced so far has been handed on.
    pub async fn flush(&self) {
        self.inner.stopping.cancel();
        self.inner.background.close();
        self.inner.background.wait().await;
        self.inner.background.reopen();
    }
}
