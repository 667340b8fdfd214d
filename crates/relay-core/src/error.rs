//! The one closed error vocabulary of Relay.
//!
//! Every failure is a [`RelayError`] carrying one [`ErrorCode`]. The code alone decides the HTTP status (with the
//! upstream's own status kept where the contract says so), the gRPC status (in relay-proto) and the error body in
//! each client protocol. Messages are written for the caller: never secrets, addresses or internal detail.

use serde_json::{Value, json};

use crate::pb::common::v1 as pb;

/// The closed set of failure kinds. Mirrors `relay.common.v1.ErrorCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    Unauthenticated,
    PermissionDenied,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    InsufficientQuota,
    UpstreamClientError,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamProtocol,
    Unavailable,
    Cancelled,
    Internal,
    /// The client did not send its request (headers or body) in time, or it ran past the request deadline.
    RequestTimeout,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and docs.
    pub const ALL: [ErrorCode; 18] = [
        Self::InvalidRequest,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::ModelNotFound,
        Self::NotFound,
        Self::PayloadTooLarge,
        Self::RateLimited,
        Self::InsufficientQuota,
        Self::UpstreamClientError,
        Self::UpstreamRateLimited,
        Self::UpstreamServerError,
        Self::UpstreamUnreachable,
        Self::UpstreamTimeout,
        Self::UpstreamProtocol,
        Self::Unavailable,
        Self::Cancelled,
        Self::Internal,
        Self::RequestTimeout,
    ];

    /// A stable, low-cardinality label (metrics, logs, `error.code` in bodies).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::Unauthenticated => "invalid_api_key",
            Self::PermissionDenied => "permission_denied",
            Self::ModelNotFound => "model_not_found",
            Self::NotFound => "not_found",
            Self::PayloadTooLarge => "request_too_large",
            Self::RateLimited => "rate_limit_exceeded",
            Self::InsufficientQuota => "insufficient_quota",
            Self::UpstreamClientError => "upstream_bad_request",
            Self::UpstreamRateLimited => "upstream_rate_limited",
            Self::UpstreamServerError => "upstream_error",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamProtocol => "upstream_protocol_error",
            Self::Unavailable => "service_unavailable",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal_error",
            Self::RequestTimeout => "request_timeout",
        }
    }

    /// Default HTTP status. [`RelayError::http_status`] refines it with the upstream's status.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::UpstreamClientError => 400,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::ModelNotFound | Self::NotFound => 404,
            Self::PayloadTooLarge => 413,
            Self::RequestTimeout => 408,
            Self::RateLimited | Self::InsufficientQuota | Self::UpstreamRateLimited => 429,
            Self::Cancelled => 499,
            Self::Internal => 500,
            Self::UpstreamServerError | Self::UpstreamUnreachable | Self::UpstreamProtocol => 502,
            Self::Unavailable => 503,
            Self::UpstreamTimeout => 504,
        }
    }

    /// OpenAI `error.type`.
    pub fn openai_type(self) -> &'static str {
        match self {
            Self::InvalidRequest
            | Self::ModelNotFound
            | Self::PayloadTooLarge
            | Self::RequestTimeout
            | Self::UpstreamClientError => "invalid_request_error",
            Self::Unauthenticated => "authentication_error",
            Self::PermissionDenied => "permission_error",
            Self::NotFound => "not_found_error",
            Self::RateLimited | Self::UpstreamRateLimited => "rate_limit_error",
            Self::InsufficientQuota => "insufficient_quota",
            Self::Cancelled => "request_cancelled",
            Self::UpstreamServerError
            | Self::UpstreamUnreachable
            | Self::UpstreamTimeout
            | Self::UpstreamProtocol
            | Self::Unavailable
            | Self::Internal => "api_error",
        }
    }

    /// Anthropic `error.type` (the closed set the Anthropic SDKs know).
    pub fn anthropic_type(self) -> &'static str {
        match self {
            Self::InvalidRequest | Self::UpstreamClientError | Self::Cancelled | Self::RequestTimeout => {
                "invalid_request_error"
            }
            Self::Unauthenticated => "authentication_error",
            Self::PermissionDenied => "permission_error",
            Self::ModelNotFound | Self::NotFound => "not_found_error",
            Self::PayloadTooLarge => "request_too_large",
            Self::RateLimited | Self::InsufficientQuota | Self::UpstreamRateLimited => "rate_limit_error",
            Self::Unavailable => "overloaded_error",
            Self::UpstreamServerError
            | Self::UpstreamUnreachable
            | Self::UpstreamTimeout
            | Self::UpstreamProtocol
            | Self::Internal => "api_error",
        }
    }

    /// Google's canonical status name (Gemini `error.status`).
    pub fn google_status(self) -> &'static str {
        match self {
            Self::InvalidRequest | Self::UpstreamClientError | Self::PayloadTooLarge => "INVALID_ARGUMENT",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ModelNotFound | Self::NotFound => "NOT_FOUND",
            Self::RateLimited | Self::InsufficientQuota | Self::UpstreamRateLimited => "RESOURCE_EXHAUSTED",
            Self::Cancelled => "CANCELLED",
            Self::RequestTimeout | Self::UpstreamTimeout => "DEADLINE_EXCEEDED",
            Self::Unavailable | Self::UpstreamUnreachable => "UNAVAILABLE",
            Self::UpstreamServerError | Self::UpstreamProtocol | Self::Internal => "INTERNAL",
        }
    }

    /// May another deployment succeed where this one failed (before any byte reached the client)?
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::UpstreamServerError
                | Self::UpstreamUnreachable
                | Self::UpstreamTimeout
                | Self::UpstreamRateLimited
                | Self::Unavailable
        )
    }

    pub fn to_pb(self) -> pb::ErrorCode {
        match self {
            Self::InvalidRequest => pb::ErrorCode::InvalidRequest,
            Self::Unauthenticated => pb::ErrorCode::Unauthenticated,
            Self::PermissionDenied => pb::ErrorCode::PermissionDenied,
            Self::ModelNotFound => pb::ErrorCode::ModelNotFound,
            Self::NotFound => pb::ErrorCode::NotFound,
            Self::PayloadTooLarge => pb::ErrorCode::PayloadTooLarge,
            Self::RateLimited => pb::ErrorCode::RateLimited,
            Self::InsufficientQuota => pb::ErrorCode::InsufficientQuota,
            Self::UpstreamClientError => pb::ErrorCode::UpstreamClientError,
            Self::UpstreamRateLimited => pb::ErrorCode::UpstreamRateLimited,
            Self::UpstreamServerError => pb::ErrorCode::UpstreamServerError,
            Self::UpstreamUnreachable => pb::ErrorCode::UpstreamUnreachable,
            Self::UpstreamTimeout => pb::ErrorCode::UpstreamTimeout,
            Self::UpstreamProtocol => pb::ErrorCode::UpstreamProtocol,
            Self::Unavailable => pb::ErrorCode::Unavailable,
            Self::Cancelled => pb::ErrorCode::Cancelled,
            Self::Internal => pb::ErrorCode::Internal,
            Self::RequestTimeout => pb::ErrorCode::RequestTimeout,
        }
    }

    /// Unknown or unspecified codes (a newer peer) degrade to `Internal`, never to success.
    pub fn from_pb(code: i32) -> Self {
        Self::ALL.into_iter().find(|c| c.to_pb() as i32 == code).unwrap_or(Self::Internal)
    }
}

