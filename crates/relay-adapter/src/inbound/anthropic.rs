//! Anthropic Messages as a client protocol: request parsing and answer encoding (whole and streamed).

use bytes::Bytes;
use relay_core::RelayError;
use relay_core::pb::common::v1::TokenUsage;
use serde_json::{Map, Value, json};

use super::{AnswerCtx, StreamEncoder, args_object, bad, opt_f64, opt_str, opt_u64, sse, string_list};
use crate::ir::{self, Delta, Finish, Image, Message, Part, Request, Response, Role, ToolChoice};

// === requests ===

pub fn parse(o: &Map<String, Value>) -> Result<Request, RelayError> {
    let msgs = o
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages", "messages: Field required"))?;
    let max_tokens = opt_u64(o.get("max_tokens"), "max_tokens")?
        .ok_or_else(|| bad("max_tokens", "max_tokens: Field required"))?;
    let mut r = Request {
        model: opt_str(o.get("model")).unwrap_or_default(),
        max_tokens: Some(max_tokens),
        ..Default::default()
    };
    match o.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => r.system.push(s.clone()),
        Some(Value::Array(blocks)) => r.system.extend(blocks.iter().filter_map(|b| opt_str(b.get("text")))),
        Some(_) => {
            return Err(bad("system", "system must be a string or an array of text blocks"));
        }
    }
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages.{i}");
        let parts = blocks(m.get("content"), &at)?;
        match m.get("role").and_then(Value::as_str) {
            Some("user") => r.messages.push(Message { role: Role::User, parts }),
            Some("assistant") => r.messages.push(Message { role: Role::Assistant, parts }),
            // A mid-conversation system turn: upstreams without one get it hoisted into the system prompt.
            Some("system") => r.system.push(ir::text_of(&parts)),
            other => return Err(bad(&at, format!("{at}.role: unexpected role {other:?}"))),
        }
    }
    for t in o.get("tools").and_then(Value::as_array).into_iter().flatten() {
        // Server tools (web search, code execution, ...) have no schema and no equivalent elsewhere.
        let (Some(name), Some(schema)) = (opt_str(t.get("name")), t.get("input_schema")) else {
            continue;
        };
        r.tools.push(ir::Tool {
            name,
            description: opt_str(t.get("description")),
            parameters: schema.clone(),
        });
    }
    if let Some(tc) = o.get("tool_choice").filter(|v| !v.is_null()) {
        r.tool_choice = match tc.get("type").and_then(Value::as_str) {
            Some("auto") => ToolChoice::Auto,
            Some("any") => ToolChoice::Required,
            Some("none") => ToolChoice::None,
            Some("tool") => ToolChoice::Function(
                opt_str(tc.get("name")).ok_or_else(|| bad("tool_choice", "tool_choice.name is required"))?,
            ),
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("tool_choice.type {other:?} is not auto, any, tool or none"),
                ));
            }
        };
        if tc.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
            r.parallel_tool_calls = Some(false);
        }
    }
    r.stop = string_list(o.get("stop_sequences"), "stop_sequences")?;
    r.temperature = opt_f64(o.get("temperature"), "temperature")?;
    r.top_p = opt_f64(o.get("top_p"), "top_p")?;
    r.top_k = opt_u64(o.get("top_k"), "top_k")?;
    let thinking = o.get("thinking").filter(|v| !v.is_null());
    if let Some(t) = thinking.filter(|t| t.get("type").and_then(Value::as_str) != Some("disabled")) {
        r.reasoning = Some(ir::Reasoning {
            effort: None,
            budget_tokens: t.get("budget_tokens").and_then(Value::as_u64),
        });
    }
    let output_config = o.get("output_config");
    if let Some(effort) = output_config.and_then(|c| opt_str(c.get("effort"))) {
        r.reasoning.get_or_insert_with(Default::default).effort = Some(effort);
    }
    let format = output_config.and_then(|c| c.get("format")).or_else(|| o.get("output_format"));
    if let Some(f) = format.filter(|f| f.get("type").and_then(Value::as_str) == Some("json_schema")) {
        r.response_format = Some(ir::ResponseFormat::JsonSchema {
            name: "response".into(),
            schema: f.get("schema").cloned().unwrap_or(json!({})),
            strict: Some(true),
        });
    }
    r.user = o.get("metadata").and_then(|m| opt_str(m.get("user_id")));
    r.stream = o.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok(r)
}

