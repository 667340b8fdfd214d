//! Provider implementations and the helpers they share (event constructors, upstream error mapping).

pub mod demo;
pub mod openai;

use bytes::Bytes;
use relay_core::contracts::{ChatEventStream, Result};
use relay_core::pb::adapter::v1::{
    self as pb, ChatEvent, ChatRequest, EmbedRequest, EmbedResponse, chat_event::Event,
};
use relay_core::pb::common::v1::TokenUsage;
use relay_core::{ErrorCode, RelayError};

#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `gen_ai.system` for spans and metrics, e.g. "openai".
    fn system(&self) -> &'static str;
    async fn chat(&self, req: ChatRequest) -> Result<ChatEventStream>;
    async fn embed(&self, req: EmbedRequest) -> Result<EmbedResponse>;
}

/// The model name the deployment's provider knows.
pub fn upstream_model(dep: Option<&relay_core::pb::routing::v1::Deployment>) -> String {
    dep.map(|d| d.upstream_model.clone()).unwrap_or_default()
}

/// The client's body with only `model` replaced by the upstream's name for it.
pub fn body_for_upstream<'a>(body: &'a [u8], model: &str) -> Result<crate::body::JsonBody<'a>> {
    let mut b = crate::body::JsonBody::parse(body)?;
    b.set("model", crate::body::json_str(model));
    Ok(b)
}

// === event constructors ===

pub fn ev(event: Event) -> ChatEvent {
    ChatEvent { event: Some(event) }
}

pub fn start(upstream_model: &str) -> ChatEvent {
    ev(Event::Start(pb::Start {
        upstream_model: upstream_model.to_owned(),
        upstream_request_id: String::new(),
    }))
}

pub fn chunk(data: Bytes) -> ChatEvent {
    ev(Event::Chunk(pb::Chunk { data }))
}

pub fn finish(choice_index: u32, reason: pb::FinishReason) -> ChatEvent {
    ev(Event::Finish(pb::Finish {
        choice_index,
        reason: reason as i32,
    }))
}

pub fn usage(u: TokenUsage) -> ChatEvent {
    ev(Event::Usage(u))
}

pub fn error(e: &RelayError) -> ChatEvent {
    ev(Event::Error(e.to_pb()))
}

// === upstream failures ===

/// The largest upstream error body we read (the rest is dropped).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Turns a non-2xx upstream response into a typed error. 4xx messages are the provider's own (they tell the
/// caller what to fix); 5xx messages are generic, since they may describe the provider's internals.
pub async fn upstream_error(provider: &str, resp: reqwest::Response) -> RelayError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let body = read_limited(resp).await;
    let message = if (400..500).contains(&status) {
        provider_message(&body)
            .unwrap_or_else(|| format!("upstream provider `{provider}` rejected the request"))
    } else {
        format!("upstream provider `{provider}` failed (HTTP {status})")
    };
    RelayError::from_upstream_status(status, message).with_retry_after(retry_after)
}

async fn read_limited(mut resp: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        out.extend_from_slice(&chunk);
        if out.len() >= MAX_ERROR_BODY {
            out.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    out
}

/// `error.message` (OpenAI / Anthropic) or `error.message` inside a list (Gemini), if present.
fn provider_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let err = if v.is_array() {
        v.get(0)?.get("error")?
    } else {
        v.get("error")?
    };
    let msg = err
        .get("message")
        .and_then(|m| m.as_str())
        .or_else(|| err.as_str())?;
    Some(msg.chars().take(2000).collect())
}

/// Maps a transport failure (no HTTP answer) to a typed error without leaking addresses.
pub fn transport_error(provider: &str, e: &reqwest::Error) -> RelayError {
    if e.is_timeout() {
        RelayError::new(
            ErrorCode::UpstreamTimeout,
            format!("upstream provider `{provider}` timed out"),
        )
    } else {
        RelayError::new(
            ErrorCode::UpstreamUnreachable,
            format!("upstream provider `{provider}` is unreachable"),
        )
    }
}

pub fn finish_reason_from_openai(s: &str) -> pb::FinishReason {
    match s {
        "stop" => pb::FinishReason::Stop,
        "length" => pb::FinishReason::Length,
        "tool_calls" | "function_call" => pb::FinishReason::ToolCalls,
        "content_filter" => pb::FinishReason::ContentFilter,
        _ => pb::FinishReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_messages_are_found_in_each_shape() {
        assert_eq!(
            provider_message(br#"{"error":{"message":"bad max_tokens"}}"#).as_deref(),
            Some("bad max_tokens")
        );
        assert_eq!(
            provider_message(br#"{"type":"error","error":{"type":"x","message":"nope"}}"#).as_deref(),
            Some("nope")
        );
        assert_eq!(
            provider_message(br#"[{"error":{"code":400,"message":"gem"}}]"#).as_deref(),
            Some("gem")
        );
        assert_eq!(provider_message(b"<html>502</html>"), None);
    }
}
