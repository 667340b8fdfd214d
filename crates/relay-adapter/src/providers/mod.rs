//! Providers. Each HTTP provider is a [`Dialect`] (URLs, auth, request building, answer decoding) run by
//! the shared [`HttpProvider`]; the demo provider answers by itself. Also the helpers every provider uses.

pub mod anthropic;
pub mod completions_wire;
pub mod demo;
pub mod gemini;
pub mod openai;
mod openai_wire;
pub mod responses_wire;

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::HeaderMap;
use relay_core::contracts::{ChatEventStream, Result};
use relay_core::pb::adapter::v1::{
    self as pb, ChatEvent, ChatRequest, CountTokensRequest, CountTokensResponse, EmbedRequest, EmbedResponse,
    ForwardRequest, ForwardResponse, chat_event::Event,
};
use relay_core::pb::common::v1::{Protocol, TokenUsage};
use relay_core::{ErrorCode, RelayError};
use serde_json::Value;

use crate::convert::{Counting, Output, stream_answer, whole_answer};
use crate::inbound::{self, AnswerCtx};
use crate::ir::{Delta, Request};
use crate::upstream::{Decoder, Http, sse_units};

#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `gen_ai.system` for spans and metrics, e.g. "openai".
    fn system(&self) -> &'static str;
    async fn chat(&self, req: ChatRequest) -> Result<ChatEventStream>;
    async fn embed(&self, req: EmbedRequest) -> Result<EmbedResponse>;
    async fn count_tokens(&self, req: CountTokensRequest) -> Result<CountTokensResponse>;
    /// Another OpenAI-shaped endpoint (`operation`, e.g. "completions"), where this upstream has it.
    async fn forward(&self, req: ForwardRequest) -> Result<ForwardResponse> {
        Err(not_forwarded(self.system(), &req.operation))
    }
}

/// The clear 400 for an endpoint an upstream does not have.
pub fn not_forwarded(system: &str, operation: &str) -> RelayError {
    RelayError::invalid_request(format!(
        "/v1/{operation} is not supported by this model's upstream ({system}); it is served for OpenAI-compatible upstreams only"
    ))
    .with_param("model")
}

/// Usage in the answer of a forwarded endpoint: OpenAI's `prompt_tokens`/`completion_tokens`, the
/// `input_tokens`/`output_tokens` of newer endpoints, or rerankers' `total_tokens`.
fn forwarded_usage(body: &[u8]) -> Option<TokenUsage> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let u = v.get("usage")?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64);
    let input = n("prompt_tokens").or_else(|| n("input_tokens")).or_else(|| n("total_tokens"))?;
    let output = n("completion_tokens").or_else(|| n("output_tokens")).unwrap_or(0);
    Some(TokenUsage { input_tokens: input, output_tokens: output, ..Default::default() })
}

/// What differs between HTTP providers.
#[async_trait::async_trait]
pub trait Dialect: Send + Sync + 'static {
    fn system(&self) -> &'static str;
    /// The client protocol this upstream speaks natively (forwarded byte for byte).
    fn native(&self) -> Protocol;
    fn chat_url(&self, model: &str, stream: bool) -> String;
    /// Where this upstream serves the Responses API itself (`None`: Responses requests are converted).
    fn responses_url(&self, _model: &str) -> Option<String> {
        None
    }
    /// Where another OpenAI-shaped endpoint lives on this upstream (`None`: it has none).
    fn forward_url(&self, _model: &str, _operation: &str) -> Option<String> {
        None
    }
    /// Per-call headers (e.g. `anthropic-version`, passed-through beta flags).
    fn headers(&self, _passthrough: &std::collections::HashMap<String, String>) -> HeaderMap {
        HeaderMap::new()
    }
    /// The client's native body for this upstream: only the model rewritten (plus what exact usage needs).
    fn native_body(&self, req: &ChatRequest, model: &str) -> Result<Vec<u8>> {
        Ok(body_for_upstream(&req.body, model)?.into_bytes())
    }
    /// A converted request in this upstream's protocol.
    fn build(&self, ir: &Request, model: &str, stream: bool) -> Result<Value>;
    fn decoder(&self) -> Box<dyn Decoder>;
    /// A whole (non-streamed) answer as deltas.
    fn whole(&self, body: &[u8]) -> std::result::Result<Vec<Delta>, ()>;
    async fn embed(&self, http: &Http, req: EmbedRequest) -> Result<EmbedResponse> {
        let _ = req;
        Err(RelayError::invalid_request(format!("provider `{}` has no embeddings API", http.name)))
    }
    async fn count_tokens(
        &self,
        http: &Http,
        ir: &Request,
        req: &CountTokensRequest,
    ) -> Result<CountTokensResponse> {
        let _ = http;
        // No counting API (OpenAI-compatible): Relay's tokenizer for the upstream model.
        let t = crate::tokens::Tokenizer::for_model(&upstream_model(req.deployment.as_ref()));
        Ok(CountTokensResponse { input_tokens: t.count_request(ir), exact: false, source: t.source() as i32 })
    }
}

