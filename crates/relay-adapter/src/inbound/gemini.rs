//! Gemini `generateContent` as a client protocol (what the `google-genai` SDKs send): request parsing and
//! answer encoding, whole and streamed (`streamGenerateContent?alt=sse`). The model and the stream flag
//! live in the URL, not the body; the edge passes them beside it. Field names are accepted in both the
//! camelCase the SDKs send and the snake_case the REST API also takes.

use bytes::Bytes;
use relay_core::RelayError;
use relay_core::pb::common::v1::TokenUsage;
use serde_json::{Map, Value, json};

use super::{AnswerCtx, StreamEncoder, args_object, bad, opt_f64, opt_str, opt_u64, string_list};
use crate::ir::{self, Delta, Finish, Image, Message, Part, Request, Response, Role, ToolChoice};

/// A field under either of its JSON names.
fn field<'a>(o: &'a Map<String, Value>, camel: &str, snake: &str) -> Option<&'a Value> {
    o.get(camel).or_else(|| o.get(snake)).filter(|v| !v.is_null())
}

// === requests ===

pub fn parse(o: &Map<String, Value>) -> Result<Request, RelayError> {
    let contents = o
        .get("contents")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("contents", "* GenerateContentRequest.contents: contents is not specified"))?;
    let mut r = Request::default();
    match field(o, "systemInstruction", "system_instruction") {
        None => {}
        Some(Value::String(s)) => r.system.push(s.clone()),
        Some(Value::Object(c)) => {
            let text = texts(c.get("parts")).collect::<Vec<_>>().join("\n");
            if !text.is_empty() {
                r.system.push(text);
            }
        }
        Some(_) => return Err(bad("systemInstruction", "systemInstruction must be a Content object")),
    }
    // Calls without ids (the usual case) get one, and each response pairs with the earliest open call of
    // its name.
    let mut open_calls: Vec<(String, String)> = Vec::new();
    for (i, c) in contents.iter().enumerate() {
        let at = format!("contents[{i}]");
        let c = c.as_object().ok_or_else(|| bad(&at, format!("{at} must be a Content object")))?;
        let role = match c.get("role").and_then(Value::as_str) {
            None | Some("" | "user" | "function" | "tool") => Role::User,
            Some("model") => Role::Assistant,
            Some(other) => {
                return Err(bad(&at, format!("Please use a valid role: user, model. Got {other}")));
            }
        };
        let mut parts = Vec::new();
        for (j, p) in c.get("parts").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let at = format!("{at}.parts[{j}]");
            let p = p.as_object().ok_or_else(|| bad(&at, format!("{at} must be a Part object")))?;
            if let Some(part) = part(p, &at, (i, j), &mut open_calls)? {
                parts.push(part);
            }
        }
        match r.messages.last_mut() {
            Some(last) if last.role == role => last.parts.extend(parts),
            _ => r.messages.push(Message { role, parts }),
        }
    }
    for (i, t) in o.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        // Google's own tools (search, code execution, URL context) have no equivalent elsewhere and are
        // left out of a converted request, as server tools of other protocols are.
        let decls = t.get("functionDeclarations").or_else(|| t.get("function_declarations"));
        for (j, d) in decls.and_then(Value::as_array).into_iter().flatten().enumerate() {
            let at = format!("tools[{i}].functionDeclarations[{j}]");
            let d = d.as_object().ok_or_else(|| bad(&at, format!("{at} must be an object")))?;
            let name = opt_str(d.get("name")).ok_or_else(|| bad(&at, format!("{at}.name is required")))?;
            let parameters =
                match (field(d, "parametersJsonSchema", "parameters_json_schema"), d.get("parameters")) {
                    (Some(schema), _) => schema.clone(),
                    (None, Some(schema)) if !schema.is_null() => openapi_to_json_schema(schema),
                    _ => json!({"type": "object", "properties": {}}),
                };
            r.tools.push(ir::Tool { name, description: opt_str(d.get("description")), parameters });
        }
    }
    if let Some(cfg) = field(o, "toolConfig", "tool_config").and_then(Value::as_object)
        && let Some(fc) =
            field(cfg, "functionCallingConfig", "function_calling_config").and_then(Value::as_object)
    {
        let allowed = field(fc, "allowedFunctionNames", "allowed_function_names").and_then(Value::as_array);
        let only = allowed.filter(|a| a.len() == 1).and_then(|a| a[0].as_str());
        r.tool_choice = match fc.get("mode").and_then(Value::as_str).unwrap_or("AUTO") {
            "NONE" => ToolChoice::None,
            "ANY" | "VALIDATED" => only.map_or(ToolChoice::Required, |n| ToolChoice::Function(n.to_owned())),
            _ => ToolChoice::Auto,
        };
    }
    if let Some(g) = field(o, "generationConfig", "generation_config") {
        let g = g.as_object().ok_or_else(|| bad("generationConfig", "generationConfig must be an object"))?;
        generation_config(g, &mut r)?;
    }
    Ok(r)
}

