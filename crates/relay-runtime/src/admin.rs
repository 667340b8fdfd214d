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

/// An admin API failure, answered as an OpenAI-shaped error body with the code's HTTP status. Storage
/// errors become a generic 503: the cause is logged here, never sent.
#[derive(Debug)]
pub struct ApiError(pub relay_core::RelayError);

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let status = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0.openai_body())).into_response()
    }
}

impl From<relay_core::RelayError> for ApiError {
    fn from(e: relay_core::RelayError) -> Self {
        Self(e)
    }
}

/// `?` on a storage call: logged, answered 503 without the cause.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::storage("storage", &e)
    }
}

impl ApiError {
    /// A storage failure of `what` (e.g. "key storage"): logged, answered 503.
    pub fn storage(what: &str, e: &anyhow::Error) -> Self {
        tracing::error!(error = %e, "admin API: {what} failed");
        Self(relay_core::RelayError::new(
            relay_core::ErrorCode::Unavailable,
            format!("{what} is unavailable"),
        ))
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self(relay_core::RelayError::invalid_request(msg))
    }

    /// `Authorization: Bearer <token>` or 401.
    pub fn check_bearer(headers: &axum::http::HeaderMap, token: &str) -> Result<(), Self> {
        if bearer_matches(headers, token) {
            Ok(())
        } else {
            Err(Self(relay_core::RelayError::new(
                relay_core::ErrorCode::Unauthenticated,
                "Invalid admin token.",
            )))
        }
    }
}
