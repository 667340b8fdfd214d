//! Anthropic Messages upstreams (`x-api-key`, `anthropic-version`, required `max_tokens`, `system` outside
//! the messages). Anthropic in: forwarded byte for byte with only `model` rewritten, beta flags passed on.

use std::collections::HashMap;

use http::HeaderMap;
use relay_core::contracts::Result;
use relay_core::pb::adapter::v1::{CountTokensRequest, CountTokensResponse};
use relay_core::pb::common::v1::{Protocol, TokenUsage};
use relay_core::{ErrorCode, RelayError};
use serde_json::{Map, Value, json};

use super::{Dialect, HttpProvider, base_url, body_for_upstream, credential, upstream_model};
use crate::config::ProviderConfig;
use crate::inbound::args_object;
use crate::ir::{self, Delta, Finish, Part, Request, Role, ToolChoice};
use crate::sse::SseEvent;
use crate::upstream::{Decoder, Http, in_band_error};

/// `max_tokens` when a client protocol leaves it out (Anthropic requires it).
const DEFAULT_MAX_TOKENS: u64 = 4096;

pub struct Anthropic {
    base_url: String,
    version: String,
}

pub fn provider(cfg: &ProviderConfig) -> anyhow::Result<HttpProvider<Anthropic>> {
    let auth = credential(cfg, "x-api-key", str::to_owned)?;
    let dialect = Anthropic {
        base_url: base_url(cfg, "https://api.anthropic.com"),
        version: cfg.api_version.clone().unwrap_or_else(|| "2023-06-01".into()),
    };
    Ok(HttpProvider { http: Http::new(cfg, auth)?, dialect })
}

#[async_trait::async_trait]
impl Dialect for Anthropic {
    fn system(&self) -> &'static str {
        "anthropic"
    }

    fn native(&self) -> Protocol {
        Protocol::AnthropicMessages
    }

    fn chat_url(&self, _model: &str, _stream: bool) -> String {
        format!("{}/v1/messages", self.base_url)
    }

    fn headers(&self, passthrough: &HashMap<String, String>) -> HeaderMap {
        let mut h = HeaderMap::new();
        let version = passthrough.get("anthropic-version").unwrap_or(&self.version);
        if let Ok(v) = http::HeaderValue::from_str(version) {
            h.insert("anthropic-version", v);
        }
        if let Some(Ok(v)) = passthrough.get("anthropic-beta").map(|b| http::HeaderValue::from_str(b)) {
            h.insert("anthropic-beta", v);
        }
        h
    }

    fn build(&self, ir: &Request, model: &str, stream: bool) -> Result<Value> {
        if ir.n.is_some_and(|n| n > 1) {
            return Err(RelayError::invalid_request(
                "this model's upstream returns one choice: `n` must be 1",
            )
            .with_param("n"));
        }
        Ok(build(ir, model, stream))
    }

    fn decoder(&self) -> Box<dyn Decoder> {
        Box::new(StreamDecoder::default())
    }

    fn whole(&self, body: &[u8]) -> std::result::Result<Vec<Delta>, ()> {
        let v: Value = serde_json::from_slice(body).map_err(|_| ())?;
        let mut out = vec![Delta::Meta {
            id: v["id"].as_str().map(str::to_owned),
            model: v["model"].as_str().map(str::to_owned),
        }];
        let mut tools = 0;
        for b in v["content"].as_array().ok_or(())? {
            match b["type"].as_str() {
                Some("text") => {
                    out.push(Delta::Text { choice: 0, text: b["text"].as_str().unwrap_or("").to_owned() })
                }
                Some("thinking") => {
                    out.push(Delta::Thinking {
                        choice: 0,
                        text: b["thinking"].as_str().unwrap_or("").to_owned(),
                    });
                    if let Some(s) = b["signature"].as_str().filter(|s| !s.is_empty()) {
                        out.push(Delta::ThinkingSignature { choice: 0, signature: s.to_owned() });
                    }
                }
                Some("redacted_thinking") => out.push(Delta::RedactedThinking {
                    choice: 0,
                    data: b["data"].as_str().unwrap_or("").to_owned(),
                }),
                Some("tool_use") => {
                    let (id, name) = (
                        b["id"].as_str().unwrap_or("").to_owned(),
                        b["name"].as_str().unwrap_or("").to_owned(),
                    );
                    out.push(Delta::ToolCallStart { choice: 0, index: tools, id, name });
                    out.push(Delta::ToolCallArgs {
                        choice: 0,
                        index: tools,
                        fragment: b["input"].to_string(),
                    });
                    tools += 1;
                }
                _ => {}
            }
        }
        out.push(Delta::Finish {
            choice: 0,
            reason: finish_of(v["stop_reason"].as_str().unwrap_or("end_turn")),
        });
        out.push(Delta::Usage(usage_of(&v["usage"])));
        Ok(out)
    }

    async fn count_tokens(
        &self,
        http: &Http,
        ir: &Request,
        req: &CountTokensRequest,
    ) -> Result<CountTokensResponse> {
        let model = upstream_model(req.deployment.as_ref());
        let body = if req.protocol() == Protocol::AnthropicMessages {
            body_for_upstream(&req.body, &model)?.into_bytes()
        } else {
            let mut b = build(ir, &model, false);
            if let Some(o) = b.as_object_mut() {
                o.remove("max_tokens");
            }
            b.to_string().into_bytes()
        };
        let url = format!("{}/v1/messages/count_tokens", self.base_url);
        let v = http.post_json(&url, &req.request_id, self.headers(&req.passthrough_headers), body).await?;
        let input_tokens = v["input_tokens"].as_u64().ok_or_else(|| http.invalid_answer())?;
        Ok(CountTokensResponse {
            input_tokens,
            exact: true,
            source: relay_core::pb::common::v1::UsageSource::Provider as i32,
        })
    }
}