fn generation_config(g: &Map<String, Value>, r: &mut Request) -> Result<(), RelayError> {
    let param = |camel: &'static str, snake: &'static str| (field(g, camel, snake), camel);
    let (v, p) = param("maxOutputTokens", "max_output_tokens");
    r.max_tokens = opt_u64(v, p)?;
    let (v, p) = param("temperature", "temperature");
    r.temperature = opt_f64(v, p)?;
    let (v, p) = param("topP", "top_p");
    r.top_p = opt_f64(v, p)?;
    let (v, p) = param("topK", "top_k");
    r.top_k = opt_f64(v, p)?.map(|k| k.max(0.0) as u64);
    let (v, p) = param("presencePenalty", "presence_penalty");
    r.presence_penalty = opt_f64(v, p)?;
    let (v, p) = param("frequencyPenalty", "frequency_penalty");
    r.frequency_penalty = opt_f64(v, p)?;
    r.seed = field(g, "seed", "seed").and_then(Value::as_i64);
    let (v, p) = param("stopSequences", "stop_sequences");
    r.stop = string_list(v, p)?;
    let (v, p) = param("candidateCount", "candidate_count");
    r.n = opt_u64(v, p)?.map(|n| n.min(128) as u32);
    let json_mime = field(g, "responseMimeType", "response_mime_type").and_then(Value::as_str)
        == Some("application/json");
    let schema = match (
        field(g, "responseJsonSchema", "response_json_schema"),
        field(g, "responseSchema", "response_schema"),
    ) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(s)) => Some(openapi_to_json_schema(s)),
        (None, None) => None,
    };
    r.response_format = match schema {
        Some(schema) => {
            Some(ir::ResponseFormat::JsonSchema { name: "response".into(), schema, strict: None })
        }
        None if json_mime => Some(ir::ResponseFormat::JsonObject),
        None => None,
    };
    if let Some(t) = field(g, "thinkingConfig", "thinking_config").and_then(Value::as_object) {
        let budget = field(t, "thinkingBudget", "thinking_budget").and_then(Value::as_i64);
        let level = field(t, "thinkingLevel", "thinking_level").and_then(Value::as_str);
        r.reasoning = match (budget, level) {
            // A zero budget turns thinking off.
            (Some(0), _) => None,
            (Some(b), _) if b > 0 => Some(ir::Reasoning { effort: None, budget_tokens: Some(b as u64) }),
            (_, Some(level)) => {
                Some(ir::Reasoning { effort: Some(level.to_ascii_lowercase()), budget_tokens: None })
            }
            // -1: the model decides.
            _ => Some(ir::Reasoning::default()),
        };
    }
    Ok(())
}

fn texts(parts: Option<&Value>) -> impl Iterator<Item = &str> {
    parts
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
}

