//! relay-edge: the HTTP API clients talk to (OpenAI-shaped today; Anthropic and Responses build on it).
//!
//! Authenticates from a local cache, routes from a local cache, calls the adapter and forwards its bytes
//! as they arrive, fails over before the first byte, and emits one usage event per authenticated request.
//! Every failure is answered in the client protocol's error shape. What does not belong here: protocol
//! conversion (adapter), key storage (auth), route selection (routing), recording usage (billing).

pub mod admin;
mod answer;
mod batch_runner;
mod batches;
mod bounds;
mod cache;
mod chat;
mod conversations;
mod dispatch;
mod error;
mod failover;
mod files;
mod forward;
mod gemini;
mod listing;
mod multipart;
mod observe;
pub mod principal;
pub use replay::MemoryAnswerCache;
mod replay;
mod request;
mod routes;
mod state;
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
    /// Most authenticated keys kept in the local cache (least recently used ones leave first).
    pub auth_cache_entries: usize,
    /// Proxies in front of the edge (IPs or CIDRs). `X-Forwarded-For` is read from the right, skipping
    /// these; the first other address is the client. Empty: the header is ignored (the peer is the client).
    pub trusted_proxies: Vec<String>,
    /// Longest time an abandoned answer is read on (disconnect policy `drain`) to bill the provider's own
    /// usage; past it the upstream is cancelled and what it produced is billed.
    pub drain_max_secs: u64,
    /// Longest a client may take to send a request's headers (also an idle keep-alive connection's wait).
    pub header_read_timeout_ms: u64,
    /// Longest a client may take to send a request body, once its key is accepted: past it, 408.
    pub body_read_timeout_ms: u64,
    /// Longest one request may take in all, answer streaming included; past it the answer is cut off
    /// (and billed for what was produced). Keep it below the limiter's lease lifetime.
    pub request_timeout_secs: u64,
    /// Most client connections open at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Most requests in progress at once on this replica; past it, 503 with `Retry-After` before the
    /// body is read.
    pub max_in_flight: usize,
    /// Most request-body bytes buffered at once across all requests (by `Content-Length`, or
    /// `max_body_bytes` when the client does not say); past it, 503 before the body is read.
    pub max_buffered_body_bytes: usize,
    /// Failed authentications allowed per client address per minute; past it, 429 without a lookup.
    pub auth_failures_per_minute: u32,
    /// A failed authentication is answered after this pause (a timer, no CPU): a client flooding with
    /// bad keys is slowed to a trickle per connection, while real callers never meet it.
    pub auth_failure_delay_ms: u64,
    /// Memory the response cache may hold when there is no Redis (embedded mode); with Redis the cache
    /// is shared there.
    pub response_cache_memory_bytes: usize,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            auth_cache_entries: 100_000,
            trusted_proxies: Vec::new(),
            drain_max_secs: 300,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            request_timeout_secs: 600,
            max_connections: 10_000,
            max_in_flight: 10_000,
            max_buffered_body_bytes: 1 << 30,
            auth_failures_per_minute: 30,
            auth_failure_delay_ms: 150,
            response_cache_memory_bytes: 64 << 20,
        }
    }
}

impl EdgeConfig {
    pub fn validate(&self, errors: &mut Vec<String>) {
        for p in &self.trusted_proxies {
            if !relay_core::is_ip_or_cidr(p) {
                errors.push(format!("edge.trusted_proxies: `{p}` is not an IP address or CIDR"));
            }
        }
        let positive = [
            ("max_body_bytes", self.max_body_bytes as u64),
            ("auth_cache_entries", self.auth_cache_entries as u64),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("request_timeout_secs", self.request_timeout_secs),
            ("max_connections", self.max_connections as u64),
            ("max_in_flight", self.max_in_flight as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                errors.push(format!("edge.{name} must be at least 1"));
            }
        }
        if self.max_buffered_body_bytes < self.max_body_bytes {
            errors.push("edge.max_buffered_body_bytes must be at least edge.max_body_bytes".into());
        }
    }

    /// The listener's connection bounds.
    pub fn connections(&self) -> relay_runtime::http::ConnLimits {
        relay_runtime::http::ConnLimits {
            header_read_timeout_ms: self.header_read_timeout_ms,
            max_connections: self.max_connections,
            ..Default::default()
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
    bounds: bounds::Bounds,
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
    /// Wakes this edge's batch runner (a batch was created or cancelled here).
    batch_wake: tokio::sync::Notify,
}

/// Sends one announcement (`breaker:...`) to every edge replica, this one included.
pub type Announce = Arc<dyn Fn(String) + Send + Sync>;

impl Edge {
    pub fn new(cfg: EdgeConfig, services: Services) -> Self {
        Self::with_announce(cfg, services, None)
    }

    /// As [`Self::new`], sharing breaker changes with the other replicas through `announce`.
    pub fn with_announce(cfg: EdgeConfig, services: Services, announce: Option<Announce>) -> Self {
        // Series alerts watch, present from the start.
        metrics::counter!("relay_edge_usage_lost_total").increment(0);
        metrics::gauge!("relay_edge_streams_in_flight").increment(0.0);
        let principals = principal::PrincipalCache::with_failure_limit(
            cfg.auth_cache_entries,
            cfg.auth_failures_per_minute,
        );
        Self {
            inner: Arc::new(Inner {
                bounds: bounds::Bounds::new(&cfg),
                cfg,
                services,
                principals,
                routes: cache::TtlCache::new(10_000),
                background: TaskTracker::new(),
                stopping: tokio_util::sync::CancellationToken::new(),
                selector: relay_select::Selector::default(),
                announce,
                batch_wake: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Runs the Batches API's batches (claimed from the state store, so any number of edges share the
    /// work) until `stop`; returns at once when this Relay keeps no state.
    pub fn batch_runner(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        batch_runner::run(self.clone(), stop)
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
        if let Some(b) = &ctx.batch {
            return Ok(b.principal.clone());
        }
        let r = self.inner.principals.authenticate(&self.inner.services.auth, headers, &ctx.client_ip).await;
        if let Err(e) = &r
            && matches!(e.code, relay_core::ErrorCode::Unauthenticated | relay_core::ErrorCode::RateLimited)
            && self.inner.cfg.auth_failure_delay_ms > 0
        {
            tokio::time::sleep(std::time::Duration::from_millis(self.inner.cfg.auth_failure_delay_ms)).await;
        }
        r
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
