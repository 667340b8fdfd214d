//! The OpenAI Responses API as a client protocol: request parsing and answer encoding. Turns arrive whole
//! (the edge expands `previous_response_id` and `item_reference` from stored state before the call).

use bytes::Bytes;
use relay_core::RelayError;
use relay_core::pb::common::v1::TokenUsage;
use serde_json::{Map, Value, json};

use super::{AnswerCtx, StreamEncoder, bad, json_text, opt_f64, opt_str, opt_u64, sse};
use crate::ir::{self, Delta, Finish, Image, Message, Part, Request, Response, Role, ToolChoice};

// === requests ===

pub fn parse(o: &Map<String, Value>) -> Result<Request, RelayError> {
    if o.get("previous_response_id").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "previous_response_id",
            "previous_response_id reached the adapter unexpanded: the edge expands stored turns before the call; send the whole conversation in `input`",
        ));
    }
    let mut r = Request { model: opt_str(o.get("model")).unwrap_or_default(), ..Default::default() };
    if let Some(i) = opt_str(o.get("instructions")).filter(|s| !s.is_empty()) {
        r.system.push(i);
    }
    match o.get("input") {
        Some(Value::String(s)) => {
            r.messages.push(Message { role: Role::User, parts: vec![Part::Text(s.clone())] })
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(&mut r, item, &format!("input[{i}]"))?;
            }
        }
        _ => return Err(bad("input", "`input` must be a string or an array of items")),
    }
    if r.messages.is_empty() {
        return Err(bad("input", "`input` holds no message"));
    }
    for t in o.get("tools").and_then(Value::as_array).into_iter().flatten() {
        // Hosted tools (web_search, file_search, computer use, ...) have no equivalent on other upstreams.
        if t.get("type").and_then(Value::as_str) == Some("function") {
            r.tools.push(ir::Tool {
                name: opt_str(t.get("name")).ok_or_else(|| bad("tools", "function tools need a name"))?,
                description: opt_str(t.get("description")),
                parameters: t
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            });
        }
    }
    r.tool_choice = match o.get("tool_choice") {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => ToolChoice::Auto,
        },
        Some(v) => match opt_str(v.get("name")) {
            Some(name) => ToolChoice::Function(name),
            None => ToolChoice::Auto,
        },
    };
    r.max_tokens = opt_u64(o.get("max_output_tokens"), "max_output_tokens")?;
    r.temperature = opt_f64(o.get("temperature"), "temperature")?;
    r.top_p = opt_f64(o.get("top_p"), "top_p")?;
    r.parallel_tool_calls = o.get("parallel_tool_calls").and_then(Value::as_bool);
    r.user = opt_str(o.get("user")).or_else(|| opt_str(o.get("safety_identifier")));
    r.reasoning = o
        .get("reasoning")
        .and_then(|v| opt_str(v.get("effort")))
        .map(|e| ir::Reasoning { effort: Some(e), budget_tokens: None });
    if let Some(f) = o.get("text").and_then(|t| t.get("format")) {
        r.response_format = match f.get("type").and_then(Value::as_str) {
            Some("json_object") => Some(ir::ResponseFormat::JsonObject),
            Some("json_schema") => Some(ir::ResponseFormat::JsonSchema {
                name: opt_str(f.get("name")).unwrap_or_else(|| "response".into()),
                schema: f.get("schema").cloned().unwrap_or(json!({})),
                strict: f.get("strict").and_then(Value::as_bool),
            }),
            _ => None,
        };
    }
    r.stream = o.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok(r)
}

fn push(r: &mut Request, role: Role, parts: Vec<Part>) {
    // Calls and their results arrive as separate items; keep them in the turn they belong to.
    let joinable = |p: &Part| matches!(p, Part::ToolCall { .. } | Part::ToolResult { .. });
    match r.messages.last_mut() {
        Some(last) if last.role == role && parts.iter().all(joinable) => last.parts.extend(parts),
        _ => r.messages.push(Message { role, parts }),
    }
}

