//! The admin listener every process exposes: `/livez`, `/readyz`, `/metrics` (Prometheus text).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

/// Readiness, flipped on once every component of the process is serving and off when draining starts.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|| async { relay_telemetry::prometheus().render() }))
        .with_state(readiness)
}

async fn readyz(State(r): State<Readiness>) -> (StatusCode, &'static str) {
    if r.is_ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

/// Does the request carry `Authorization: Bearer <token>`? Compared in constant time, so the answer's
/// timing says nothing about how much of a guess was right. Shared by every admin API.
pub fn bearer_matches(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), token.as_bytes()))
}
