//! OpenAI and every OpenAI-compatible API (DeepSeek, Qwen compatible mode, Mistral, Groq, vLLM, Ollama).
//!
//! OpenAI chat in, OpenAI chat out: the client's body is forwarded with only `model` rewritten (and
//! `stream_options.include_usage` forced on for streams, so usage is always exact); answer bytes are passed
//! through untouched, except the usage chunk, which is withheld when the client did not ask for it.

use std::time::Duration;

use futures_util::{Stream, StreamExt, stream};
use relay_core::contracts::{ChatEventStream, Result};
use relay_core::pb::adapter::v1::{ChatEvent, ChatRequest, EmbedRequest, EmbedResponse};
use relay_core::pb::common::v1::{Protocol, TokenUsage};
use relay_core::{ErrorCode, RelayError};
use serde::Deserialize;

use super::{
    Provider, chunk, error, finish, finish_reason_from_openai, start, transport_error, upstream_error, usage,
};
use super::{body_for_upstream, upstream_model};
use crate::body::force_include_usage;
use crate::config::ProviderConfig;
use crate::sse::SseParser;

pub struct OpenAi {
    name: String,
    base_url: String,
    headers: http::HeaderMap,
    http: reqwest::Client,
}

impl OpenAi {
    pub fn new(cfg: &ProviderConfig) -> anyhow::Result<Self> {
        let mut headers = http::HeaderMap::new();
        if let Some(key) = &cfg.api_key {
            let mut v = http::HeaderValue::from_str(&format!("Bearer {}", key.expose()))?;
            v.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, v);
        }
        for (k, v) in &cfg.headers {
            headers.insert(
                http::HeaderName::from_bytes(k.as_bytes())?,
                http::HeaderValue::from_str(v)?,
            );
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .read_timeout(Duration::from_secs(cfg.read_timeout_secs))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        let base_url = cfg
            .base_url
            .clone()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            name: cfg.name.clone(),
            base_url,
            headers,
            http,
        })
    }

    async fn post(&self, path: &str, request_id: &str, body: Vec<u8>) -> Result<reqwest::Response> {
        let mut headers = self.headers.clone();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = http::HeaderValue::from_str(request_id) {
            headers.insert("x-request-id", v);
        }
        relay_telemetry::inject_current_into_headers(&mut headers);
        let resp = self
            .http
            .post(format!("{}{path}", self.base_url))
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error(&self.name, &e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(upstream_error(&self.name, resp).await)
        }
    }
}

#[async_trait::async_trait]
impl Provider for OpenAi {
    fn system(&self) -> &'static str {
        "openai"
    }

    async fn chat(&self, req: ChatRequest) -> Result<ChatEventStream> {
        if req.protocol() != Protocol::OpenaiChat {
            return Err(RelayError::internal(
                "this provider cannot convert the request's protocol",
            ));
        }
        let upstream_model = upstream_model(req.deployment.as_ref());
        let mut body = body_for_upstream(&req.body, &upstream_model)?;
        if req.stream {
            force_include_usage(&mut body)?;
        }
        let resp = self
            .post("/chat/completions", &req.request_id, body.into_bytes())
            .await?;
        let first = stream::iter([start(&upstream_model)]);
        if req.stream {
            Ok(Box::pin(first.chain(pass_through_stream(
                resp,
                req.client_wants_usage,
                self.name.clone(),
            ))))
        } else {
            let events = match resp.bytes().await {
                Ok(bytes) => whole_response_events(bytes),
                Err(e) => vec![error(&transport_error(&self.name, &e))],
            };
            Ok(Box::pin(first.chain(stream::iter(events))))
        }
    }

    async fn embed(&self, req: EmbedRequest) -> Result<EmbedResponse> {
        let upstream_model = upstream_model(req.deployment.as_ref());
        let body = body_for_upstream(&req.body, &upstream_model)?;
        let resp = self
            .post("/embeddings", &req.request_id, body.into_bytes())
            .await?;
        let bytes = resp.bytes().await.map_err(|e| transport_error(&self.name, &e))?;
        let parsed: EmbedUsageOnly = serde_json::from_slice(&bytes).map_err(|_| bad_json(&self.name))?;
        let usage = TokenUsage {
            input_tokens: parsed.usage.unwrap_or_default().prompt_tokens,
            ..Default::default()
        };
        Ok(EmbedResponse {
            body: bytes,
            usage: Some(usage),
        })
    }
}

fn bad_json(provider: &str) -> RelayError {
    RelayError::new(
        ErrorCode::UpstreamProtocol,
        format!("upstream provider `{provider}` sent an invalid answer"),
    )
}

// === answer parsing (only the fields we account for) ===

