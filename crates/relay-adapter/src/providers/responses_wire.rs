//! OpenAI's Responses API as an upstream protocol, for OpenAI upstreams that serve `/responses` and model
//! groups that keep Responses state at the provider: the client's body is forwarded (model rewritten) and
//! the answer's events pass through as they are; this module reads them for what Relay needs (text and
//! tool calls to count, the finish, the provider's usage).

use relay_core::pb::common::v1::TokenUsage;
use relay_core::{ErrorCode, RelayError};
use serde_json::Value;

use crate::ir::{Delta, Finish};
use crate::sse::SseEvent;
use crate::upstream::{Decoder, in_band_error};

/// Does a Responses body ask for state only the provider has (`previous_response_id`, `item_reference`)?
/// Relay-kept state never reaches an adapter in that form: the edge expands it first.
pub fn asks_provider_state(body: &[u8]) -> bool {
    let mentions = |needle: &[u8]| memchr::memmem::find(body, needle).is_some();
    if !mentions(b"previous_response_id") && !mentions(b"item_reference") {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return false };
    let previous = v.get("previous_response_id").is_some_and(|p| !p.is_null());
    let reference = v.get("input").and_then(Value::as_array).is_some_and(|items| {
        items.iter().any(|i| i.get("type").and_then(Value::as_str) == Some("item_reference"))
    });
    previous || reference
}

fn usage_of(u: &Value) -> TokenUsage {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    TokenUsage {
        input_tokens: n(&u["input_tokens"]),
        output_tokens: n(&u["output_tokens"]),
        cached_input_tokens: n(&u["input_tokens_details"]["cached_tokens"]),
        reasoning_tokens: n(&u["output_tokens_details"]["reasoning_tokens"]),
        ..Default::default()
    }
}

fn finish_of(response: &Value, had_calls: bool) -> Finish {
    match response["incomplete_details"]["reason"].as_str() {
        Some("max_output_tokens") => Finish::Length,
        Some("content_filter") => Finish::ContentFilter,
        _ if had_calls => Finish::ToolCalls,
        _ => Finish::Stop,
    }
}

/// The deltas of a whole response object's output.
fn output_deltas(response: &Value, out: &mut Vec<Delta>) -> bool {
    let mut calls = 0;
    for item in response["output"].as_array().into_iter().flatten() {
        match item["type"].as_str() {
            Some("message") => {
                for c in item["content"].as_array().into_iter().flatten() {
                    if let Some(t) = c["text"].as_str() {
                        out.push(Delta::Text { choice: 0, text: t.to_owned() });
                    }
                }
            }
            Some("function_call") => {
                let id = item["call_id"].as_str().unwrap_or_default().to_owned();
                let name = item["name"].as_str().unwrap_or_default().to_owned();
                out.push(Delta::ToolCallStart { choice: 0, index: calls, id, name });
                let fragment = item["arguments"].as_str().unwrap_or("{}").to_owned();
                out.push(Delta::ToolCallArgs { choice: 0, index: calls, fragment });
                calls += 1;
            }
            _ => {}
        }
    }
    calls > 0
}

/// A whole (non-streamed) response object as deltas.
pub fn whole(body: &[u8]) -> Result<Vec<Delta>, ()> {
    let v: Value = serde_json::from_slice(body).map_err(|_| ())?;
    if v.get("object").and_then(Value::as_str) != Some("response") {
        return Err(());
    }
    let mut out = vec![Delta::Meta {
        id: v["id"].as_str().map(str::to_owned),
        model: v["model"].as_str().map(str::to_owned),
    }];
    let had_calls = output_deltas(&v, &mut out);
    out.push(Delta::Finish { choice: 0, reason: finish_of(&v, had_calls) });
    out.push(Delta::Usage(usage_of(&v["usage"])));
    Ok(out)
}

/// Reads a Responses event stream.
#[derive(Default)]
pub struct StreamDecoder {
    /// Tool calls by output index, numbered in order.
    calls: Vec<u64>,
    finished: bool,
}

