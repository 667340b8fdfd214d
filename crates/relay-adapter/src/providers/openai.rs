//! OpenAI Chat Completions upstreams: OpenAI itself, Azure OpenAI, and every OpenAI-compatible API
//! (DeepSeek, Qwen compatible mode, Mistral, Groq, vLLM, Ollama).
//!
//! OpenAI chat in: the client's body is forwarded with only `model` rewritten (and
//! `stream_options.include_usage` forced on for streams, so usage is always exact). Other protocols in:
//! converted through the neutral form.

use super::openai_wire as wire;
use std::collections::HashMap;

use http::HeaderMap;
use relay_core::contracts::Result;
use relay_core::pb::adapter::v1::{ChatRequest, EmbedRequest, EmbedResponse};
use relay_core::pb::common::v1::{Protocol, TokenUsage};
use serde_json::{Map, Value, json};

use super::{Dialect, HttpProvider, base_url, body_for_upstream, credential, upstream_model};
use crate::body::force_include_usage;
use crate::config::{ProviderConfig, ProviderKind};
use crate::ir::{self, Delta, Finish, Part, Request, Role, ToolChoice};
use crate::sse::SseEvent;
use crate::upstream::{Decoder, Http, in_band_error};

pub struct OpenAi {
    base_url: String,
    /// Azure OpenAI: deployment URLs and an `api-version` query.
    azure_api_version: Option<String>,
    /// The upstream serves the Responses API itself (`/responses`).
    responses_api: bool,
}

pub fn provider(cfg: &ProviderConfig) -> anyhow::Result<HttpProvider<OpenAi>> {
    let azure = cfg.kind == ProviderKind::Azure;
    let auth = if azure {
        credential(cfg, "api-key", str::to_owned)?
    } else {
        credential(cfg, "authorization", |k| format!("Bearer {k}"))?
    };
    // Validation makes base_url required for these kinds.
    let base_url = base_url(cfg, "");
    let azure_api_version = azure.then(|| cfg.api_version.clone().unwrap_or_else(|| "2024-10-21".into()));
    let dialect = OpenAi { base_url, azure_api_version, responses_api: cfg.responses_api };
    Ok(HttpProvider { http: Http::new(cfg, auth)?, dialect })
}

impl OpenAi {
    fn url(&self, model: &str, op: &str) -> String {
        match &self.azure_api_version {
            Some(v) => format!("{}/deployments/{model}/{op}?api-version={v}", self.base_url),
            None => format!("{}/{op}", self.base_url),
        }
    }
}

#[async_trait::async_trait]
impl Dialect for OpenAi {
    fn system(&self) -> &'static str {
        if self.azure_api_version.is_some() { "az.ai.openai" } else { "openai" }
    }

    fn native(&self) -> Protocol {
        Protocol::OpenaiChat
    }

    fn responses_url(&self, model: &str) -> Option<String> {
        self.responses_api.then(|| self.url(model, "responses"))
    }

    fn forward_url(&self, model: &str, operation: &str) -> Option<String> {
        Some(self.url(model, operation))
    }

    fn chat_url(&self, model: &str, _stream: bool) -> String {
        self.url(model, "chat/completions")
    }

    fn native_body(&self, req: &ChatRequest, model: &str) -> Result<Vec<u8>> {
        let mut body = body_for_upstream(&req.body, model)?;
        if req.stream {
            force_include_usage(&mut body)?;
        }
        let unset = |f: &str| body.raw(f).is_none_or(|v| v == "null");
        if unset("max_completion_tokens")
            && unset("max_tokens")
            && let Some(max) = super::default_max_output(req)
        {
            // The field every OpenAI model takes (reasoning models refuse `max_tokens`).
            body.set("max_completion_tokens", max.to_string());
        }
        Ok(body.into_bytes())
    }

    fn build(&self, ir: &Request, model: &str, stream: bool) -> Result<Value> {
        Ok(build(ir, model, stream))
    }

    fn decoder(&self) -> Box<dyn Decoder> {
        Box::new(StreamDecoder::default())
    }

    fn whole(&self, body: &[u8]) -> std::result::Result<Vec<Delta>, ()> {
        let v: wire::Answer = serde_json::from_slice(body).map_err(|_| ())?;
        let mut out = vec![Delta::Meta { id: v.id.owned(), model: v.model.owned() }];
        for (i, c) in v.choices.0.as_deref().ok_or(())?.iter().enumerate() {
            let Some(c) = &c.0 else {
                // Not an object: read as `{}` (finished, nothing said).
                out.push(Delta::Finish { choice: i as u32, reason: Finish::Stop });
                continue;
            };
            let choice = c.index.0.unwrap_or(i as u64) as u32;
            if let Some(m) = &c.message.0 {
                if let Some(t) = m.reasoning_content.as_str().filter(|t| !t.is_empty()) {
                    out.push(Delta::Thinking { choice, text: t.to_owned() });
                }
                if let Some(t) = m.content.as_str() {
                    out.push(Delta::Text { choice, text: t.to_owned() });
                }
                for (j, tc) in m.tool_calls.items().iter().enumerate() {
                    let index = j as u32;
                    let tc = tc.0.as_ref();
                    let f = tc.and_then(|t| t.function.0.as_ref());
                    let id = tc.and_then(|t| t.id.owned()).unwrap_or_default();
                    let name = f.and_then(|f| f.name.owned()).unwrap_or_default();
                    out.push(Delta::ToolCallStart { choice, index, id, name });
                    let fragment = f.and_then(|f| f.arguments.owned()).unwrap_or_default();
                    out.push(Delta::ToolCallArgs { choice, index, fragment });
                }
            }
            out.push(Delta::Finish { choice, reason: finish_of(c.finish_reason.as_str().unwrap_or("stop")) });
        }
        out.push(Delta::Usage(v.usage.0.as_ref().map(wire::Usage::to_usage).unwrap_or_default()));
        Ok(out)
    }

    async fn embed(&self, http: &Http, req: EmbedRequest) -> Result<EmbedResponse> {
        let model = upstream_model(req.deployment.as_ref());
        let body = body_for_upstream(&req.body, &model)?.into_bytes();
        let resp =
            http.post(&self.url(&model, "embeddings"), &req.request_id, HeaderMap::new(), body).await?;
        let bytes = http.body(resp).await?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| http.invalid_answer())?;
        let usage = TokenUsage {
            input_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            ..Default::default()
        };
        Ok(EmbedResponse { body: bytes, usage: Some(usage) })
    }
}