pub struct HttpProvider<D> {
    pub http: Http,
    pub dialect: D,
}

/// An upstream endpoint besides chat that a client's request is forwarded to as it is, and how to read
/// its answer.
struct Passthrough {
    url: String,
    body: Vec<u8>,
    decoder: Box<dyn Decoder>,
    whole: fn(&[u8]) -> std::result::Result<Vec<Delta>, ()>,
    drop_usage_only: bool,
}

impl<D: Dialect> HttpProvider<D> {
    /// A Responses request sent to the upstream's own Responses API (its state included).
    async fn responses(&self, req: ChatRequest, model: &str, url: String) -> Result<ChatEventStream> {
        let body = body_for_upstream(&req.body, model)?.into_bytes();
        let decoder = Box::new(responses_wire::StreamDecoder::default());
        let p = Passthrough { url, body, decoder, whole: responses_wire::whole, drop_usage_only: false };
        self.pass_through(req, model, p).await
    }

    /// A streamed legacy completion, on upstreams that serve `/completions` (usage forced on, and dropped
    /// again when the client did not ask for it).
    async fn completions(&self, req: ChatRequest, model: &str) -> Result<ChatEventStream> {
        let url = self
            .dialect
            .forward_url(model, "completions")
            .ok_or_else(|| not_forwarded(self.dialect.system(), "completions"))?;
        let mut body = body_for_upstream(&req.body, model)?;
        if req.stream {
            crate::body::force_include_usage(&mut body)?;
        }
        let decoder = Box::new(completions_wire::StreamDecoder::default());
        let drop_usage_only = !req.client_wants_usage;
        let p = Passthrough {
            url,
            body: body.into_bytes(),
            decoder,
            whole: completions_wire::whole,
            drop_usage_only,
        };
        self.pass_through(req, model, p).await
    }

    /// Sends the body and passes the answer's events (or whole body) through as they are.
    async fn pass_through(&self, req: ChatRequest, model: &str, p: Passthrough) -> Result<ChatEventStream> {
        let headers = self.dialect.headers(&req.passthrough_headers);
        let resp = self.http.post(&p.url, &req.request_id, headers, p.body).await?;
        let counting = counting_for(&req, model);
        let output = Output::Native { drop_usage_only: p.drop_usage_only, fill_input: false };
        let head = stream::iter([start(model)]);
        if req.stream {
            let units = sse_units(resp, p.decoder, self.http.name.clone());
            return Ok(Box::pin(head.chain(stream_answer(units, output, counting))));
        }
        let events = match self.http.body(resp).await {
            Ok(raw) => match (p.whole)(&raw) {
                Ok(deltas) => whole_answer(raw, deltas, output, counting),
                Err(()) => vec![error(&self.http.invalid_answer())],
            },
            Err(e) => vec![error(&e)],
        };
        Ok(Box::pin(head.chain(stream::iter(events))))
    }
}