/// A failure with everything a response needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RelayError {
    pub code: ErrorCode,
    pub message: String,
    /// HTTP status the upstream answered with, when the error came from a provider.
    pub upstream_status: Option<u16>,
    pub retry_after_secs: Option<u32>,
    pub param: Option<String>,
}

impl RelayError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), upstream_status: None, retry_after_secs: None, param: None }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_upstream_status(mut self, status: u16) -> Self {
        self.upstream_status = Some(status);
        self
    }

    pub fn with_retry_after(mut self, secs: Option<u32>) -> Self {
        self.retry_after_secs = secs;
        self
    }

    /// Classify an upstream HTTP failure status into the right code.
    pub fn from_upstream_status(status: u16, message: impl Into<String>) -> Self {
        let code = match status {
            429 => ErrorCode::UpstreamRateLimited,
            408 | 504 => ErrorCode::UpstreamTimeout,
            400..=499 => ErrorCode::UpstreamClientError,
            _ => ErrorCode::UpstreamServerError,
        };
        Self::new(code, message).with_upstream_status(status)
    }

    /// The status the client sees: an upstream 4xx stays that 4xx; an upstream 5xx stays that 5xx except a
    /// bare 500, which becomes 502 (the relay itself did not fail).
    pub fn http_status(&self) -> u16 {
        match (self.code, self.upstream_status) {
            (ErrorCode::UpstreamClientError, Some(s @ 400..=499)) => s,
            (ErrorCode::UpstreamServerError, Some(s @ 501..=599)) => s,
            (code, _) => code.http_status(),
        }
    }

    /// `{"error": {"message", "type", "param", "code"}}` as the OpenAI APIs answer.
    pub fn openai_body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.code.openai_type(),
            "param": self.param,
            "code": self.code.as_str(),
        }})
    }

    /// `{"type": "error", "error": {"type", "message"}}` as the Anthropic API answers.
    pub fn anthropic_body(&self) -> Value {
        let kind =
            if self.upstream_status == Some(529) { "overloaded_error" } else { self.code.anthropic_type() };
        json!({"type": "error", "error": {"type": kind, "message": self.message}})
    }

    /// `{"error": {"code", "message", "status"}}` as the Gemini API answers.
    pub fn gemini_body(&self) -> Value {
        json!({"error": {"code": self.http_status(), "message": self.message, "status": self.code.google_status()}})
    }

    pub fn to_pb(&self) -> pb::Error {
        pb::Error {
            code: self.code.to_pb() as i32,
            message: self.message.clone(),
            upstream_status: self.upstream_status.map_or(0, u32::from),
            retry_after_secs: self.retry_after_secs.unwrap_or(0),
            param: self.param.clone().unwrap_or_default(),
        }
    }

    pub fn from_pb(e: &pb::Error) -> Self {
        Self {
            code: ErrorCode::from_pb(e.code),
            message: e.message.clone(),
            upstream_status: u16::try_from(e.upstream_status).ok().filter(|s| *s != 0),
            retry_after_secs: Some(e.retry_after_secs).filter(|s| *s != 0),
            param: Some(e.param.clone()).filter(|p| !p.is_empty()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_protobuf_and_label() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_pb(code.to_pb() as i32), code);
            let e = RelayError::new(code, "m").with_param("p").with_retry_after(Some(3));
            assert_eq!(RelayError::from_pb(&e.to_pb()), e);
        }
        assert_eq!(ErrorCode::from_pb(0), ErrorCode::Internal);
        assert_eq!(ErrorCode::from_pb(9999), ErrorCode::Internal);
    }

    #[test]
    fn upstream_statuses_keep_their_meaning() {
        assert_eq!(RelayError::from_upstream_status(400, "x").http_status(), 400);
        assert_eq!(RelayError::from_upstream_status(422, "x").http_status(), 422);
        assert_eq!(RelayError::from_upstream_status(429, "x").http_status(), 429);
        assert_eq!(RelayError::from_upstream_status(500, "x").http_status(), 502);
        assert_eq!(RelayError::from_upstream_status(503, "x").http_status(), 503);
        assert_eq!(RelayError::from_upstream_status(504, "x").code, ErrorCode::UpstreamTimeout);
        assert!(RelayError::from_upstream_status(503, "x").code.is_retryable());
        assert!(!RelayError::from_upstream_status(400, "x").code.is_retryable());
    }

    #[test]
    fn bodies_have_the_provider_shapes() {
        let e = RelayError::new(ErrorCode::Unauthenticated, "Invalid API key.");
        let o = e.openai_body();
        assert_eq!(o["error"]["type"], "authentication_error");
        assert_eq!(o["error"]["code"], "invalid_api_key");
        assert_eq!(o["error"]["message"], "Invalid API key.");
        let a = e.anthropic_body();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "authentication_error");
        let g = e.gemini_body();
        assert_eq!(
            (g["error"]["code"].as_u64(), g["error"]["status"].as_str()),
            (Some(401), Some("UNAUTHENTICATED"))
        );
        for code in ErrorCode::ALL {
            let s = code.http_status();
            assert!((400..=599).contains(&s), "{code:?} -> {s}");
        }
    }
}