fn input_item(r: &mut Request, item: &Value, at: &str) -> Result<(), RelayError> {
    let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
    match kind {
        "message" => {
            let parts = content(item.get("content"), at)?;
            match item.get("role").and_then(Value::as_str) {
                Some("user") => push(r, Role::User, parts),
                Some("assistant") => push(r, Role::Assistant, parts),
                Some("system" | "developer") => r.system.push(ir::text_of(&parts)),
                other => {
                    return Err(bad(
                        "input",
                        format!("{at}.role {other:?} is not user, assistant, system or developer"),
                    ));
                }
            }
        }
        "function_call" => push(
            r,
            Role::Assistant,
            vec![Part::ToolCall {
                id: opt_str(item.get("call_id"))
                    .ok_or_else(|| bad("input", format!("{at}.call_id is required")))?,
                name: opt_str(item.get("name")).unwrap_or_default(),
                arguments: item.get("arguments").map_or_else(|| "{}".into(), json_text),
            }],
        ),
        "function_call_output" => push(
            r,
            Role::User,
            vec![Part::ToolResult {
                id: opt_str(item.get("call_id"))
                    .ok_or_else(|| bad("input", format!("{at}.call_id is required")))?,
                content: match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ Value::Array(_)) => ir::text_of(&content(Some(v), at)?),
                    Some(other) => other.to_string(),
                    None => String::new(),
                },
                is_error: false,
            }],
        ),
        // Encrypted reasoning only means something to the model that wrote it.
        "reasoning" => {}
        other => {
            return Err(bad("input", format!("{at}: item type `{other}` is not supported")));
        }
    }
    Ok(())
}

fn content(c: Option<&Value>, at: &str) -> Result<Vec<Part>, RelayError> {
    match c {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![Part::Text(s.clone())]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| match p.get("type").and_then(Value::as_str) {
                Some("input_text" | "output_text" | "text" | "summary_text") => {
                    Ok(Part::Text(opt_str(p.get("text")).unwrap_or_default()))
                }
                Some("refusal") => Ok(Part::Text(opt_str(p.get("refusal")).unwrap_or_default())),
                Some("input_image") => opt_str(p.get("image_url"))
                    .map(|u| Part::Image(Image::from_url(&u)))
                    .ok_or_else(|| bad("input", format!("{at}.content[{j}].image_url is required"))),
                other => Err(bad("input", format!("{at}.content[{j}]: unsupported content type {other:?}"))),
            })
            .collect(),
        Some(_) => Err(bad("input", format!("{at}.content must be a string or an array"))),
    }
}

// === answers ===

pub fn usage_json(u: &TokenUsage) -> Value {
    json!({
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_input_tokens},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.input_tokens + u.output_tokens,
    })
}

fn response_id(ctx: &AnswerCtx) -> String {
    format!("resp_{}", ctx.request_id.replace('-', ""))
}

fn envelope(ctx: &AnswerCtx, status: &str, output: Vec<Value>, usage: Option<&TokenUsage>) -> Value {
    json!({
        "id": response_id(ctx), "object": "response", "created_at": ctx.created, "status": status,
        "error": null,
        "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "instructions": null, "max_output_tokens": null, "model": ctx.model, "output": output,
        "parallel_tool_calls": true, "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
        "store": false, "temperature": null, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": [], "top_p": null, "truncation": "disabled", "metadata": {},
        "usage": usage.map(usage_json),
    })
}

fn item_id(prefix: &str, ctx: &AnswerCtx, n: usize) -> String {
    format!("{prefix}_{}{n}", ctx.request_id.replace('-', ""))
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": status})
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": id, "summary": [{"type": "summary_text", "text": text}]})
}

fn status_of(f: Option<Finish>) -> &'static str {
    if f == Some(Finish::Length) { "incomplete" } else { "completed" }
}

pub fn whole(ctx: &AnswerCtx, r: &Response) -> Bytes {
    let choice = r.choices.first().cloned().unwrap_or_default();
    let output: Vec<Value> = choice
        .parts
        .iter()
        .enumerate()
        .filter_map(|(n, p)| match p {
            Part::Text(t) if !t.is_empty() => Some(message_item(&item_id("msg", ctx, n), t, "completed")),
            Part::Thinking { text, .. } => Some(reasoning_item(&item_id("rs", ctx, n), text)),
            Part::ToolCall { id, name, arguments } => {
                Some(call_item(&item_id("fc", ctx, n), id, name, arguments, "completed"))
            }
            _ => None,
        })
        .collect();
    Bytes::from(envelope(ctx, status_of(choice.finish), output, Some(&r.usage)).to_string())
}

#[derive(Debug)]
enum Item {
    Message { id: String, text: String },
    Reasoning { id: String, text: String },
    Call { id: String, call_id: String, name: String, arguments: String },
}

pub struct Encoder {
    ctx: AnswerCtx,
    seq: u64,
    started: bool,
    items: Vec<Item>,
    /// Output index of the open message/reasoning item, and of each tool call (by tool index).
    open: Option<usize>,
    calls: Vec<usize>,
    open_calls: Vec<usize>,
    finish: Option<Finish>,
    usage: TokenUsage,
}