fn blocks(content: Option<&Value>, at: &str) -> Result<Vec<Part>, RelayError> {
    let items = match content {
        Some(Value::String(s)) => return Ok(vec![Part::Text(s.clone())]),
        Some(Value::Array(a)) => a,
        _ => {
            return Err(bad(at, format!("{at}.content must be a string or an array of blocks")));
        }
    };
    let mut parts = Vec::new();
    for (j, b) in items.iter().enumerate() {
        let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
        parts.push(match kind {
            "text" => Part::Text(opt_str(b.get("text")).unwrap_or_default()),
            "image" => Part::Image(image(b.get("source"), &format!("{at}.content.{j}"))?),
            "tool_use" | "server_tool_use" => Part::ToolCall {
                id: opt_str(b.get("id")).unwrap_or_default(),
                name: opt_str(b.get("name")).unwrap_or_default(),
                arguments: b.get("input").map_or_else(|| "{}".into(), Value::to_string),
            },
            "tool_result" => Part::ToolResult {
                id: opt_str(b.get("tool_use_id")).unwrap_or_default(),
                content: match b.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(_)) => ir::text_of(&blocks(b.get("content"), at)?),
                    _ => String::new(),
                },
                is_error: b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            },
            "thinking" => Part::Thinking {
                text: opt_str(b.get("thinking")).unwrap_or_default(),
                // An empty signature (thinking that came from another provider) is no signature.
                signature: opt_str(b.get("signature")).filter(|s| !s.is_empty()),
            },
            "redacted_thinking" => {
                Part::RedactedThinking { data: opt_str(b.get("data")).unwrap_or_default() }
            }
            other => {
                return Err(bad(
                    at,
                    format!("{at}.content.{j}: block type `{other}` cannot be converted for this upstream"),
                ));
            }
        });
    }
    Ok(parts)
}

fn image(source: Option<&Value>, at: &str) -> Result<Image, RelayError> {
    let s = source.ok_or_else(|| bad(at, format!("{at}.source is required")))?;
    match s.get("type").and_then(Value::as_str) {
        Some("base64") => Ok(Image::Base64 {
            media_type: opt_str(s.get("media_type")).unwrap_or_else(|| "image/png".into()),
            data: opt_str(s.get("data")).unwrap_or_default(),
        }),
        Some("url") => Ok(Image::Url(opt_str(s.get("url")).unwrap_or_default())),
        other => Err(bad(at, format!("{at}.source.type {other:?} is not base64 or url"))),
    }
}

// === answers ===

pub fn stop_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "end_turn",
        Finish::StopSequence => "stop_sequence",
        Finish::Length => "max_tokens",
        Finish::ToolCalls => "tool_use",
        Finish::ContentFilter => "refusal",
    }
}

/// Anthropic counts uncached input separately from cache reads and writes.
pub fn usage_json(u: &TokenUsage) -> Value {
    json!({
        "input_tokens": u.input_tokens.saturating_sub(u.cached_input_tokens + u.cache_write_tokens),
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cached_input_tokens,
    })
}

fn message_id(ctx: &AnswerCtx) -> String {
    format!("msg_{}", ctx.request_id.replace('-', ""))
}

fn block_json(p: &Part) -> Option<Value> {
    Some(match p {
        Part::Text(t) if t.is_empty() => return None,
        Part::Text(t) => json!({"type": "text", "text": t}),
        Part::Thinking { text, signature } => {
            json!({"type": "thinking", "thinking": text, "signature": signature.clone().unwrap_or_default()})
        }
        Part::RedactedThinking { data } => json!({"type": "redacted_thinking", "data": data}),
        Part::ToolCall { id, name, arguments } => {
            json!({"type": "tool_use", "id": id, "name": name, "input": args_object(arguments)})
        }
        Part::Image(_) | Part::ToolResult { .. } => return None,
    })
}

