//! OpenAI Chat Completions as a client protocol: request parsing and answer encoding (whole and streamed).

use bytes::Bytes;
use relay_core::RelayError;
use relay_core::pb::common::v1::TokenUsage;
use serde_json::{Map, Value, json};

use super::{AnswerCtx, StreamEncoder, bad, json_text, opt_f64, opt_str, opt_u64, sse, string_list};
use crate::ir::{self, Delta, Finish, Image, Message, Part, Request, Response, Role, ToolChoice};

// === requests ===

pub fn parse(o: &Map<String, Value>) -> Result<Request, RelayError> {
    let msgs = o
        .get("messages")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("messages", "`messages` must be a non-empty array"))?;
    let mut r = Request { model: opt_str(o.get("model")).unwrap_or_default(), ..Default::default() };
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(&at, format!("{at}.role is required")))?;
        match role {
            "system" | "developer" => r.system.push(plain_text(m.get("content"), &at)?),
            "user" => push(&mut r.messages, Role::User, content_parts(m.get("content"), &at)?),
            "assistant" => {
                let mut parts = Vec::new();
                if let Some(t) = m.get("reasoning_content").and_then(Value::as_str).filter(|t| !t.is_empty())
                {
                    parts.push(Part::Thinking { text: t.to_owned(), signature: None });
                }
                parts.extend(content_parts(m.get("content"), &at)?);
                for (j, tc) in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate()
                {
                    let f = tc
                        .get("function")
                        .ok_or_else(|| bad(&at, format!("{at}.tool_calls[{j}].function is required")))?;
                    parts.push(Part::ToolCall {
                        id: opt_str(tc.get("id")).unwrap_or_else(|| format!("call_{i}_{j}")),
                        name: opt_str(f.get("name")).unwrap_or_default(),
                        arguments: f.get("arguments").map(json_text).unwrap_or_else(|| "{}".into()),
                    });
                }
                push(&mut r.messages, Role::Assistant, parts);
            }
            "tool" | "function" => {
                let id = opt_str(m.get("tool_call_id")).or_else(|| opt_str(m.get("name")));
                let id = id.ok_or_else(|| bad(&at, format!("{at}.tool_call_id is required")))?;
                let content = plain_text(m.get("content"), &at)?;
                push(&mut r.messages, Role::User, vec![Part::ToolResult { id, content, is_error: false }]);
            }
            other => {
                return Err(bad(
                    &at,
                    format!("{at}.role `{other}` is not one of system, user, assistant, tool"),
                ));
            }
        }
    }
    for (i, t) in o.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let f = t.get("function").ok_or_else(|| bad("tools", format!("tools[{i}].function is required")))?;
        r.tools.push(tool(f, &format!("tools[{i}]"))?);
    }
    for (i, f) in o.get("functions").and_then(Value::as_array).into_iter().flatten().enumerate() {
        r.tools.push(tool(f, &format!("functions[{i}]"))?);
    }
    r.tool_choice = tool_choice(o.get("tool_choice").or_else(|| o.get("function_call")))?;
    r.max_tokens = match opt_u64(o.get("max_completion_tokens"), "max_completion_tokens")? {
        Some(n) => Some(n),
        None => opt_u64(o.get("max_tokens"), "max_tokens")?,
    };
    r.temperature = opt_f64(o.get("temperature"), "temperature")?;
    r.top_p = opt_f64(o.get("top_p"), "top_p")?;
    r.presence_penalty = opt_f64(o.get("presence_penalty"), "presence_penalty")?;
    r.frequency_penalty = opt_f64(o.get("frequency_penalty"), "frequency_penalty")?;
    r.seed = o.get("seed").and_then(Value::as_i64);
    r.stop = string_list(o.get("stop"), "stop")?;
    r.n = opt_u64(o.get("n"), "n")?.map(|n| n.min(128) as u32);
    r.response_format = response_format(o.get("response_format"))?;
    r.reasoning =
        opt_str(o.get("reasoning_effort")).map(|e| ir::Reasoning { effort: Some(e), budget_tokens: None });
    r.parallel_tool_calls = o.get("parallel_tool_calls").and_then(Value::as_bool);
    r.user = opt_str(o.get("user"));
    r.stream = o.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok(r)
}

/// Appends parts to the last message when it has the same role (consecutive tool results become one
/// user turn), else starts a new message.
fn push(messages: &mut Vec<Message>, role: Role, parts: Vec<Part>) {
    match messages.last_mut() {
        Some(last)
            if last.role == role
                && role == Role::User
                && parts.iter().all(|p| matches!(p, Part::ToolResult { .. }))
                && last.parts.iter().all(|p| matches!(p, Part::ToolResult { .. })) =>
        {
            last.parts.extend(parts)
        }
        _ => messages.push(Message { role, parts }),
    }
}