fn part(
    p: &Map<String, Value>,
    at: &str,
    (i, j): (usize, usize),
    open_calls: &mut Vec<(String, String)>,
) -> Result<Option<Part>, RelayError> {
    if let Some(t) = p.get("text").and_then(Value::as_str) {
        if p.get("thought").and_then(Value::as_bool) == Some(true) {
            let signature =
                opt_str(field(p, "thoughtSignature", "thought_signature")).filter(|s| !s.is_empty());
            return Ok(Some(Part::Thinking { text: t.to_owned(), signature }));
        }
        return Ok(Some(Part::Text(t.to_owned())));
    }
    if let Some(d) = field(p, "inlineData", "inline_data") {
        let mime = opt_str(d.get("mimeType").or_else(|| d.get("mime_type")));
        let data =
            opt_str(d.get("data")).ok_or_else(|| bad(at, format!("{at}.inlineData.data is required")))?;
        return Ok(Some(Part::Image(Image::Base64 {
            media_type: mime.unwrap_or_else(|| "image/png".into()),
            data,
        })));
    }
    if let Some(d) = field(p, "fileData", "file_data") {
        let uri = opt_str(d.get("fileUri").or_else(|| d.get("file_uri")))
            .ok_or_else(|| bad(at, format!("{at}.fileData.fileUri is required")))?;
        return Ok(Some(Part::Image(Image::Url(uri))));
    }
    if let Some(fc) = field(p, "functionCall", "function_call") {
        let name =
            opt_str(fc.get("name")).ok_or_else(|| bad(at, format!("{at}.functionCall.name is required")))?;
        let id = opt_str(fc.get("id")).filter(|s| !s.is_empty()).unwrap_or_else(|| format!("call_{i}_{j}"));
        open_calls.push((id.clone(), name.clone()));
        let arguments = fc.get("args").filter(|a| !a.is_null()).map_or_else(|| "{}".into(), Value::to_string);
        return Ok(Some(Part::ToolCall { id, name, arguments }));
    }
    if let Some(fr) = field(p, "functionResponse", "function_response") {
        let name = opt_str(fr.get("name")).unwrap_or_default();
        let id = match opt_str(fr.get("id")).filter(|s| !s.is_empty()) {
            Some(id) => {
                open_calls.retain(|(open, _)| *open != id);
                id
            }
            None => match open_calls.iter().position(|(_, n)| *n == name) {
                Some(k) => open_calls.remove(k).0,
                None => name.clone(),
            },
        };
        return Ok(Some(Part::ToolResult {
            id,
            content: response_text(fr.get("response")),
            is_error: false,
        }));
    }
    // Only a signature (or nothing the other protocols carry): nothing to convert.
    if p.keys().all(|k| {
        matches!(
            k.as_str(),
            "thoughtSignature" | "thought_signature" | "thought" | "videoMetadata" | "video_metadata"
        )
    }) {
        return Ok(None);
    }
    let kind = p.keys().next().map_or("empty", String::as_str);
    Err(bad(at, format!("{at}: part kind `{kind}` cannot be converted for this upstream")))
}

/// A function response as the text other protocols carry: a lone string field (`{"output": "..."}`,
/// `{"content": "..."}`, `{"result": "..."}`) as that string, anything else as JSON.
fn response_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) if o.len() == 1 && o.values().all(Value::is_string) => {
            o.values().next().and_then(Value::as_str).unwrap_or_default().to_owned()
        }
        Some(other) => other.to_string(),
    }
}

/// Gemini's `Schema` (an OpenAPI 3.0 subset with upper-case type names) as JSON Schema.
fn openapi_to_json_schema(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let mut out = Map::with_capacity(o.len());
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("type", Value::String(t)) => {
                        out.insert(k.clone(), Value::String(t.to_ascii_lowercase()));
                    }
                    ("nullable", _) | ("propertyOrdering" | "property_ordering", _) => {}
                    ("properties", Value::Object(props)) => {
                        let props =
                            props.iter().map(|(n, s)| (n.clone(), openapi_to_json_schema(s))).collect();
                        out.insert(k.clone(), Value::Object(props));
                    }
                    ("items" | "anyOf" | "any_of", _) => {
                        let key = if k == "any_of" { "anyOf".to_owned() } else { k.clone() };
                        out.insert(key, openapi_to_json_schema(x));
                    }
                    _ => {
                        out.insert(k.clone(), x.clone());
                    }
                }
            }
            if o.get("nullable").and_then(Value::as_bool) == Some(true)
                && let Some(Value::String(t)) = out.get("type").cloned()
            {
                out.insert("type".into(), json!([t, "null"]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(openapi_to_json_schema).collect()),
        other => other.clone(),
    }
}