pub fn finish_of(s: &str) -> Finish {
    match s {
        "length" => Finish::Length,
        "tool_calls" | "function_call" => Finish::ToolCalls,
        "content_filter" => Finish::ContentFilter,
        _ => Finish::Stop,
    }
}

/// A Chat Completions request from the neutral form.
pub fn build(ir: &Request, model: &str, stream: bool) -> Value {
    let mut messages = Vec::new();
    if !ir.system.is_empty() {
        messages.push(json!({"role": "system", "content": ir.system.join("\n\n")}));
    }
    for m in &ir.messages {
        match m.role {
            Role::User => {
                let mut content = Vec::new();
                for p in &m.parts {
                    match p {
                        Part::ToolResult { id, content: c, .. } => {
                            messages.push(json!({"role": "tool", "tool_call_id": id, "content": c}))
                        }
                        Part::Text(t) => content.push(json!({"type": "text", "text": t})),
                        Part::Image(i) => {
                            content.push(json!({"type": "image_url", "image_url": {"url": i.to_url()}}))
                        }
                        _ => {}
                    }
                }
                if content.len() == 1 && content[0]["type"] == "text" {
                    messages.push(json!({"role": "user", "content": content[0]["text"]}));
                } else if !content.is_empty() {
                    messages.push(json!({"role": "user", "content": content}));
                }
            }
            Role::Assistant => {
                let text = ir::text_of(&m.parts);
                let calls: Vec<Value> = m
                    .parts
                    .iter()
                    .filter_map(|p| match p {
                        Part::ToolCall { id, name, arguments } => Some(json!({"id": id, "type": "function",
                            "function": {"name": name, "arguments": if arguments.is_empty() { "{}" } else { arguments }}})),
                        _ => None,
                    })
                    .collect();
                let mut msg = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { Value::String(text) }});
                if !calls.is_empty() {
                    msg["tool_calls"] = Value::Array(calls);
                }
                messages.push(msg);
            }
        }
    }
    let mut b = Map::new();
    b.insert("model".into(), json!(model));
    b.insert("messages".into(), Value::Array(messages));
    if !ir.tools.is_empty() {
        let tools: Vec<Value> = ir
            .tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": t.name, "parameters": t.parameters});
                if let Some(d) = &t.description {
                    f["description"] = json!(d);
                }
                json!({"type": "function", "function": f})
            })
            .collect();
        b.insert("tools".into(), Value::Array(tools));
        b.insert(
            "tool_choice".into(),
            match &ir.tool_choice {
                ToolChoice::Auto => json!("auto"),
                ToolChoice::None => json!("none"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Function(n) => json!({"type": "function", "function": {"name": n}}),
            },
        );
        if let Some(p) = ir.parallel_tool_calls {
            b.insert("parallel_tool_calls".into(), json!(p));
        }
    }
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            b.insert(k.into(), v);
        }
    };
    put("max_tokens", ir.max_tokens.map(|n| json!(n)));
    put("temperature", ir.temperature.map(|n| json!(n)));
    put("top_p", ir.top_p.map(|n| json!(n)));
    put("presence_penalty", ir.presence_penalty.map(|n| json!(n)));
    put("frequency_penalty", ir.frequency_penalty.map(|n| json!(n)));
    put("seed", ir.seed.map(|n| json!(n)));
    put("n", ir.n.filter(|n| *n > 1).map(|n| json!(n)));
    put("stop", (!ir.stop.is_empty()).then(|| json!(ir.stop)));
    put("user", ir.user.as_ref().map(|u| json!(u)));
    // Only an effort the client named: many compatible servers reject the field, and non-reasoning models
    // reject it too, so a thinking budget from another protocol is not turned into one.
    put("reasoning_effort", ir.reasoning.as_ref().and_then(|r| r.effort.as_ref()).map(|e| json!(e)));
    put("response_format", ir.response_format.as_ref().map(|f| match f {
        ir::ResponseFormat::JsonObject => json!({"type": "json_object"}),
        ir::ResponseFormat::JsonSchema { name, schema, strict } => {
            json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict.unwrap_or(false)}})
        }
    }));
    if stream {
        put("stream", Some(json!(true)));
        put("stream_options", Some(json!({"include_usage": true})));
    }
    Value::Object(b)
}

