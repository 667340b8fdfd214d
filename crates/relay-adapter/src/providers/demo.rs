//! The built-in demo provider: deterministic, offline, keyless. It answers `You said: <last user text>`,
//! word by word, honours `max_tokens` / `max_completion_tokens` and `stop`, and counts one token per
//! whitespace-separated word, so a newcomer (and a test) can check every byte and every token.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use relay_core::RelayError;
use relay_core::contracts::{ChatEventStream, Result};
use relay_core::pb::adapter::v1::{
    ChatRequest, CountTokensRequest, CountTokensResponse, EmbedRequest, EmbedResponse,
};
use relay_core::pb::common::v1::{TokenUsage, UsageSource};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Provider, answer_ctx, counting_for, start, upstream_model};
use crate::config::ProviderConfig;
use crate::convert::{Output, Unit, stream_answer, whole_answer};
use crate::inbound;
use crate::ir::{self, Delta, Finish, Part};

pub struct Demo {
    chunk_delay: Duration,
}

impl Demo {
    pub fn new(cfg: &ProviderConfig) -> Self {
        Self { chunk_delay: Duration::from_millis(cfg.chunk_delay_ms) }
    }
}

/// The reply's tokens (each word keeps its following space, so joining them gives the text back).
pub fn reply_tokens(text: &str) -> Vec<String> {
    let parts: Vec<&str> = text.split(' ').collect();
    let n = parts.len();
    parts.iter().enumerate().map(|(i, p)| if i + 1 < n { format!("{p} ") } else { (*p).to_owned() }).collect()
}

struct Plan {
    tokens: Vec<String>,
    reason: Finish,
    usage: TokenUsage,
}

fn words(ir: &ir::Request) -> u64 {
    let mut n: usize = ir.system.iter().map(|s| s.split_whitespace().count()).sum();
    for m in &ir.messages {
        for p in &m.parts {
            n += match p {
                Part::Text(t) | Part::ToolResult { content: t, .. } => t.split_whitespace().count(),
                _ => 0,
            };
        }
    }
    n as u64
}

fn plan(req: &ir::Request) -> Plan {
    let last_user =
        req.messages.iter().rev().find(|m| m.role == ir::Role::User).map(|m| ir::text_of(&m.parts));
    let mut text = match last_user {
        Some(t) => format!("You said: {}", t.trim()),
        None => "Hello from Relay's demo provider.".to_owned(),
    };
    let mut reason = Finish::Stop;
    if let Some(cut) = req.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(cut);
        reason = Finish::StopSequence;
    }
    let mut tokens = reply_tokens(&text);
    if let Some(max) = req.max_tokens
        && (tokens.len() as u64) > max
    {
        tokens.truncate(max as usize);
        reason = Finish::Length;
    }
    let usage =
        TokenUsage { input_tokens: words(req), output_tokens: tokens.len() as u64, ..Default::default() };
    Plan { tokens, reason, usage }
}

#[async_trait::async_trait]
impl Provider for Demo {
    fn system(&self) -> &'static str {
        "demo"
    }

    async fn count_tokens(&self, req: CountTokensRequest) -> Result<CountTokensResponse> {
        let ir = inbound::parse_count_request(req.protocol(), &req.body)?;
        Ok(CountTokensResponse {
            input_tokens: words(&ir),
            exact: true,
            source: UsageSource::Provider as i32,
        })
    }

    async fn chat(&self, req: ChatRequest) -> Result<ChatEventStream> {
        if req.protocol() == relay_core::pb::common::v1::Protocol::OpenaiCompletions {
            return Err(super::not_forwarded(self.system(), "completions"));
        }
        let ir = inbound::parse_request(req.protocol(), &req.body)?;
        let plan = plan(&ir);
        let model = upstream_model(req.deployment.as_ref());
        let output = Output::Converted { protocol: req.protocol(), ctx: answer_ctx(&req) };
        let mut deltas: Vec<Delta> =
            plan.tokens.iter().map(|t| Delta::Text { choice: 0, text: t.clone() }).collect();
        deltas.push(Delta::Finish { choice: 0, reason: plan.reason });
        deltas.push(Delta::Usage(plan.usage));
        let counting = counting_for(&req, &model);
        let head = stream::iter([start(&model)]);
        if !req.stream {
            let events = whole_answer(Bytes::new(), deltas, output, counting);
            return Ok(Box::pin(head.chain(stream::iter(events))));
        }
        let delay = self.chunk_delay;
        let units = stream::iter(deltas)
            .then(move |d| async move {
                if !delay.is_zero() && matches!(d, Delta::Text { .. }) {
                    tokio::time::sleep(delay).await;
                }
                Unit::Event { raw: Bytes::new(), deltas: vec![d] }
            })
            .chain(stream::iter([Unit::End { complete: true }]));
        Ok(Box::pin(head.chain(stream_answer(units, output, counting))))
    }

    async fn embed(&self, req: EmbedRequest) -> Result<EmbedResponse> {
        #[derive(Deserialize)]
        struct DemoEmbed {
            input: Value,
            #[serde(default)]
            encoding_format: Option<String>,
        }
        let parsed: DemoEmbed = serde_json::from_slice(&req.body)
            .map_err(|e| RelayError::invalid_request(format!("invalid embeddings request: {e}")))?;
        let inputs: Vec<String> = match &parsed.input {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) if a.iter().all(Value::is_string) && !a.is_empty() => {
                a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
            }
            _ => {
                return Err(RelayError::invalid_request("input must be a string or an array of strings")
                    .with_param("input"));
            }
        };
        let base64 = parsed.encoding_format.as_deref() == Some("base64");
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let v = demo_vector(text);
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        let tokens: u64 = inputs.iter().map(|t| t.split_whitespace().count() as u64).sum();
        let model = upstream_model(req.deployment.as_ref());
        let body = json!({"object": "list", "data": data, "model": model,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
        Ok(EmbedResponse {
            body: body.to_string().into_bytes().into(),
            usage: Some(TokenUsage { input_tokens: tokens, ..Default::default() }),
        })
    }
}

/// A deterministic 16-dimensional unit-range vector (FNV-1a seeded xorshift): same text, same vector.
fn demo_vector(text: &str) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..16)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_core::pb::common::v1::Protocol;

    fn req(v: Value) -> ir::Request {
        inbound::parse_request(Protocol::OpenaiChat, v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn echoes_counts_and_truncates() {
        let p = plan(&req(json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]}]})));
        assert_eq!(p.tokens.concat(), "You said: hello there");
        assert_eq!(p.reason, Finish::Stop);
        assert_eq!((p.usage.input_tokens, p.usage.output_tokens), (4, 4));

        let p = plan(&req(json!({"max_tokens": 2, "messages": [{"role": "user", "content": "a b c"}]})));
        assert_eq!(p.tokens.concat(), "You said: ");
        assert_eq!(p.reason, Finish::Length);

        let p = plan(&req(json!({"stop": ["STOP"], "messages": [{"role": "user", "content": "a STOP b"}]})));
        assert_eq!(p.tokens.concat(), "You said: a ");
        assert_eq!(p.reason, Finish::StopSequence);
    }

    #[test]
    fn vectors_are_deterministic_and_bounded() {
        assert_eq!(demo_vector("x"), demo_vector("x"));
        assert_ne!(demo_vector("x"), demo_vector("y"));
        assert!(demo_vector("z").iter().all(|f| (-1.0..=1.0).contains(f)));
    }
}