impl Encoder {
    pub fn new(ctx: AnswerCtx) -> Self {
        Self {
            ctx,
            seq: 0,
            started: false,
            items: vec![],
            open: None,
            calls: vec![],
            open_calls: vec![],
            finish: None,
            usage: TokenUsage::default(),
        }
    }

    fn emit(&mut self, out: &mut Vec<Bytes>, kind: &str, mut body: Value) {
        body["type"] = Value::String(kind.to_owned());
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push(sse(Some(kind), &body));
    }

    fn start(&mut self, out: &mut Vec<Bytes>) {
        if !self.started {
            self.started = true;
            let resp = envelope(&self.ctx, "in_progress", vec![], None);
            self.emit(out, "response.created", json!({"response": resp.clone()}));
            self.emit(out, "response.in_progress", json!({"response": resp}));
        }
    }

    fn item_json(&self, i: usize, status: &str) -> Value {
        match &self.items[i] {
            Item::Message { id, text } => message_item(id, text, status),
            Item::Reasoning { id, text } => reasoning_item(id, text),
            Item::Call { id, call_id, name, arguments } => call_item(id, call_id, name, arguments, status),
        }
    }

    fn add(&mut self, item: Item, out: &mut Vec<Bytes>) -> usize {
        self.items.push(item);
        let i = self.items.len() - 1;
        let mut added = self.item_json(i, "in_progress");
        if let Some(c) = added.get_mut("content") {
            *c = json!([]);
        }
        if let Some(s) = added.get_mut("summary") {
            *s = json!([]);
        }
        if let Some(a) = added.get_mut("arguments") {
            *a = json!("");
        }
        self.emit(out, "response.output_item.added", json!({"output_index": i, "item": added}));
        if let Item::Message { id, .. } = &self.items[i] {
            let id = id.clone();
            self.emit(
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": i, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
            );
        }
        i
    }

    fn done(&mut self, i: usize, out: &mut Vec<Bytes>) {
        match &self.items[i] {
            Item::Message { id, text } => {
                let (id, text) = (id.clone(), text.clone());
                self.emit(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": i, "content_index": 0, "text": text}),
                );
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": i, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": []}}),
                );
            }
            Item::Reasoning { id, text } => {
                let (id, text) = (id.clone(), text.clone());
                self.emit(
                    out,
                    "response.reasoning_summary_text.done",
                    json!({"item_id": id, "output_index": i, "summary_index": 0, "text": text}),
                );
            }
            Item::Call { id, arguments, .. } => {
                let (id, arguments) = (id.clone(), arguments.clone());
                self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": i, "arguments": arguments}),
                );
            }
        }
        let item = self.item_json(i, "completed");
        self.emit(out, "response.output_item.done", json!({"output_index": i, "item": item}));
    }

    fn close(&mut self, out: &mut Vec<Bytes>, keep_calls: bool) {
        if let Some(i) = self.open.take() {
            self.done(i, out);
        }
        if !keep_calls {
            for i in std::mem::take(&mut self.open_calls) {
                self.done(i, out);
            }
        }
    }
}