#[async_trait::async_trait]
impl<D: Dialect> Provider for HttpProvider<D> {
    fn system(&self) -> &'static str {
        self.dialect.system()
    }

    async fn chat(&self, req: ChatRequest) -> Result<ChatEventStream> {
        let model = upstream_model(req.deployment.as_ref());
        let protocol = req.protocol();
        if protocol == Protocol::OpenaiCompletions {
            return self.completions(req, &model).await;
        }
        if protocol == Protocol::OpenaiResponses {
            match self.dialect.responses_url(&model) {
                Some(url) => return self.responses(req, &model, url).await,
                None if responses_wire::asks_provider_state(&req.body) => {
                    return Err(RelayError::invalid_request(format!(
                        "this model group keeps Responses state at the provider, but deployment `{}` ({}) does not serve the Responses API (set `responses_api = true` on an OpenAI provider that does)",
                        req.deployment.as_ref().map_or("", |d| d.id.as_str()),
                        self.dialect.system()
                    )));
                }
                None => {}
            }
        }
        let native = protocol == self.dialect.native();
        let body = if native {
            self.dialect.native_body(&req, &model)?
        } else {
            let mut ir = inbound::parse_request(protocol, &req.body)?;
            // No limit from the client: the deployment's, so the edge's reservation bounds the answer.
            if ir.max_tokens.is_none() {
                ir.max_tokens = default_max_output(&req);
            }
            serde_json::to_vec(&self.dialect.build(&ir, &model, req.stream)?)
                .map_err(|e| RelayError::internal(e.to_string()))?
        };
        let headers = self.dialect.headers(&req.passthrough_headers);
        let resp = self
            .http
            .post(&self.dialect.chat_url(&model, req.stream), &req.request_id, headers, body)
            .await?;
        let counting = counting_for(&req, &model);
        let output = if native {
            Output::Native {
                drop_usage_only: protocol == Protocol::OpenaiChat && !req.client_wants_usage,
                fill_input: protocol == Protocol::AnthropicMessages,
            }
        } else {
            Output::Converted { protocol, ctx: answer_ctx(&req) }
        };
        let head = stream::iter([start(&model)]);
        if req.stream {
            let units = sse_units(resp, self.dialect.decoder(), self.http.name.clone());
            return Ok(Box::pin(head.chain(stream_answer(units, output, counting))));
        }
        let events = match self.http.body(resp).await {
            Ok(raw) => match self.dialect.whole(&raw) {
                Ok(deltas) => whole_answer(raw, deltas, output, counting),
                Err(()) => vec![error(&self.http.invalid_answer())],
            },
            Err(e) => vec![error(&e)],
        };
        Ok(Box::pin(head.chain(stream::iter(events))))
    }

    async fn embed(&self, req: EmbedRequest) -> Result<EmbedResponse> {
        self.dialect.embed(&self.http, req).await
    }

    async fn count_tokens(&self, req: CountTokensRequest) -> Result<CountTokensResponse> {
        let ir = inbound::parse_count_request(req.protocol(), &req.body)?;
        self.dialect.count_tokens(&self.http, &ir, &req).await
    }

    async fn forward(&self, req: ForwardRequest) -> Result<ForwardResponse> {
        let model = upstream_model(req.deployment.as_ref());
        let url = self
            .dialect
            .forward_url(&model, &req.operation)
            .ok_or_else(|| not_forwarded(self.dialect.system(), &req.operation))?;
        let mut headers = self.dialect.headers(&Default::default());
        // A form comes with its model already the upstream's (the edge rewrote that field).
        let body = match req.content_type.as_str() {
            "" => body_for_upstream(&req.body, &model)?.into_bytes(),
            kind => {
                let kind = http::HeaderValue::from_str(kind)
                    .map_err(|_| RelayError::invalid_request("bad content type"))?;
                headers.insert(http::header::CONTENT_TYPE, kind);
                req.body.to_vec()
            }
        };
        let resp = self.http.post(&url, &req.request_id, headers, body).await?;
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        let body = self.http.body(resp).await?;
        let usage = content_type.starts_with("application/json").then(|| forwarded_usage(&body)).flatten();
        Ok(ForwardResponse { body, content_type, usage })
    }
}