fn plain_text(content: Option<&Value>, at: &str) -> Result<String, RelayError> {
    Ok(ir::text_of(&content_parts(content, at)?))
}

fn content_parts(content: Option<&Value>, at: &str) -> Result<Vec<Part>, RelayError> {
    match content {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![Part::Text(s.clone())]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(j, p)| match p.get("type").and_then(Value::as_str) {
                Some("text" | "input_text") => Ok(Part::Text(opt_str(p.get("text")).unwrap_or_default())),
                Some("image_url") => {
                    let iu = p.get("image_url");
                    let url = iu.and_then(|u| u.get("url")).or(iu).and_then(Value::as_str);
                    url.map(|u| Part::Image(Image::from_url(u)))
                        .ok_or_else(|| bad(at, format!("{at}.content[{j}].image_url.url is required")))
                }
                other => Err(bad(at, format!("{at}.content[{j}]: unsupported content part type {other:?}"))),
            })
            .collect(),
        Some(_) => Err(bad(at, format!("{at}.content must be a string or an array of parts"))),
    }
}

fn tool(f: &Value, at: &str) -> Result<ir::Tool, RelayError> {
    Ok(ir::Tool {
        name: opt_str(f.get("name")).ok_or_else(|| bad("tools", format!("{at}.name is required")))?,
        description: opt_str(f.get("description")),
        parameters: f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
    })
}

fn tool_choice(v: Option<&Value>) -> Result<ToolChoice, RelayError> {
    Ok(match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" | "any" => ToolChoice::Required,
            other => return Err(bad("tool_choice", format!("unknown tool_choice `{other}`"))),
        },
        Some(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| o.get("name"))
                .and_then(Value::as_str);
            ToolChoice::Function(
                name.ok_or_else(|| bad("tool_choice", "tool_choice.function.name is required"))?.into(),
            )
        }
    })
}

fn response_format(v: Option<&Value>) -> Result<Option<ir::ResponseFormat>, RelayError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    Ok(match v.get("type").and_then(Value::as_str) {
        Some("text") => None,
        Some("json_object") => Some(ir::ResponseFormat::JsonObject),
        Some("json_schema") => {
            let js = v
                .get("json_schema")
                .ok_or_else(|| bad("response_format", "response_format.json_schema is required"))?;
            Some(ir::ResponseFormat::JsonSchema {
                name: opt_str(js.get("name")).unwrap_or_else(|| "response".into()),
                schema: js.get("schema").cloned().unwrap_or(json!({})),
                strict: js.get("strict").and_then(Value::as_bool),
            })
        }
        other => {
            return Err(bad("response_format", format!("unsupported response_format type {other:?}")));
        }
    })
}

// === answers ===

pub fn finish_str(f: Finish) -> &'static str {
    match f {
        Finish::Stop | Finish::StopSequence => "stop",
        Finish::Length => "length",
        Finish::ToolCalls => "tool_calls",
        Finish::ContentFilter => "content_filter",
    }
}

pub fn usage_json(u: &TokenUsage) -> Value {
    let mut v = json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
    });
    if u.cached_input_tokens > 0 {
        v["prompt_tokens_details"] = json!({"cached_tokens": u.cached_input_tokens});
    }
    if u.reasoning_tokens > 0 {
        v["completion_tokens_details"] = json!({"reasoning_tokens": u.reasoning_tokens});
    }
    v
}

fn completion_id(ctx: &AnswerCtx) -> String {
    format!("chatcmpl-{}", ctx.request_id)
}

pub fn whole(ctx: &AnswerCtx, r: &Response) -> Bytes {
    let choices: Vec<Value> = r
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let text = ir::text_of(&c.parts);
            let calls: Vec<Value> = c
                .parts
                .iter()
                .filter_map(|p| match p {
                    Part::ToolCall { id, name, arguments } => {
                        Some(json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
                    }
                    _ => None,
                })
                .collect();
            let mut msg = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }, "refusal": null});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            let thinking: String =
                c.parts.iter().filter_map(|p| if let Part::Thinking { text, .. } = p { Some(text.as_str()) } else { None }).collect();
            if !thinking.is_empty() {
                msg["reasoning_content"] = Value::String(thinking);
            }
            json!({"index": i, "message": msg, "logprobs": null, "finish_reason": finish_str(c.finish.unwrap_or_default())})
        })
        .collect();
    let body = json!({
        "id": completion_id(ctx), "object": "chat.completion", "created": ctx.created, "model": ctx.model,
        "choices": choices, "usage": usage_json(&r.usage),
    });
    Bytes::from(body.to_string())
}