#[derive(Deserialize, Default)]
struct OaUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize, Default)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl OaUsage {
    fn to_pb(&self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.prompt_tokens,
            output_tokens: self.completion_tokens,
            cached_input_tokens: self
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            cache_write_tokens: 0,
            reasoning_tokens: self
                .completion_tokens_details
                .as_ref()
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct OaChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    finish_reason: Option<String>,
}

/// A completion or a stream chunk; also catches an `error` object sent in-band.
#[derive(Deserialize)]
struct OaAnswer {
    #[serde(default)]
    choices: Vec<OaChoice>,
    #[serde(default)]
    usage: Option<OaUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct EmbedUsageOnly {
    #[serde(default)]
    usage: Option<EmbedUsage>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct EmbedUsage {
    #[serde(default)]
    prompt_tokens: u64,
}

fn whole_response_events(bytes: bytes::Bytes) -> Vec<ChatEvent> {
    let Ok(answer) = serde_json::from_slice::<OaAnswer>(&bytes) else {
        return vec![error(&bad_json("upstream"))];
    };
    let mut events = vec![chunk(bytes)];
    for c in &answer.choices {
        if let Some(r) = &c.finish_reason {
            events.push(finish(c.index, finish_reason_from_openai(r)));
        }
    }
    events.push(usage(answer.usage.map(|u| u.to_pb()).unwrap_or_default()));
    events
}

/// Forwards SSE events as they arrive, reading finish reasons and usage on the way.
fn pass_through_stream(
    resp: reqwest::Response,
    client_wants_usage: bool,
    provider: String,
) -> impl Stream<Item = ChatEvent> + Send {
    struct State {
        body: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
        parser: SseParser,
        usage: Option<TokenUsage>,
        saw_done: bool,
        over: bool,
    }
    let state = State {
        body: Box::pin(resp.bytes_stream()),
        parser: SseParser::default(),
        usage: None,
        saw_done: false,
        over: false,
    };
    stream::unfold(state, move |mut st| {
        let provider = provider.clone();
        async move {
            if st.over {
                return None;
            }
            let mut out = Vec::new();
            match st.body.next().await {
                Some(Ok(bytes)) => {
                    st.parser.push(&bytes);
                    while let Some(event) = st.parser.next_event() {
                        if event.data == "[DONE]" {
                            st.saw_done = true;
                            out.push(chunk(event.raw));
                            continue;
                        }
                        if event.data.is_empty() {
                            continue; // comments / keep-alives: nothing for the client
                        }
                        let Ok(answer) = serde_json::from_str::<OaAnswer>(&event.data) else {
                            out.push(error(&bad_json(&provider)));
                            st.over = true;
                            break;
                        };
                        if answer.error.is_some() {
                            let msg = format!("upstream provider `{provider}` failed mid-stream");
                            out.push(error(&RelayError::new(ErrorCode::UpstreamServerError, msg)));
                            st.over = true;
                            break;
                        }
                        for c in &answer.choices {
                            if let Some(r) = &c.finish_reason {
                                out.push(finish(c.index, finish_reason_from_openai(r)));
                            }
                        }
                        let usage_only = answer.choices.is_empty() && answer.usage.is_some();
                        if let Some(u) = &answer.usage {
                            st.usage = Some(u.to_pb());
                        }
                        if !usage_only || client_wants_usage {
                            out.push(chunk(event.raw));
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "upstream stream broke");
                    let msg = format!("upstream provider `{provider}` stream was interrupted");
                    out.push(error(&RelayError::new(ErrorCode::UpstreamServerError, msg)));
                    st.over = true;
                }
                None => {
                    st.over = true;
                    if st.saw_done {
                        if st.usage.is_none() {
                            metrics::counter!("relay_upstream_usage_missing_total").increment(1);
                            tracing::warn!("upstream stream reported no usage");
                        }
                        out.push(usage(st.usage.unwrap_or_default()));
                    } else {
                        let msg = format!("upstream provider `{provider}` ended the stream early");
                        out.push(error(&RelayError::new(ErrorCode::UpstreamServerError, msg)));
                    }
                }
            }
            Some((stream::iter(out), st))
        }
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_core::pb::adapter::v1::FinishReason;
    use relay_core::pb::adapter::v1::chat_event::Event;

    #[test]
    fn whole_answers_yield_chunk_finish_and_exact_usage() {
        let body = br#"{"id":"c","choices":[{"index":0,"finish_reason":"length","message":{"content":"x"}}],
            "usage":{"prompt_tokens":10,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4},
            "completion_tokens_details":{"reasoning_tokens":1}}}"#;
        let evs = whole_response_events(bytes::Bytes::from_static(body));
        assert!(matches!(&evs[0].event, Some(Event::Chunk(c)) if c.data == body.to_vec()));
        assert!(matches!(&evs[1].event, Some(Event::Finish(f)) if f.reason == FinishReason::Length as i32));
        let Some(Event::Usage(u)) = &evs[2].event else {
            panic!("{evs:?}")
        };
        assert_eq!(
            (
                u.input_tokens,
                u.output_tokens,
                u.cached_input_tokens,
                u.reasoning_tokens
            ),
            (10, 3, 4, 1)
        );
        assert!(matches!(
            &whole_response_events(bytes::Bytes::from_static(b"nope"))[0].event,
            Some(Event::Error(_))
        ));
    }
}
