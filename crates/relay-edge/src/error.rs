//! Errors as HTTP responses, in the client protocol's shape. Logging happens where errors are created or in
//! the request span, never here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use relay_core::RelayError;

/// An error answer in OpenAI shape.
pub struct OpenAiError(pub RelayError);

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(e.openai_body())).into_response();
        if let Some(secs) = e.retry_after_secs {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(e.code);
        resp
    }
}

impl From<RelayError> for OpenAiError {
    fn from(e: RelayError) -> Self {
        Self(e)
    }
}

/// The SSE frame that ends an OpenAI stream that failed after it started (no `[DONE]` follows).
pub fn openai_stream_error(e: &RelayError) -> bytes::Bytes {
    bytes::Bytes::from(format!("data: {}\n\n", e.openai_body()))
}