// === answers ===

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop | Finish::StopSequence | Finish::ToolCalls => "STOP",
        Finish::Length => "MAX_TOKENS",
        Finish::ContentFilter => "SAFETY",
    }
}

fn usage_json(u: &TokenUsage) -> Value {
    let mut m = Map::new();
    m.insert("promptTokenCount".into(), json!(u.input_tokens));
    m.insert("candidatesTokenCount".into(), json!(u.output_tokens.saturating_sub(u.reasoning_tokens)));
    m.insert("totalTokenCount".into(), json!(u.input_tokens + u.output_tokens));
    if u.cached_input_tokens > 0 {
        m.insert("cachedContentTokenCount".into(), json!(u.cached_input_tokens));
    }
    if u.reasoning_tokens > 0 {
        m.insert("thoughtsTokenCount".into(), json!(u.reasoning_tokens));
    }
    Value::Object(m)
}

fn response_id(ctx: &AnswerCtx) -> String {
    ctx.request_id.replace('-', "")
}

fn part_json(p: &Part) -> Option<Value> {
    Some(match p {
        Part::Text(t) => json!({"text": t}),
        Part::Thinking { text, signature } => match signature {
            Some(s) => json!({"text": text, "thought": true, "thoughtSignature": s}),
            None => json!({"text": text, "thought": true}),
        },
        Part::ToolCall { id, name, arguments } => call_json(id, name, arguments),
        Part::RedactedThinking { .. } | Part::Image(_) | Part::ToolResult { .. } => return None,
    })
}

fn call_json(id: &str, name: &str, arguments: &str) -> Value {
    json!({"functionCall": {"id": id, "name": name, "args": args_object(arguments)}})
}

fn candidate(index: u32, parts: Vec<Value>, finish: Option<Finish>) -> Value {
    let mut c = json!({"content": {"role": "model", "parts": parts}, "index": index});
    if let Some(f) = finish {
        c["finishReason"] = json!(finish_reason(f));
    }
    c
}

pub fn whole(ctx: &AnswerCtx, r: &Response) -> Bytes {
    let mut candidates: Vec<Value> = r
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let parts = c.parts.iter().filter_map(part_json).collect();
            candidate(i as u32, parts, Some(c.finish.unwrap_or_default()))
        })
        .collect();
    if candidates.is_empty() {
        candidates.push(candidate(0, vec![], Some(Finish::Stop)));
    }
    let body = json!({"candidates": candidates, "usageMetadata": usage_json(&r.usage),
        "modelVersion": ctx.model, "responseId": response_id(ctx)});
    Bytes::from(body.to_string())
}

/// One `data:` event of a `streamGenerateContent?alt=sse` answer (Google ends events with CRLF pairs).
fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\r\n\r\n"))
}

/// A tool call being streamed: Gemini sends each call whole, so arguments are gathered until it ends.
struct OpenCall {
    choice: u32,
    index: u32,
    id: String,
    name: String,
    arguments: String,
}

pub struct Encoder {
    ctx: AnswerCtx,
    response_id: String,
    calls: Vec<OpenCall>,
    finish: std::collections::BTreeMap<u32, Finish>,
    usage: TokenUsage,
}

impl Encoder {
    pub fn new(ctx: AnswerCtx) -> Self {
        let response_id = response_id(&ctx);
        Self { ctx, response_id, calls: vec![], finish: Default::default(), usage: TokenUsage::default() }
    }

    fn chunk(&self, candidates: Vec<Value>, usage: bool) -> Bytes {
        let mut v =
            json!({"candidates": candidates, "modelVersion": self.ctx.model, "responseId": self.response_id});
        if usage {
            v["usageMetadata"] = usage_json(&self.usage);
        }
        event(&v)
    }

    fn parts_chunk(&self, choice: u32, parts: Vec<Value>) -> Bytes {
        self.chunk(vec![candidate(choice, parts, None)], false)
    }

