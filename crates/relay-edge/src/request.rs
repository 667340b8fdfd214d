//! Per-request context: Relay's request id (a fresh UUIDv7, the billing id; sent back as
//! `x-relay-request-id`), the client's own `x-request-id` kept for correlation (echoed back as is), the root
//! span joined to the caller's trace, and RED metrics by matched route.

use std::collections::HashMap;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

#[derive(Clone, Debug)]
pub struct RequestCtx {
    /// Relay's id for this request: the key of its usage event, ledger postings and limiter lease.
    pub request_id: String,
    /// The client's `x-request-id`, when it sent a usable one (correlation only).
    pub client_request_id: Option<String>,
    pub started: Instant,
    pub started_unix_ms: i64,
    /// W3C context of the root span, carried into the usage event.
    pub trace_context: HashMap<String, String>,
    /// The client's address ("" when unknown, e.g. in-process tests).
    pub client_ip: String,
    /// The matched route pattern (a metric label and access-log field).
    pub route: String,
    /// Set once a usage record owns this request (it writes the access-log line); otherwise the
    /// middleware writes a short one.
    pub recorded: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set for the requests of Relay's batch runner: the caller is the batch's, not a presented key.
    pub batch: Option<std::sync::Arc<BatchCaller>>,
}

/// The caller of a batch line, put on the request by the batch runner (an extension: never from HTTP).
#[derive(Debug)]
pub struct BatchCaller {
    pub principal: std::sync::Arc<relay_core::pb::auth::v1::Principal>,
    pub batch_id: String,
}

/// The client's address: the peer, unless the peer is a trusted proxy; then `X-Forwarded-For` is read from
/// the right (each trusted proxy appends the address it saw) and the first hop that is not a trusted proxy
/// is the client. Entries left of it are whatever the client wrote, so they are never believed.
pub(crate) fn client_ip(
    headers: &axum::http::HeaderMap,
    peer: Option<std::net::IpAddr>,
    trusted: &[String],
) -> String {
    let Some(peer) = peer.map(|p| p.to_canonical()) else { return String::new() };
    let is_trusted = |ip: &str| relay_core::ip_allowed(trusted, ip);
    if trusted.is_empty() || !is_trusted(&peer.to_string()) {
        return peer.to_string();
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    let mut client = peer.to_string();
    for hop in hops.iter().rev() {
        match hop.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let ip = ip.to_canonical().to_string();
                let proxy = is_trusted(&ip);
                client = ip;
                if !proxy {
                    break;
                }
            }
            // Garbage where an address should be: the last trusted hop saw something it could not
            // name, so the client is unknown, and an allowlist cannot pass it.
            Err(_) => return String::new(),
        }
    }
    client
}

/// The error shape of a path, for answers the middleware gives itself.
fn inbound_of(path: &str) -> crate::error::Inbound {
    let path = ["/anthropic", "/openai", "/gemini"].iter().find_map(|p| path.strip_prefix(p)).unwrap_or(path);
    if path.starts_with("/v1/messages") {
        crate::error::Inbound::Anthropic
    } else if path.starts_with("/v1beta/") || path.starts_with("/v1/models/") && path.contains(':') {
        crate::error::Inbound::Gemini
    } else {
        crate::error::Inbound::OpenAiChat
    }
}

pub async fn middleware(
    axum::extract::State(edge): axum::extract::State<crate::Edge>,
    mut req: Request,
    next: Next,
) -> Response {
    let client_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok());
    let client_request_id = relay_core::ids::client_request_id(client_id);
    let request_id = relay_core::ids::new_request_id();
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        http.request.method = %req.method(),
        http.route = %route,
        request_id = %request_id,
        client_request_id = client_request_id.as_deref().unwrap_or(""),
        http.response.status_code = tracing::field::Empty,
        relay.routing.strategy = tracing::field::Empty,
        relay.routing.deployment = tracing::field::Empty,
        relay.routing.attempts = tracing::field::Empty,
    );
    relay_telemetry::set_parent(&span, relay_telemetry::context_from_headers(req.headers()));
    let mut trace_context = span.in_scope(relay_telemetry::current_context_map);
    if trace_context.is_empty() {
        // No tracer in this process: keep the caller's context, so logs and usage still correlate.
        if let Some(tp) =
            req.headers().get("traceparent").and_then(|v| v.to_str().ok()).filter(|t| t.len() <= 64)
        {
            trace_context.insert("traceparent".to_owned(), tp.to_owned());
        }
    }
    let started = Instant::now();
    let started_unix_ms = relay_core::ids::now_ms();
    let peer = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let client_ip = client_ip(req.headers(), peer, &edge.inner.cfg.trusted_proxies);
    let inbound = inbound_of(req.uri().path());
    let ctx = RequestCtx {
        request_id: request_id.clone(),
        client_request_id: client_request_id.clone(),
        started,
        started_unix_ms,
        trace_context,
        client_ip,
        route: route.clone(),
        recorded: Default::default(),
        batch: req.extensions().get::<std::sync::Arc<BatchCaller>>().cloned(),
    };
    let held = match edge.inner.bounds.admit(req.method(), req.headers()) {
        Ok(h) => h,
        Err(e) => return finish(inbound.error(e), &span, &ctx),
    };
    let until = tokio::time::Instant::now() + edge.inner.bounds.deadline;
    req.extensions_mut().insert(ctx.clone());
    let resp = match tokio::time::timeout_at(until, next.run(req).instrument(span.clone())).await {
        Ok(resp) => resp,
        Err(_) => inbound.error(relay_core::RelayError::new(
            relay_core::ErrorCode::UpstreamTimeout,
            format!(
                "The request did not finish within the relay's deadline of {} s.",
                edge.inner.bounds.deadline.as_secs()
            ),
        )),
    };
    let resp = resp.map(|body| axum::body::Body::new(crate::bounds::Bounded::new(body, until, held)));
    finish(resp, &span, &ctx)
}

/// Response headers, metrics and (for requests no usage record owns) the access-log line every answer
/// gets.
fn finish(mut resp: Response, span: &tracing::Span, ctx: &RequestCtx) -> Response {
    let status = resp.status().as_u16();
    span.record("http.response.status_code", status);
    let request_id = ctx.request_id.as_str();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-relay-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(ctx.client_request_id.as_deref().unwrap_or(request_id)) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let route = &ctx.route;
    {
        use relay_telemetry::handles::{HandleCache, decimal};
        use std::sync::LazyLock;
        static REQUESTS: LazyLock<HandleCache<metrics::Counter>> = LazyLock::new(|| HandleCache::new(4096));
        static DURATION: LazyLock<HandleCache<metrics::Histogram>> = LazyLock::new(|| HandleCache::new(256));
        let mut buf = [0; 10];
        let status = decimal(&mut buf, u32::from(status));
        REQUESTS.counter("relay_edge_requests_total", &["route", "status"], &[route, status]).increment(1);
        DURATION
            .histogram("relay_edge_request_duration_seconds", &["route"], &[route])
            .record(ctx.started.elapsed().as_secs_f64());
    }
    let code = resp.extensions().get::<relay_core::ErrorCode>().copied();
    if let Some(code) = code {
        crate::observe::errors(route, code);
    }
    if !ctx.recorded.load(std::sync::atomic::Ordering::Acquire) {
        crate::observe::refused(ctx, route, status, code);
    }
    resp
}