pub struct Encoder {
    ctx: AnswerCtx,
    id: String,
    /// Choices whose first (role) chunk was sent.
    started: Vec<u32>,
    usage: TokenUsage,
}

impl Encoder {
    pub fn new(ctx: AnswerCtx) -> Self {
        let id = completion_id(&ctx);
        Self { ctx, id, started: Vec::new(), usage: TokenUsage::default() }
    }

    fn chunk(&self, choice: u32, delta: Value, finish: Option<Finish>) -> Bytes {
        sse(
            None,
            &json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.ctx.created, "model": self.ctx.model,
                "choices": [{"index": choice, "delta": delta, "logprobs": null, "finish_reason": finish.map(finish_str)}],
            }),
        )
    }

    fn start(&mut self, choice: u32, out: &mut Vec<Bytes>) {
        if !self.started.contains(&choice) {
            self.started.push(choice);
            out.push(self.chunk(choice, json!({"role": "assistant", "content": ""}), None));
        }
    }
}

impl StreamEncoder for Encoder {
    fn delta(&mut self, d: &Delta, out: &mut Vec<Bytes>) {
        match d {
            Delta::Text { choice, text } => {
                self.start(*choice, out);
                out.push(self.chunk(*choice, json!({"content": text}), None));
            }
            Delta::Thinking { choice, text } => {
                self.start(*choice, out);
                out.push(self.chunk(*choice, json!({"reasoning_content": text}), None));
            }
            Delta::ToolCallStart { choice, index, id, name } => {
                self.start(*choice, out);
                let call = json!([{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]);
                out.push(self.chunk(*choice, json!({"tool_calls": call}), None));
            }
            Delta::ToolCallArgs { choice, index, fragment } => {
                let call = json!([{"index": index, "function": {"arguments": fragment}}]);
                out.push(self.chunk(*choice, json!({"tool_calls": call}), None));
            }
            Delta::Finish { choice, reason } => {
                self.start(*choice, out);
                out.push(self.chunk(*choice, json!({}), Some(*reason)));
            }
            Delta::Usage(u) => ir::merge_usage(&mut self.usage, u),
            Delta::Meta { .. } | Delta::ThinkingSignature { .. } | Delta::RedactedThinking { .. } => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        if self.ctx.include_usage {
            out.push(sse(
                None,
                &json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.ctx.created,
                    "model": self.ctx.model, "choices": [], "usage": usage_json(&self.usage),
                }),
            ));
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: Value) -> Result<Request, RelayError> {
        parse(v.as_object().unwrap())
    }

    #[test]
    fn parses_every_message_kind() {
        let r = p(json!({"model": "m", "max_completion_tokens": 9, "stop": "X", "n": 2, "user": "u1",
            "reasoning_effort": "high", "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,QQ=="}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "r1"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "r2"}]}]})).unwrap();
        assert_eq!(r.system, ["sys"]);
        assert_eq!(r.messages.len(), 3);
        assert_eq!(
            r.messages[0].parts[1],
            Part::Image(Image::Base64 { media_type: "image/png".into(), data: "QQ==".into() })
        );
        assert_eq!(
            r.messages[1].parts,
            [Part::ToolCall { id: "c1".into(), name: "f".into(), arguments: "{\"a\":1}".into() }]
        );
        assert_eq!(r.messages[2].parts.len(), 2, "consecutive tool results are one user turn");
        assert_eq!(r.tool_choice, ToolChoice::Function("f".into()));
        assert_eq!(
            (r.max_tokens, r.n, r.stop.clone(), r.user.as_deref()),
            (Some(9), Some(2), vec!["X".to_string()], Some("u1"))
        );
        assert!(matches!(r.response_format, Some(ir::ResponseFormat::JsonSchema { strict: Some(true), .. })));
        assert_eq!(r.reasoning.unwrap().effort.as_deref(), Some("high"));
    }

    #[test]
    fn rejects_bad_shapes_with_a_param() {
        for (body, param) in [
            (json!({"model": "m"}), "messages"),
            (json!({"messages": [{"content": "x"}]}), "messages[0]"),
            (json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0]"),
            (json!({"messages": [{"role": "user", "content": [{"type": "video"}]}]}), "messages[0]"),
            (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}), "max_tokens"),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
        ] {
            let e = p(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{e:?}");
        }
    }
}