    /// The finished calls of a choice, as parts.
    fn take_calls(&mut self, choice: u32) -> Vec<Value> {
        let (done, open): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.calls).into_iter().partition(|c| c.choice == choice);
        self.calls = open;
        done.iter().map(|c| call_json(&c.id, &c.name, &c.arguments)).collect()
    }

    fn flush_calls(&mut self, choice: u32, out: &mut Vec<Bytes>) {
        let parts = self.take_calls(choice);
        if !parts.is_empty() {
            out.push(self.parts_chunk(choice, parts));
        }
    }
}

impl StreamEncoder for Encoder {
    fn delta(&mut self, d: &Delta, out: &mut Vec<Bytes>) {
        match d {
            Delta::Text { choice, text } => {
                self.flush_calls(*choice, out);
                if !text.is_empty() {
                    out.push(self.parts_chunk(*choice, vec![json!({"text": text})]));
                }
            }
            Delta::Thinking { choice, text } => {
                self.flush_calls(*choice, out);
                out.push(self.parts_chunk(*choice, vec![json!({"text": text, "thought": true})]));
            }
            Delta::ThinkingSignature { choice, signature } => {
                let part = json!({"text": "", "thought": true, "thoughtSignature": signature});
                out.push(self.parts_chunk(*choice, vec![part]));
            }
            Delta::ToolCallStart { choice, index, id, name } => {
                self.calls.push(OpenCall {
                    choice: *choice,
                    index: *index,
                    id: id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                });
            }
            Delta::ToolCallArgs { choice, index, fragment } => {
                if let Some(c) = self.calls.iter_mut().find(|c| c.choice == *choice && c.index == *index) {
                    c.arguments.push_str(fragment);
                }
            }
            Delta::Finish { choice, reason } => {
                self.finish.insert(*choice, *reason);
            }
            Delta::Usage(u) => ir::merge_usage(&mut self.usage, u),
            Delta::RedactedThinking { .. } | Delta::Meta { .. } => {}
        }
    }