pub fn whole(ctx: &AnswerCtx, r: &Response) -> Bytes {
    let choice = r.choices.first().cloned().unwrap_or_default();
    let content: Vec<Value> = choice.parts.iter().filter_map(block_json).collect();
    Bytes::from(
        json!({
            "id": message_id(ctx), "type": "message", "role": "assistant", "model": ctx.model,
            "content": content, "stop_reason": stop_reason(choice.finish.unwrap_or_default()),
            "stop_sequence": null, "usage": usage_json(&r.usage),
        })
        .to_string(),
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    Text(u32),
    Thinking(u32),
}

pub struct Encoder {
    ctx: AnswerCtx,
    started: bool,
    next_index: u32,
    open: Option<Open>,
    /// Content-block index of each tool call (tool blocks stay open until another kind starts).
    tools: Vec<u32>,
    open_tools: Vec<u32>,
    finish: Option<Finish>,
    usage: TokenUsage,
}

impl Encoder {
    pub fn new(ctx: AnswerCtx) -> Self {
        Self {
            ctx,
            started: false,
            next_index: 0,
            open: None,
            tools: vec![],
            open_tools: vec![],
            finish: None,
            usage: TokenUsage::default(),
        }
    }

    fn start(&mut self, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({"id": message_id(&self.ctx), "type": "message", "role": "assistant", "model": self.ctx.model,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage_json(&self.usage)});
        out.push(sse(Some("message_start"), &json!({"type": "message_start", "message": message})));
    }

    fn close(&mut self, out: &mut Vec<Bytes>, keep_tools: bool) {
        if let Some(Open::Text(i) | Open::Thinking(i)) = self.open.take() {
            out.push(sse(Some("content_block_stop"), &json!({"type": "content_block_stop", "index": i})));
        }
        if !keep_tools {
            for i in std::mem::take(&mut self.open_tools) {
                out.push(sse(Some("content_block_stop"), &json!({"type": "content_block_stop", "index": i})));
            }
        }
    }

    fn open_block(&mut self, block: Value, out: &mut Vec<Bytes>) -> u32 {
        let index = self.next_index;
        self.next_index += 1;
        out.push(sse(
            Some("content_block_start"),
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    fn block_delta(index: u32, delta: Value) -> Bytes {
        sse(
            Some("content_block_delta"),
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        )
    }
}

impl StreamEncoder for Encoder {
    fn delta(&mut self, d: &Delta, out: &mut Vec<Bytes>) {
        // Anthropic has one choice.
        let choice = match d {
            Delta::Text { choice, .. }
            | Delta::Thinking { choice, .. }
            | Delta::ThinkingSignature { choice, .. }
            | Delta::RedactedThinking { choice, .. }
            | Delta::ToolCallStart { choice, .. }
            | Delta::ToolCallArgs { choice, .. }
            | Delta::Finish { choice, .. } => *choice,
            Delta::Usage(u) => {
                ir::merge_usage(&mut self.usage, u);
                return;
            }
            Delta::Meta { .. } => return,
        };
        if choice != 0 {
            return;
        }
        self.start(out);
        match d {
            Delta::Text { text, .. } => {
                let index = match self.open {
                    Some(Open::Text(i)) => i,
                    _ => {
                        self.close(out, false);
                        let i = self.open_block(json!({"type": "text", "text": ""}), out);
                        self.open = Some(Open::Text(i));
                        i
                    }
                };
                out.push(Self::block_delta(index, json!({"type": "text_delta", "text": text})));
            }
            Delta::Thinking { text, .. } => {
                let index = match self.open {
                    Some(Open::Thinking(i)) => i,
                    _ => {
                        self.close(out, false);
                        let i = self
                            .open_block(json!({"type": "thinking", "thinking": "", "signature": ""}), out);
                        self.open = Some(Open::Thinking(i));
                        i
                    }
                };
                out.push(Self::block_delta(index, json!({"type": "thinking_delta", "thinking": text})));
            }
            Delta::ThinkingSignature { signature, .. } => {
                if let Some(Open::Thinking(i)) = self.open {
                    out.push(Self::block_delta(
                        i,
                        json!({"type": "signature_delta", "signature": signature}),
                    ));
                }
            }
            Delta::RedactedThinking { data, .. } => {
                self.close(out, false);
                let i = self.open_block(json!({"type": "redacted_thinking", "data": data}), out);
                out.push(sse(Some("content_block_stop"), &json!({"type": "content_block_stop", "index": i})));
            }
            Delta::ToolCallStart { id, name, .. } => {
                self.close(out, true);
                let i =
                    self.open_block(json!({"type": "tool_use", "id": id, "name": name, "input": {}}), out);
                self.tools.push(i);
                self.open_tools.push(i);
            }
            Delta::ToolCallArgs { index, fragment, .. } => {
                if let Some(&block) = self.tools.get(*index as usize).filter(|b| self.open_tools.contains(b))
                {
                    out.push(Self::block_delta(
                        block,
                        json!({"type": "input_json_delta", "partial_json": fragment}),
                    ));
                }
            }
            Delta::Finish { reason, .. } => self.finish = Some(*reason),
            Delta::Usage(_) | Delta::Meta { .. } => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        self.start(out);
        self.close(out, false);
        let reason = self.finish.unwrap_or_default();
        out.push(sse(Some("message_delta"), &json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason(reason), "stop_sequence": null}, "usage": usage_json(&self.usage)})));
        out.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_claude_code_shaped_requests() {
        let body = json!({"model": "m", "max_tokens": 100, "stream": true,
            "system": [{"type": "text", "text": "You are Claude Code."}, {"type": "text", "text": "ctx", "cache_control": {"type": "ephemeral"}}],
            "metadata": {"user_id": "u"}, "thinking": {"type": "enabled", "budget_tokens": 2000},
            "tools": [{"name": "f", "input_schema": {"type": "object"}}, {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
                {"role": "system", "content": "mid-turn note"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                    {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "ok"}]}]}]});
        let r = parse(body.as_object().unwrap()).unwrap();
        assert_eq!(r.system, ["You are Claude Code.", "ctx", "mid-turn note"]);
        assert_eq!(r.tools.len(), 1, "server tools are dropped");
        assert_eq!((r.tool_choice.clone(), r.parallel_tool_calls), (ToolChoice::Required, Some(false)));
        assert_eq!(r.reasoning.clone().unwrap().budget_tokens, Some(2000));
        assert_eq!(r.user.as_deref(), Some("u"));
        assert_eq!(
            r.messages[1].parts[1],
            Part::ToolCall { id: "toolu_1".into(), name: "f".into(), arguments: "{\"a\":1}".into() }
        );
        assert_eq!(
            r.messages[2].parts[0],
            Part::ToolResult { id: "toolu_1".into(), content: "ok".into(), is_error: false }
        );
    }

    #[test]
    fn max_tokens_is_required() {
        let e = parse(json!({"model": "m", "messages": []}).as_object().unwrap()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    fn events(out: &[Bytes]) -> Vec<Value> {
        out.iter()
            .map(|b| {
                let s = std::str::from_utf8(b).unwrap();
                serde_json::from_str(s.split("data: ").nth(1).unwrap().trim()).unwrap()
            })
            .collect()
    }

    #[test]
    fn stream_blocks_open_and_close_in_order() {
        let ctx = AnswerCtx { request_id: "r".into(), model: "m".into(), created: 0, include_usage: false };
        let mut enc = Encoder::new(ctx);
        let mut out = Vec::new();
        for d in [
            Delta::Text { choice: 0, text: "Calling f.".into() },
            Delta::ToolCallStart { choice: 0, index: 0, id: "c".into(), name: "f".into() },
            Delta::ToolCallArgs { choice: 0, index: 0, fragment: "{\"a\":".into() },
            Delta::ToolCallArgs { choice: 0, index: 0, fragment: "1}".into() },
            Delta::Finish { choice: 0, reason: Finish::ToolCalls },
            Delta::Usage(TokenUsage { input_tokens: 10, output_tokens: 20, ..Default::default() }),
        ] {
            enc.delta(&d, &mut out);
        }
        enc.finish(&mut out);
        let types: Vec<String> =
            events(&out).iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
        assert_eq!(
            types,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let evs = events(&out);
        assert_eq!(evs[4]["index"], 1);
        assert_eq!(evs[8]["delta"]["stop_reason"], "tool_use");
        assert_eq!(evs[8]["usage"]["input_tokens"], 10);
    }
}
