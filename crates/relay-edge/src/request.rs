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
}

/// The peer address, or the first `X-Forwarded-For` hop when the edge is configured to trust it.
fn client_ip(req: &Request, trust_forwarded_for: bool) -> String {
    if trust_forwarded_for
        && let Some(first) = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
    {
        return first.trim().to_owned();
    }
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default()
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
    let trace_context = span.in_scope(relay_telemetry::current_context_map);
    let started = Instant::now();
    let started_unix_ms = relay_core::ids::now_ms();
    let client_ip = client_ip(&req, edge.inner.cfg.trust_forwarded_for);
    req.extensions_mut().insert(RequestCtx {
        request_id: request_id.clone(),
        client_request_id: client_request_id.clone(),
        started,
        started_unix_ms,
        trace_context,
        client_ip,
    });
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.record("http.response.status_code", status);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-relay-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(client_request_id.as_deref().unwrap_or(&request_id)) {
        resp.headers_mut().insert("x-request-id", v);
    }
    metrics::counter!("relay_edge_requests_total", "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("relay_edge_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}