    /// The last event: each choice's remaining calls with its finish reason, and the usage.
    fn finish(&mut self, out: &mut Vec<Bytes>) {
        let mut choices: Vec<u32> = self.finish.keys().copied().collect();
        choices.extend(self.calls.iter().map(|c| c.choice));
        choices.sort_unstable();
        choices.dedup();
        if choices.is_empty() {
            choices.push(0);
        }
        let candidates = choices
            .into_iter()
            .map(|choice| {
                let mut parts = self.take_calls(choice);
                if parts.is_empty() {
                    parts.push(json!({"text": ""}));
                }
                candidate(choice, parts, Some(self.finish.get(&choice).copied().unwrap_or_default()))
            })
            .collect();
        out.push(self.chunk(candidates, true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_google_genai_function_calling_turn() {
        let body = json!({
            "systemInstruction": {"parts": [{"text": "Be brief."}], "role": "user"},
            "contents": [
                {"role": "user", "parts": [{"text": "weather in Paris?"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}}]}
            ],
            "tools": [{"functionDeclarations": [{"name": "get_weather", "description": "d",
                "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING", "nullable": true}}, "required": ["city"]}}]},
                {"googleSearch": {}}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
            "generationConfig": {"maxOutputTokens": 64, "temperature": 0.5, "candidateCount": 1, "stopSequences": ["x"],
                "thinkingConfig": {"thinkingBudget": 0}}
        });
        let r = parse(body.as_object().unwrap()).unwrap();
        assert_eq!(r.system, ["Be brief."]);
        assert_eq!(r.messages.len(), 3);
        let Part::ToolCall { id, name, arguments } = &r.messages[1].parts[0] else { panic!() };
        assert_eq!((name.as_str(), arguments.as_str()), ("get_weather", r#"{"city":"Paris"}"#));
        assert_eq!(
            r.messages[2].parts[0],
            Part::ToolResult { id: id.clone(), content: "sunny".into(), is_error: false }
        );
        assert_eq!(r.tools.len(), 1, "Google's own tools are not converted");
        assert_eq!(
            r.tools[0].parameters,
            json!({"type": "object", "properties": {"city": {"type": ["string", "null"]}}, "required": ["city"]})
        );
        assert_eq!(r.tool_choice, ToolChoice::Function("get_weather".into()));
        assert_eq!(
            (r.max_tokens, r.temperature, r.n, r.stop.clone()),
            (Some(64), Some(0.5), Some(1), vec!["x".to_owned()])
        );
        assert_eq!(r.reasoning, None, "a zero thinking budget is no thinking");
    }

    #[test]
    fn snake_case_fields_and_bad_roles() {
        let body = json!({"contents": [{"parts": [{"text": "hi"}]}],
            "generation_config": {"max_output_tokens": 5, "response_mime_type": "application/json"}});
        let r = parse(body.as_object().unwrap()).unwrap();
        assert_eq!(
            (r.max_tokens, r.response_format.clone()),
            (Some(5), Some(ir::ResponseFormat::JsonObject))
        );
        let e = parse(json!({"contents": [{"role": "bot", "parts": []}]}).as_object().unwrap()).unwrap_err();
        assert!(e.message.contains("valid role"), "{}", e.message);
        let e = parse(json!({"contents": []}).as_object().unwrap()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("contents"));
        let e =
            parse(json!({"contents": [{"parts": [{"executableCode": {"code": "1"}}]}]}).as_object().unwrap())
                .unwrap_err();
        assert!(e.message.contains("executableCode"), "{}", e.message);
    }

    fn ctx() -> AnswerCtx {
        AnswerCtx { request_id: "r-1".into(), model: "gemini-x".into(), created: 0, include_usage: false }
    }

    #[test]
    fn whole_answers_have_candidates_and_usage() {
        let r = Response {
            choices: vec![ir::Choice {
                parts: vec![
                    Part::Text("hi".into()),
                    Part::ToolCall { id: "c".into(), name: "f".into(), arguments: "{\"a\":1}".into() },
                ],
                finish: Some(Finish::ToolCalls),
            }],
            usage: TokenUsage { input_tokens: 7, output_tokens: 3, ..Default::default() },
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(&whole(&ctx(), &r)).unwrap();
        assert_eq!(v["candidates"][0]["content"]["parts"][1]["functionCall"]["args"], json!({"a": 1}));
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
        assert_eq!(
            v["usageMetadata"],
            json!({"promptTokenCount": 7, "candidatesTokenCount": 3, "totalTokenCount": 10})
        );
        assert_eq!((v["modelVersion"].as_str(), v["responseId"].as_str()), (Some("gemini-x"), Some("r1")));
    }

    #[test]
    fn streams_send_text_as_it_comes_and_calls_whole() {
        let mut enc = Encoder::new(ctx());
        let mut out = Vec::new();
        for d in [
            Delta::Text { choice: 0, text: "Hel".into() },
            Delta::Text { choice: 0, text: "lo".into() },
            Delta::ToolCallStart { choice: 0, index: 0, id: "c".into(), name: "f".into() },
            Delta::ToolCallArgs { choice: 0, index: 0, fragment: "{\"a\":".into() },
            Delta::ToolCallArgs { choice: 0, index: 0, fragment: "1}".into() },
            Delta::Finish { choice: 0, reason: Finish::ToolCalls },
            Delta::Usage(TokenUsage { input_tokens: 4, output_tokens: 2, ..Default::default() }),
        ] {
            enc.delta(&d, &mut out);
        }
        enc.finish(&mut out);
        let events: Vec<Value> = out
            .iter()
            .map(|b| {
                let s = std::str::from_utf8(b).unwrap();
                assert!(s.starts_with("data: ") && s.ends_with("\r\n\r\n"), "{s:?}");
                serde_json::from_str(&s[6..]).unwrap()
            })
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1]["candidates"][0]["content"]["parts"][0]["text"], "lo");
        let last = &events[2];
        assert_eq!(last["candidates"][0]["content"]["parts"][0]["functionCall"]["args"], json!({"a": 1}));
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert_eq!(last["usageMetadata"]["totalTokenCount"], 6);
    }
}