impl StreamEncoder for Encoder {
    fn delta(&mut self, d: &Delta, out: &mut Vec<Bytes>) {
        if let Delta::Usage(u) = d {
            ir::merge_usage(&mut self.usage, u);
            return;
        }
        let choice = match d {
            Delta::Text { choice, .. }
            | Delta::Thinking { choice, .. }
            | Delta::ToolCallStart { choice, .. }
            | Delta::ToolCallArgs { choice, .. }
            | Delta::Finish { choice, .. } => *choice,
            _ => return,
        };
        if choice != 0 {
            return;
        }
        self.start(out);
        let n = self.items.len();
        match d {
            Delta::Text { text, .. } => {
                let i = match self.open.filter(|i| matches!(self.items[*i], Item::Message { .. })) {
                    Some(i) => i,
                    None => {
                        self.close(out, false);
                        let i = self.add(
                            Item::Message { id: item_id("msg", &self.ctx, n), text: String::new() },
                            out,
                        );
                        self.open = Some(i);
                        i
                    }
                };
                let Item::Message { id, text: acc } = &mut self.items[i] else {
                    return;
                };
                acc.push_str(text);
                let id = id.clone();
                self.emit(
                    out,
                    "response.output_text.delta",
                    json!({"item_id": id, "output_index": i, "content_index": 0, "delta": text}),
                );
            }
            Delta::Thinking { text, .. } => {
                let i = match self.open.filter(|i| matches!(self.items[*i], Item::Reasoning { .. })) {
                    Some(i) => i,
                    None => {
                        self.close(out, false);
                        let i = self.add(
                            Item::Reasoning { id: item_id("rs", &self.ctx, n), text: String::new() },
                            out,
                        );
                        self.open = Some(i);
                        i
                    }
                };
                let Item::Reasoning { id, text: acc } = &mut self.items[i] else {
                    return;
                };
                acc.push_str(text);
                let id = id.clone();
                self.emit(
                    out,
                    "response.reasoning_summary_text.delta",
                    json!({"item_id": id, "output_index": i, "summary_index": 0, "delta": text}),
                );
            }
            Delta::ToolCallStart { id, name, .. } => {
                self.close(out, true);
                let i = self.add(
                    Item::Call {
                        id: item_id("fc", &self.ctx, n),
                        call_id: id.clone(),
                        name: name.clone(),
                        arguments: String::new(),
                    },
                    out,
                );
                self.calls.push(i);
                self.open_calls.push(i);
            }
            Delta::ToolCallArgs { index, fragment, .. } => {
                let Some(&i) = self.calls.get(*index as usize).filter(|i| self.open_calls.contains(i)) else {
                    return;
                };
                let Item::Call { id, arguments, .. } = &mut self.items[i] else {
                    return;
                };
                arguments.push_str(fragment);
                let id = id.clone();
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": i, "delta": fragment}),
                );
            }
            Delta::Finish { reason, .. } => self.finish = Some(*reason),
            _ => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        self.start(out);
        self.close(out, false);
        let status = status_of(self.finish);
        let output: Vec<Value> = (0..self.items.len()).map(|i| self.item_json(i, "completed")).collect();
        let resp = envelope(&self.ctx, status, output, Some(&self.usage));
        let kind = if status == "incomplete" { "response.incomplete" } else { "response.completed" };
        self.emit(out, kind, json!({"response": resp}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_codex_shaped_stateless_turns() {
        let body = json!({"model": "m", "instructions": "be useful", "stream": true, "max_output_tokens": 50,
            "reasoning": {"effort": "low"}, "text": {"format": {"type": "json_object"}},
            "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}, {"type": "web_search"}],
            "input": [
                {"type": "message", "role": "developer", "content": "dev note"},
                {"role": "user", "content": [{"type": "input_text", "text": "list files"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xyz"},
                {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": "{\"cmd\":\"ls\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"}]});
        let r = parse(body.as_object().unwrap()).unwrap();
        assert_eq!(r.system, ["be useful", "dev note"]);
        assert_eq!(r.tools.len(), 1);
        assert_eq!(r.messages.len(), 3);
        assert_eq!(
            r.messages[1].parts[0],
            Part::ToolCall {
                id: "call_1".into(),
                name: "shell".into(),
                arguments: "{\"cmd\":\"ls\"}".into()
            }
        );
        assert_eq!(
            r.messages[2].parts[0],
            Part::ToolResult { id: "call_1".into(), content: "a.txt".into(), is_error: false }
        );
        assert_eq!((r.max_tokens, r.response_format), (Some(50), Some(ir::ResponseFormat::JsonObject)));
    }

    #[test]
    fn previous_response_id_is_refused_clearly() {
        let e =
            parse(json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}).as_object().unwrap())
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("previous_response_id"));
    }

    #[test]
    fn stream_events_are_ordered_and_numbered() {
        let ctx = AnswerCtx { request_id: "r".into(), model: "m".into(), created: 0, include_usage: false };
        let mut enc = Encoder::new(ctx);
        let mut out = Vec::new();
        for d in [
            Delta::Text { choice: 0, text: "hi ".into() },
            Delta::Text { choice: 0, text: "there".into() },
            Delta::ToolCallStart { choice: 0, index: 0, id: "call_9".into(), name: "f".into() },
            Delta::ToolCallArgs { choice: 0, index: 0, fragment: "{}".into() },
            Delta::Finish { choice: 0, reason: Finish::ToolCalls },
            Delta::Usage(TokenUsage { input_tokens: 3, output_tokens: 4, ..Default::default() }),
        ] {
            enc.delta(&d, &mut out);
        }
        enc.finish(&mut out);
        let evs: Vec<Value> = out
            .iter()
            .map(|b| {
                let s = std::str::from_utf8(b).unwrap();
                serde_json::from_str(s.split("data: ").nth(1).unwrap().trim()).unwrap()
            })
            .collect();
        let types: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert!(evs.iter().enumerate().all(|(i, e)| e["sequence_number"] == i as u64));
        let done = evs.last().unwrap();
        assert_eq!(done["response"]["output"][0]["content"][0]["text"], "hi there");
        assert_eq!(done["response"]["output"][1]["call_id"], "call_9");
        assert_eq!(done["response"]["usage"]["total_tokens"], 7);
    }
}
