//! Writes OpenAI chat-completion wire format from provider-neutral pieces (text deltas, finish reasons,
//! usage). Used by every provider whose upstream does not already speak OpenAI chat.

use bytes::Bytes;
use relay_core::pb::adapter::v1::FinishReason;
use relay_core::pb::common::v1::TokenUsage;
use serde_json::{Value, json};

pub fn finish_reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Stop | FinishReason::Other | FinishReason::Unspecified => "stop",
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

/// Encodes one streamed answer as `chat.completion.chunk` SSE events.
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    pub id: String,
    pub model: String,
    pub created: i64,
}

impl ChunkEncoder {
    fn event(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let mut chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(u) = usage {
            chunk["usage"] = u;
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    }

    /// The first chunk of a choice: the assistant role with empty content.
    pub fn role(&self, index: u32) -> Bytes {
        self.event(
            json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
            None,
        )
    }

    pub fn text(&self, index: u32, text: &str) -> Bytes {
        self.event(
            json!([{"index": index, "delta": {"content": text}, "finish_reason": null}]),
            None,
        )
    }

    pub fn finish(&self, index: u32, reason: FinishReason) -> Bytes {
        self.event(
            json!([{"index": index, "delta": {}, "finish_reason": finish_reason_str(reason)}]),
            None,
        )
    }

    /// The `stream_options.include_usage` chunk: no choices, usage set.
    pub fn usage(&self, usage: &TokenUsage) -> Bytes {
        self.event(json!([]), Some(usage_json(usage)))
    }

    pub fn done() -> Bytes {
        Bytes::from_static(b"data: [DONE]\n\n")
    }
}

/// A whole non-streamed `chat.completion` body with text choices.
pub fn completion_body(enc: &ChunkEncoder, choices: &[(String, FinishReason)], usage: &TokenUsage) -> Bytes {
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, (text, reason))| {
            json!({"index": i, "message": {"role": "assistant", "content": text, "refusal": null},
                   "logprobs": null, "finish_reason": finish_reason_str(*reason)})
        })
        .collect();
    let body = json!({
        "id": enc.id, "object": "chat.completion", "created": enc.created, "model": enc.model,
        "choices": choices, "usage": usage_json(usage),
    });
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_valid_openai_events() {
        let enc = ChunkEncoder {
            id: "chatcmpl-1".into(),
            model: "m".into(),
            created: 7,
        };
        let ev = enc.text(0, "hi \"there\"");
        let s = std::str::from_utf8(&ev).unwrap();
        assert!(s.starts_with("data: ") && s.ends_with("\n\n"));
        let v: Value = serde_json::from_str(&s[6..s.len() - 2]).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["choices"][0]["delta"]["content"], "hi \"there\"");
        let u = TokenUsage {
            input_tokens: 3,
            output_tokens: 4,
            reasoning_tokens: 2,
            ..Default::default()
        };
        let s = String::from_utf8(enc.usage(&u).to_vec()).unwrap();
        let v: Value = serde_json::from_str(s.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(v["choices"], json!([]));
        assert_eq!(v["usage"]["total_tokens"], 7);
        assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], 2);
    }

    #[test]
    fn completion_body_has_every_field() {
        let enc = ChunkEncoder {
            id: "x".into(),
            model: "m".into(),
            created: 1,
        };
        let b = completion_body(
            &enc,
            &[("a".into(), FinishReason::Length)],
            &TokenUsage::default(),
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    }
}