pub fn finish_of(s: &str) -> Finish {
    match s {
        "max_tokens" | "model_context_window_exceeded" => Finish::Length,
        "tool_use" => Finish::ToolCalls,
        "stop_sequence" => Finish::StopSequence,
        "refusal" => Finish::ContentFilter,
        _ => Finish::Stop,
    }
}

/// Anthropic reports uncached input apart from cache reads and writes; ours counts all input.
pub fn usage_of(u: &Value) -> TokenUsage {
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    let (read, write) = (n("cache_read_input_tokens"), n("cache_creation_input_tokens"));
    let input = if u.get("input_tokens").is_some_and(|v| !v.is_null()) {
        n("input_tokens") + read + write
    } else {
        0
    };
    TokenUsage {
        input_tokens: input,
        output_tokens: n("output_tokens"),
        cached_input_tokens: read,
        cache_write_tokens: write,
        reasoning_tokens: 0,
        ..Default::default()
    }
}

fn block(p: &Part) -> Option<Value> {
    Some(match p {
        Part::Text(t) if t.is_empty() => return None,
        Part::Text(t) => json!({"type": "text", "text": t}),
        Part::Image(ir::Image::Base64 { media_type, data }) => {
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
        }
        Part::Image(ir::Image::Url(u)) => json!({"type": "image", "source": {"type": "url", "url": u}}),
        Part::ToolCall { id, name, arguments } => {
            json!({"type": "tool_use", "id": id, "name": name, "input": args_object(arguments)})
        }
        Part::ToolResult { id, content, is_error } => {
            let mut b = json!({"type": "tool_result", "tool_use_id": id, "content": content});
            if *is_error {
                b["is_error"] = json!(true);
            }
            b
        }
        // Anthropic only accepts thinking it signed itself.
        Part::Thinking { text, signature: Some(s) } => {
            json!({"type": "thinking", "thinking": text, "signature": s})
        }
        Part::Thinking { signature: None, .. } => return None,
        Part::RedactedThinking { data } => json!({"type": "redacted_thinking", "data": data}),
    })
}

