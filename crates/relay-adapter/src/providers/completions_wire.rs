//! OpenAI's legacy Completions as an upstream protocol, for streamed `/v1/completions` forwarded to
//! OpenAI-compatible upstreams as they are: the chunks pass through; this module reads them for what Relay
//! needs (the text to count, the finish, the provider's usage).

use relay_core::pb::common::v1::TokenUsage;
use relay_core::{ErrorCode, RelayError};
use serde_json::Value;

use crate::ir::{Delta, Finish};
use crate::sse::SseEvent;
use crate::upstream::{Decoder, in_band_error};

fn finish_of(reason: &str) -> Finish {
    match reason {
        "length" => Finish::Length,
        "content_filter" => Finish::ContentFilter,
        _ => Finish::Stop,
    }
}

/// The deltas of one completion chunk (or of a whole completion).
fn deltas(v: &Value) -> Vec<Delta> {
    let mut out = Vec::new();
    for (i, c) in v["choices"].as_array().into_iter().flatten().enumerate() {
        let choice = c["index"].as_u64().unwrap_or(i as u64) as u32;
        if let Some(t) = c["text"].as_str().filter(|t| !t.is_empty()) {
            out.push(Delta::Text { choice, text: t.to_owned() });
        }
        if let Some(r) = c["finish_reason"].as_str() {
            out.push(Delta::Finish { choice, reason: finish_of(r) });
        }
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        let n = |k: &str| u[k].as_u64().unwrap_or(0);
        out.push(Delta::Usage(TokenUsage {
            input_tokens: n("prompt_tokens"),
            output_tokens: n("completion_tokens"),
            ..Default::default()
        }));
    }
    out
}

/// A whole completion as deltas.
pub fn whole(body: &[u8]) -> Result<Vec<Delta>, ()> {
    let v: Value = serde_json::from_slice(body).map_err(|_| ())?;
    if !v["choices"].is_array() {
        return Err(());
    }
    Ok(deltas(&v))
}

/// Reads a streamed completion (`data: {chunk}` events, then `data: [DONE]`).
#[derive(Default)]
pub struct StreamDecoder {
    done: bool,
}

impl Decoder for StreamDecoder {
    fn event(&mut self, ev: &SseEvent) -> Result<Vec<Delta>, RelayError> {
        if ev.data.is_empty() {
            return Ok(vec![]);
        }
        if ev.data.trim() == "[DONE]" {
            self.done = true;
            return Ok(vec![]);
        }
        let v: Value = serde_json::from_str(&ev.data).map_err(|_| {
            RelayError::new(ErrorCode::UpstreamProtocol, "upstream sent an invalid stream event")
        })?;
        if v.get("error").is_some() {
            return Err(in_band_error("openai", &v));
        }
        Ok(deltas(&v))
    }

    fn complete(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_yield_text_finish_and_usage() {
        let mut d = StreamDecoder::default();
        let ev = |data: &str| SseEvent { raw: Default::default(), event: None, data: data.to_owned() };
        let text = d.event(&ev(r#"{"choices":[{"index":0,"text":"Hi","finish_reason":null}]}"#)).unwrap();
        assert_eq!(text, vec![Delta::Text { choice: 0, text: "Hi".into() }]);
        let end = d.event(&ev(r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#)).unwrap();
        assert_eq!(end[0], Delta::Finish { choice: 0, reason: Finish::Length });
        assert!(!d.complete());
        d.event(&ev("[DONE]")).unwrap();
        assert!(d.complete());
        assert!(d.event(&ev(r#"{"error":{"type":"server_error"}}"#)).is_err());
        assert!(whole(br#"{"choices":[{"text":"x","finish_reason":"stop"}]}"#).unwrap().len() == 2);
    }
}