/// Reads `chat.completion.chunk` events.
#[derive(Default)]
pub struct StreamDecoder {
    /// Tool-call indexes already announced, per choice.
    started: HashMap<u32, Vec<u32>>,
    /// The answer id and model last reported (every chunk repeats them; a `Meta` delta only when they
    /// change, not two strings copied per event).
    meta: Option<(Option<String>, Option<String>)>,
    done: bool,
    finished: bool,
}

impl Decoder for StreamDecoder {
    fn event(&mut self, ev: &SseEvent) -> std::result::Result<Vec<Delta>, relay_core::RelayError> {
        if ev.data.is_empty() {
            return Ok(vec![]);
        }
        if ev.data == "[DONE]" {
            self.done = true;
            return Ok(vec![]);
        }
        let invalid = || {
            relay_core::RelayError::new(
                relay_core::ErrorCode::UpstreamProtocol,
                "upstream sent an invalid stream event",
            )
        };
        let v: wire::Answer = serde_json::from_str(&ev.data).map_err(|_| invalid())?;
        if v.error.0 {
            let v: Value = serde_json::from_str(&ev.data).map_err(|_| invalid())?;
            return Err(in_band_error("openai", &v));
        }
        let mut out = Vec::new();
        let seen = self.meta.as_ref().is_some_and(|(id, model)| {
            id.as_deref() == v.id.as_str() && (v.model.0.is_none() || model.as_deref() == v.model.as_str())
        });
        if v.id.0.is_some() && !seen {
            self.meta = Some((v.id.owned(), v.model.owned()));
            out.push(Delta::Meta { id: v.id.owned(), model: v.model.owned() });
        }
        for c in v.choices.items().iter().filter_map(|c| c.0.as_ref()) {
            let choice = c.index.0.unwrap_or(0) as u32;
            if let Some(d) = &c.delta.0 {
                if let Some(t) = d.reasoning_content.as_str().filter(|t| !t.is_empty()) {
                    out.push(Delta::Thinking { choice, text: t.to_owned() });
                }
                if let Some(t) = d.content.as_str().filter(|t| !t.is_empty()) {
                    out.push(Delta::Text { choice, text: t.to_owned() });
                }
                for tc in d.tool_calls.items().iter().filter_map(|t| t.0.as_ref()) {
                    let index = tc.index.0.unwrap_or(0) as u32;
                    let f = tc.function.0.as_ref();
                    let started = self.started.entry(choice).or_default();
                    if !started.contains(&index) {
                        started.push(index);
                        let id = tc.id.owned().unwrap_or_else(|| format!("call_{choice}_{index}"));
                        let name = f.and_then(|f| f.name.owned()).unwrap_or_default();
                        out.push(Delta::ToolCallStart { choice, index, id, name });
                    }
                    if let Some(a) = f.and_then(|f| f.arguments.as_str()).filter(|a| !a.is_empty()) {
                        out.push(Delta::ToolCallArgs { choice, index, fragment: a.to_owned() });
                    }
                }
            }
            if let Some(r) = c.finish_reason.as_str() {
                self.finished = true;
                out.push(Delta::Finish { choice, reason: finish_of(r) });
            }
        }
        if let Some(u) = &v.usage.0 {
            out.push(Delta::Usage(u.to_usage()));
        }
        Ok(out)
    }

    fn complete(&self) -> bool {
        // Some compatible servers omit `[DONE]`; a finish reason also ends an answer cleanly.
        self.done || self.finished
    }
}
