//! Client protocols: parse a client's request into the neutral form, and write answers (whole or as a
//! stream of deltas) back in that protocol. One module per protocol.

pub mod anthropic;
pub mod gemini;
pub mod openai_chat;
pub mod responses;

use bytes::Bytes;
use relay_core::RelayError;
use relay_core::pb::common::v1::Protocol;
use serde_json::Value;

use crate::ir::{Delta, Request, Response};

/// What an encoder needs to know about the call it answers.
#[derive(Debug, Clone)]
pub struct AnswerCtx {
    pub request_id: String,
    /// The model name the client asked for (answers report it back).
    pub model: String,
    pub created: i64,
    /// OpenAI chat streams: send the usage chunk.
    pub include_usage: bool,
}

/// Writes a streamed answer in a client protocol, delta by delta.
pub trait StreamEncoder: Send {
    fn delta(&mut self, d: &Delta, out: &mut Vec<Bytes>);
    /// After the last delta of a clean answer.
    fn finish(&mut self, out: &mut Vec<Bytes>);
}

pub fn parse_request(protocol: Protocol, body: &[u8]) -> Result<Request, RelayError> {
    parse_value(protocol, &json_body(body)?)
}

/// Like [`parse_request`] for token counting, where Anthropic bodies carry no `max_tokens`.
pub fn parse_count_request(protocol: Protocol, body: &[u8]) -> Result<Request, RelayError> {
    let mut v = json_body(body)?;
    // Gemini `countTokens` may wrap a whole `generateContent` request.
    if protocol == Protocol::GeminiGenerate
        && let Some(inner) = v.get_mut("generateContentRequest").map(Value::take)
    {
        v = inner;
    }
    if let Some(o) = v.as_object_mut() {
        o.entry("max_tokens").or_insert(Value::from(1));
    }
    parse_value(protocol, &v)
}

fn json_body(body: &[u8]) -> Result<Value, RelayError> {
    serde_json::from_slice(body)
        .map_err(|e| RelayError::invalid_request(format!("request body is not valid JSON: {e}")))
}

fn parse_value(protocol: Protocol, v: &Value) -> Result<Request, RelayError> {
    let obj =
        v.as_object().ok_or_else(|| RelayError::invalid_request("request body must be a JSON object"))?;
    match protocol {
        Protocol::OpenaiChat => openai_chat::parse(obj),
        Protocol::AnthropicMessages => anthropic::parse(obj),
        Protocol::OpenaiResponses => responses::parse(obj),
        Protocol::GeminiGenerate => gemini::parse(obj),
        Protocol::OpenaiCompletions => completions_prompt(obj),
        Protocol::OpenaiEmbeddings | Protocol::OpenaiForwarded | Protocol::Unspecified => {
            Err(RelayError::internal("this protocol has no chat request form"))
        }
    }
}

pub fn stream_encoder(protocol: Protocol, ctx: AnswerCtx) -> Box<dyn StreamEncoder> {
    match protocol {
        Protocol::AnthropicMessages => Box::new(anthropic::Encoder::new(ctx)),
        Protocol::OpenaiResponses => Box::new(responses::Encoder::new(ctx)),
        Protocol::GeminiGenerate => Box::new(gemini::Encoder::new(ctx)),
        _ => Box::new(openai_chat::Encoder::new(ctx)),
    }
}

pub fn encode_whole(protocol: Protocol, ctx: &AnswerCtx, r: &Response) -> Bytes {
    match protocol {
        Protocol::AnthropicMessages => anthropic::whole(ctx, r),
        Protocol::OpenaiResponses => responses::whole(ctx, r),
        Protocol::GeminiGenerate => gemini::whole(ctx, r),
        _ => openai_chat::whole(ctx, r),
    }
}

/// A legacy completion (only ever forwarded as it is; parsed for counting): its prompt as one user turn.
fn completions_prompt(o: &serde_json::Map<String, Value>) -> Result<Request, RelayError> {
    let prompt = match o.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n"),
        _ => return Err(bad("prompt", "you must provide a prompt parameter")),
    };
    Ok(Request {
        model: opt_str(o.get("model")).unwrap_or_default(),
        messages: vec![crate::ir::Message {
            role: crate::ir::Role::User,
            parts: vec![crate::ir::Part::Text(prompt)],
        }],
        max_tokens: opt_u64(o.get("max_tokens"), "max_tokens")?,
        ..Default::default()
    })
}

// === helpers shared by the parsers ===

pub(crate) fn bad(param: &str, msg: impl Into<String>) -> RelayError {
    RelayError::invalid_request(msg).with_param(param)
}

pub(crate) fn opt_u64(v: Option<&Value>, param: &str) -> Result<Option<u64>, RelayError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(param, format!("`{param}` must be a non-negative integer"))),
    }
}

pub(crate) fn opt_f64(v: Option<&Value>, param: &str) -> Result<Option<f64>, RelayError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| bad(param, format!("`{param}` must be a number"))),
    }
}

pub(crate) fn opt_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

/// `stop`: a string or an array of strings.
pub(crate) fn string_list(v: Option<&Value>, param: &str) -> Result<Vec<String>, RelayError> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(param, format!("`{param}` must hold strings")))
            })
            .collect(),
        Some(_) => Err(bad(param, format!("`{param}` must be a string or an array of strings"))),
    }
}

/// Arguments of a tool call as JSON text: strings are kept, objects are serialised.
pub(crate) fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "{}".into(),
        other => other.to_string(),
    }
}

/// Parses tool-call arguments for providers that want an object; unparseable text is kept under `_raw`.
pub(crate) fn args_object(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return Value::Object(Default::default());
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        Ok(other) => serde_json::json!({ "_value": other }),
        Err(_) => serde_json::json!({ "_raw": arguments }),
    }
}

pub(crate) fn sse(event: Option<&str>, data: &Value) -> Bytes {
    match event {
        Some(e) => Bytes::from(format!("event: {e}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}