impl Decoder for StreamDecoder {
    fn event(&mut self, ev: &SseEvent) -> Result<Vec<Delta>, RelayError> {
        if ev.data.is_empty() {
            return Ok(vec![]);
        }
        let v: Value = serde_json::from_str(&ev.data).map_err(|_| {
            RelayError::new(ErrorCode::UpstreamProtocol, "upstream sent an invalid stream event")
        })?;
        let index_of = |calls: &[u64], v: &Value| {
            let at = v["output_index"].as_u64().unwrap_or(0);
            calls.iter().position(|i| *i == at).map(|i| i as u32)
        };
        Ok(match v["type"].as_str().unwrap_or_default() {
            "response.created" => vec![Delta::Meta {
                id: v["response"]["id"].as_str().map(str::to_owned),
                model: v["response"]["model"].as_str().map(str::to_owned),
            }],
            "response.output_text.delta" => {
                vec![Delta::Text { choice: 0, text: v["delta"].as_str().unwrap_or_default().to_owned() }]
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                vec![Delta::Thinking { choice: 0, text: v["delta"].as_str().unwrap_or_default().to_owned() }]
            }
            "response.output_item.added" if v["item"]["type"] == "function_call" => {
                self.calls.push(v["output_index"].as_u64().unwrap_or(0));
                vec![Delta::ToolCallStart {
                    choice: 0,
                    index: (self.calls.len() - 1) as u32,
                    id: v["item"]["call_id"].as_str().unwrap_or_default().to_owned(),
                    name: v["item"]["name"].as_str().unwrap_or_default().to_owned(),
                }]
            }
            "response.function_call_arguments.delta" => match index_of(&self.calls, &v) {
                Some(index) => vec![Delta::ToolCallArgs {
                    choice: 0,
                    index,
                    fragment: v["delta"].as_str().unwrap_or_default().to_owned(),
                }],
                None => vec![],
            },
            "response.completed" | "response.incomplete" => {
                self.finished = true;
                let r = &v["response"];
                vec![
                    Delta::Finish { choice: 0, reason: finish_of(r, !self.calls.is_empty()) },
                    Delta::Usage(usage_of(&r["usage"])),
                ]
            }
            "response.failed" => return Err(in_band_error("openai", &v["response"])),
            "error" => return Err(in_band_error("openai", &v)),
            _ => vec![],
        })
    }

    fn complete(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(v: Value) -> SseEvent {
        SseEvent {
            raw: Default::default(),
            event: v["type"].as_str().map(str::to_owned),
            data: v.to_string(),
        }
    }

    #[test]
    fn streams_yield_text_calls_finish_and_usage() {
        let mut d = StreamDecoder::default();
        let mut out = Vec::new();
        for v in [
            json!({"type": "response.created", "response": {"id": "resp_1", "model": "gpt-x"}}),
            json!({"type": "response.output_text.delta", "output_index": 0, "delta": "Hi"}),
            json!({"type": "response.output_item.added", "output_index": 1, "item": {"type": "function_call", "call_id": "c1", "name": "f"}}),
            json!({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{}"}),
            json!({"type": "response.completed", "response": {"usage": {"input_tokens": 9, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 2}}}}),
        ] {
            out.extend(d.event(&ev(v)).unwrap());
        }
        assert!(d.complete());
        assert_eq!(out[1], Delta::Text { choice: 0, text: "Hi".into() });
        assert_eq!(out[3], Delta::ToolCallArgs { choice: 0, index: 0, fragment: "{}".into() });
        assert_eq!(out[4], Delta::Finish { choice: 0, reason: Finish::ToolCalls });
        let Delta::Usage(u) = &out[5] else { panic!() };
        assert_eq!((u.input_tokens, u.output_tokens, u.cached_input_tokens), (9, 4, 2));
        assert!(
            d.event(&ev(json!({"type": "response.failed", "response": {"error": {"type": "server_error"}}})))
                .is_err()
        );
    }

    #[test]
    fn whole_responses_and_state_requests() {
        let body = json!({"object": "response", "id": "resp_1", "output": [{"type": "message", "content": [{"type": "output_text", "text": "ok"}]}],
            "incomplete_details": {"reason": "max_output_tokens"}, "usage": {"input_tokens": 3, "output_tokens": 1}});
        let d = whole(body.to_string().as_bytes()).unwrap();
        assert!(d.contains(&Delta::Finish { choice: 0, reason: Finish::Length }));
        assert!(whole(b"{}").is_err());
        assert!(asks_provider_state(br#"{"previous_response_id":"resp_1","input":"x"}"#));
        assert!(asks_provider_state(br#"{"input":[{"type":"item_reference","id":"msg_1"}]}"#));
        assert!(!asks_provider_state(br#"{"previous_response_id":null,"input":"x"}"#));
        assert!(!asks_provider_state(br#"{"input":"item_reference"}"#));
    }
}
