//! Errors as HTTP responses and as stream-ending events, in the client protocol's shape. Logging happens
//! where errors are created or in the request span, never here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use relay_core::RelayError;
use relay_core::pb::common::v1::Protocol;
use serde_json::json;

/// The client protocol of a route: decides the shape of every error it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    OpenAiChat,
    Anthropic,
    Responses,
    Embeddings,
    /// Gemini `generateContent` (the `google-genai` SDKs).
    Gemini,
    /// Streamed legacy `/v1/completions` (whole ones are forwarded as other endpoints are).
    Completions,
}

impl Inbound {
    pub fn protocol(self) -> Protocol {
        match self {
            Self::OpenAiChat => Protocol::OpenaiChat,
            Self::Anthropic => Protocol::AnthropicMessages,
            Self::Responses => Protocol::OpenaiResponses,
            Self::Embeddings => Protocol::OpenaiEmbeddings,
            Self::Gemini => Protocol::GeminiGenerate,
            Self::Completions => Protocol::OpenaiCompletions,
        }
    }

    /// The error as an HTTP response.
    pub fn error(self, e: RelayError) -> Response {
        let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = match self {
            Self::Anthropic => e.anthropic_body(),
            Self::Gemini => e.gemini_body(),
            Self::OpenAiChat | Self::Responses | Self::Embeddings | Self::Completions => e.openai_body(),
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(secs) = e.retry_after_secs {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(e.code);
        resp
    }

    /// The event that ends a stream that failed after it started: OpenAI chat gets an `error` object and no
    /// `[DONE]`; Anthropic and Responses get `event: error`; Gemini gets its error object as an event.
    pub fn stream_error(self, e: &RelayError) -> Bytes {
        match self {
            Self::Anthropic => Bytes::from(format!("event: error\ndata: {}\n\n", e.anthropic_body())),
            Self::Responses => {
                let body =
                    json!({"type": "error", "code": e.code.as_str(), "message": e.message, "param": e.param});
                Bytes::from(format!("event: error\ndata: {body}\n\n"))
            }
            Self::Gemini => Bytes::from(format!("data: {}\r\n\r\n", e.gemini_body())),
            Self::OpenAiChat | Self::Embeddings | Self::Completions => {
                Bytes::from(format!("data: {}\n\n", e.openai_body()))
            }
        }
    }
}

/// An error answer in OpenAI shape (for handlers that return `Result`).
pub struct OpenAiError(pub RelayError);

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        Inbound::OpenAiChat.error(self.0)
    }
}

impl From<RelayError> for OpenAiError {
    fn from(e: RelayError) -> Self {
        Self(e)
    }
}