/// The deployment's `max_output_tokens`, sent upstream when a request sets no limit of its own.
pub fn default_max_output(req: &ChatRequest) -> Option<u64> {
    req.deployment.as_ref().map(|d| d.max_output_tokens).filter(|m| *m > 0)
}

/// Relay's counting for one call: the upstream model's tokenizer over the client's request.
pub fn counting_for(req: &ChatRequest, upstream_model: &str) -> Counting {
    Counting::new(crate::tokens::Tokenizer::for_model(upstream_model), req.protocol(), req.body.clone())
}

pub fn answer_ctx(req: &ChatRequest) -> AnswerCtx {
    AnswerCtx {
        request_id: req.request_id.clone(),
        model: req.client_model.clone(),
        created: relay_core::ids::now_ms() / 1000,
        include_usage: req.client_wants_usage,
    }
}

/// The provider's credential as one header (`name: format(key)`), empty when it has no key.
pub fn credential(
    cfg: &crate::config::ProviderConfig,
    name: &'static str,
    format: impl Fn(&str) -> String,
) -> anyhow::Result<HeaderMap> {
    let mut h = HeaderMap::new();
    if let Some(key) = &cfg.api_key {
        h.insert(name, http::HeaderValue::from_str(&format(key.expose()))?);
    }
    Ok(h)
}

/// The configured base URL without a trailing slash, or the provider's public default.
pub fn base_url(cfg: &crate::config::ProviderConfig, default: &str) -> String {
    cfg.base_url.as_deref().unwrap_or(default).trim_end_matches('/').to_owned()
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

/// Bytes for the client, with the output tokens produced up to and including them.
pub fn chunk_counted(data: Bytes, output_tokens: u64) -> ChatEvent {
    ev(Event::Chunk(pb::Chunk { data, output_tokens }))
}

pub fn finish(choice_index: u32, reason: pb::FinishReason) -> ChatEvent {
    ev(Event::Finish(pb::Finish { choice_index, reason: reason as i32 }))
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
    if matches!(status, 401 | 403) {
        // Relay's own credential for this provider was refused (revoked key, region, permissions): the
        // operator's problem, not the caller's. Never relayed as the caller's 401/403, never with the
        // provider's message (it can quote key fragments); retryable, so the next deployment is tried.
        tracing::error!(provider, status, "upstream provider refused Relay's credentials");
        metrics::counter!("relay_upstream_auth_failures_total", "provider" => provider.to_owned())
            .increment(1);
        return RelayError::new(
            ErrorCode::Unavailable,
            format!("upstream provider `{provider}` refused Relay's credentials (HTTP {status})"),
        )
        .with_upstream_status(status);
    }
    let message = if (400..500).contains(&status) {
        // The provider's words tell the caller what to fix; what they say about Relay's account (key
        // fragments, organisation and project ids) is masked.
        provider_message(&body)
            .map(|m| relay_telemetry::redact::upstream_message(&m))
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
    let err = if v.is_array() { v.get(0)?.get("error")? } else { v.get("error")? };
    let msg = err.get("message").and_then(|m| m.as_str()).or_else(|| err.as_str())?;
    Some(msg.chars().take(2000).collect())
}

/// Maps a transport failure (no HTTP answer) to a typed error without leaking addresses.
pub fn transport_error(provider: &str, e: &reqwest::Error) -> RelayError {
    if e.is_timeout() {
        RelayError::new(ErrorCode::UpstreamTimeout, format!("upstream provider `{provider}` timed out"))
    } else {
        RelayError::new(
            ErrorCode::UpstreamUnreachable,
            format!("upstream provider `{provider}` is unreachable"),
        )
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
        assert_eq!(provider_message(br#"[{"error":{"code":400,"message":"gem"}}]"#).as_deref(), Some("gem"));
        assert_eq!(provider_message(b"<html>502</html>"), None);
    }
}