/// A Messages request from the neutral form.
pub fn build(ir: &Request, model: &str, stream: bool) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    for m in &ir.messages {
        let role = if m.role == Role::User { "user" } else { "assistant" };
        let blocks: Vec<Value> = m.parts.iter().filter_map(block).collect();
        if blocks.is_empty() {
            continue;
        }
        // Consecutive turns of one role merge: Anthropic wants them alternating.
        match messages.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(a) = last["content"].as_array_mut() {
                    a.extend(blocks);
                }
            }
            _ => messages.push(json!({"role": role, "content": blocks})),
        }
    }
    let mut system = ir.system.join("\n\n");
    if ir.response_format == Some(ir::ResponseFormat::JsonObject) {
        // No JSON mode without a schema here: ask for it the way the API documents.
        system.push_str(if system.is_empty() {
            "Respond with a single JSON object and nothing else."
        } else {
            "\n\nRespond with a single JSON object and nothing else."
        });
    }
    let mut max_tokens = ir.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let mut b = Map::new();
    b.insert("model".into(), json!(model));
    if !system.is_empty() {
        b.insert("system".into(), json!(system));
    }
    b.insert("messages".into(), Value::Array(messages));
    if !ir.tools.is_empty() && ir.tool_choice != ToolChoice::None {
        let tools: Vec<Value> = ir
            .tools
            .iter()
            .map(|t| {
                let mut v = json!({"name": t.name, "input_schema": t.parameters});
                if let Some(d) = &t.description {
                    v["description"] = json!(d);
                }
                v
            })
            .collect();
        b.insert("tools".into(), Value::Array(tools));
        let mut choice = match &ir.tool_choice {
            ToolChoice::Auto | ToolChoice::None => json!({"type": "auto"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::Function(n) => json!({"type": "tool", "name": n}),
        };
        if ir.parallel_tool_calls == Some(false) {
            choice["disable_parallel_tool_use"] = json!(true);
        }
        b.insert("tool_choice".into(), choice);
    }
    if let Some(r) = &ir.reasoning {
        let budget = r.budget().max(1024);
        // The thinking budget must fit inside max_tokens.
        if max_tokens <= budget {
            max_tokens = budget + DEFAULT_MAX_TOKENS;
        }
        b.insert("thinking".into(), json!({"type": "enabled", "budget_tokens": budget}));
    }
    b.insert("max_tokens".into(), json!(max_tokens));
    if let Some(ir::ResponseFormat::JsonSchema { schema, .. }) = &ir.response_format {
        b.insert("output_config".into(), json!({"format": {"type": "json_schema", "schema": schema}}));
    }
    if !ir.stop.is_empty() {
        b.insert("stop_sequences".into(), json!(ir.stop));
    }
    // Extended thinking runs at the API's own sampling settings; sending them is an error.
    if ir.reasoning.is_none() {
        if let Some(t) = ir.temperature {
            b.insert("temperature".into(), json!(t.min(1.0)));
        }
        if let Some(p) = ir.top_p {
            b.insert("top_p".into(), json!(p));
        }
        if let Some(k) = ir.top_k {
            b.insert("top_k".into(), json!(k));
        }
    }
    if let Some(u) = &ir.user {
        b.insert("metadata".into(), json!({"user_id": u}));
    }
    if stream {
        b.insert("stream".into(), json!(true));
    }
    Value::Object(b)
}

#[derive(Debug, Clone, Copy)]
enum Block {
    Text,
    Thinking,
    Tool(u32),
    Other,
}

/// Reads Messages stream events.
#[derive(Default)]
pub struct StreamDecoder {
    blocks: HashMap<u64, Block>,
    tools: u32,
    stopped: bool,
}

impl Decoder for StreamDecoder {
    fn event(&mut self, ev: &SseEvent) -> std::result::Result<Vec<Delta>, RelayError> {
        if ev.data.is_empty() {
            return Ok(vec![]);
        }
        let v: Value = serde_json::from_str(&ev.data).map_err(|_| {
            RelayError::new(ErrorCode::UpstreamProtocol, "upstream sent an invalid stream event")
        })?;
        let mut out = Vec::new();
        match v["type"].as_str().or(ev.event.as_deref()) {
            Some("message_start") => {
                let m = &v["message"];
                out.push(Delta::Meta {
                    id: m["id"].as_str().map(str::to_owned),
                    model: m["model"].as_str().map(str::to_owned),
                });
                out.push(Delta::Usage(usage_of(&m["usage"])));
            }
            Some("content_block_start") => {
                let index = v["index"].as_u64().unwrap_or(0);
                let b = &v["content_block"];
                let kind = match b["type"].as_str() {
                    Some("text") => {
                        if let Some(t) = b["text"].as_str().filter(|t| !t.is_empty()) {
                            out.push(Delta::Text { choice: 0, text: t.to_owned() });
                        }
                        Block::Text
                    }
                    Some("thinking") => Block::Thinking,
                    Some("redacted_thinking") => {
                        out.push(Delta::RedactedThinking {
                            choice: 0,
                            data: b["data"].as_str().unwrap_or("").to_owned(),
                        });
                        Block::Other
                    }
                    Some("tool_use" | "server_tool_use") => {
                        let i = self.tools;
                        self.tools += 1;
                        let (id, name) = (
                            b["id"].as_str().unwrap_or("").to_owned(),
                            b["name"].as_str().unwrap_or("").to_owned(),
                        );
                        out.push(Delta::ToolCallStart { choice: 0, index: i, id, name });
                        Block::Tool(i)
                    }
                    _ => Block::Other,
                };
                self.blocks.insert(index, kind);
            }
            Some("content_block_delta") => {
                let kind =
                    self.blocks.get(&v["index"].as_u64().unwrap_or(0)).copied().unwrap_or(Block::Other);
                let d = &v["delta"];
                let s = |k: &str| d[k].as_str().unwrap_or("").to_owned();
                match (d["type"].as_str(), kind) {
                    (Some("text_delta"), _) => out.push(Delta::Text { choice: 0, text: s("text") }),
                    (Some("thinking_delta"), _) => {
                        out.push(Delta::Thinking { choice: 0, text: s("thinking") })
                    }
                    (Some("signature_delta"), _) => {
                        out.push(Delta::ThinkingSignature { choice: 0, signature: s("signature") })
                    }
                    (Some("input_json_delta"), Block::Tool(index)) if !s("partial_json").is_empty() => {
                        out.push(Delta::ToolCallArgs { choice: 0, index, fragment: s("partial_json") })
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                if let Some(r) = v["delta"]["stop_reason"].as_str() {
                    out.push(Delta::Finish { choice: 0, reason: finish_of(r) });
                }
                out.push(Delta::Usage(usage_of(&v["usage"])));
            }
            Some("message_stop") => self.stopped = true,
            Some("error") => return Err(in_band_error("anthropic", &v)),
            _ => {}
        }
        Ok(out)
    }

    fn complete(&self) -> bool {
        self.stopped
    }
}
