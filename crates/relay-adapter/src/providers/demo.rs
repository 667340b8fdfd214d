//! The built-in demo provider: deterministic, offline, keyless. It answers `You said: <last user text>`,
//! word by word, honours `max_tokens` / `max_completion_tokens` and `stop`, and counts one token per
//! whitespace-separated word, so a newcomer (and a test) can check every byte and every token.

use std::time::Duration;

use base64::Engine as _;
use futures_util::{StreamExt, stream};
use relay_core::RelayError;
use relay_core::contracts::{ChatEventStream, Result};
use relay_core::pb::adapter::v1::{ChatRequest, EmbedRequest, EmbedResponse, FinishReason};
use relay_core::pb::common::v1::{Protocol, TokenUsage};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Provider, chunk, finish, start, upstream_model, usage};
use crate::config::ProviderConfig;
use crate::encode_openai::{ChunkEncoder, completion_body};

pub struct Demo {
    chunk_delay: Duration,
}

impl Demo {
    pub fn new(cfg: &ProviderConfig) -> Self {
        Self {
            chunk_delay: Duration::from_millis(cfg.chunk_delay_ms),
        }
    }
}

#[derive(Deserialize)]
struct DemoChat {
    #[serde(default)]
    messages: Vec<DemoMessage>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stop: Option<Value>,
}

#[derive(Deserialize)]
struct DemoMessage {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

fn text_of(content: &Option<Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The reply's tokens (each word keeps its following space, so joining them gives the text back).
pub fn reply_tokens(text: &str) -> Vec<String> {
    let parts: Vec<&str> = text.split(' ').collect();
    let n = parts.len();
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i + 1 < n {
                format!("{p} ")
            } else {
                (*p).to_owned()
            }
        })
        .collect()
}

struct Plan {
    tokens: Vec<String>,
    reason: FinishReason,
    usage: TokenUsage,
}

fn plan(req: &DemoChat) -> Plan {
    let last_user = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| text_of(&m.content));
    let mut text = match last_user {
        Some(t) => format!("You said: {}", t.trim()),
        None => "Hello from Relay's demo provider.".to_owned(),
    };
    let mut reason = FinishReason::Stop;
    let stops: Vec<String> = match &req.stop {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => vec![],
    };
    if let Some(cut) = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        text.truncate(cut);
    }
    let mut tokens = reply_tokens(&text);
    if let Some(max) = req.max_completion_tokens.or(req.max_tokens)
        && (tokens.len() as u64) > max
    {
        tokens.truncate(max as usize);
        reason = FinishReason::Length;
    }
    let input: u64 = req
        .messages
        .iter()
        .map(|m| text_of(&m.content).split_whitespace().count() as u64)
        .sum();
    let usage = TokenUsage {
        input_tokens: input,
        output_tokens: tokens.len() as u64,
        ..Default::default()
    };
    Plan {
        tokens,
        reason,
        usage,
    }
}

#[async_trait::async_trait]
impl Provider for Demo {
    fn system(&self) -> &'static str {
        "demo"
    }

    async fn chat(&self, req: ChatRequest) -> Result<ChatEventStream> {
        if req.protocol() != Protocol::OpenaiChat {
            return Err(RelayError::internal(
                "the demo provider cannot answer this protocol",
            ));
        }
        let parsed: DemoChat = serde_json::from_slice(&req.body)
            .map_err(|e| RelayError::invalid_request(format!("invalid chat request: {e}")))?;
        let plan = plan(&parsed);
        let model = upstream_model(req.deployment.as_ref());
        let enc = ChunkEncoder {
            id: format!("chatcmpl-{}", req.request_id),
            model: model.clone(),
            created: unix_now(),
        };
        let head = stream::iter([start(&model)]);
        if !req.stream {
            let body = completion_body(&enc, &[(plan.tokens.concat(), plan.reason)], &plan.usage);
            let events = [chunk(body), finish(0, plan.reason), usage(plan.usage)];
            return Ok(Box::pin(head.chain(stream::iter(events))));
        }
        let delay = self.chunk_delay;
        let mut pieces = vec![chunk(enc.role(0))];
        let words = plan
            .tokens
            .iter()
            .map(|t| chunk(enc.text(0, t)))
            .collect::<Vec<_>>();
        let mut tail = vec![chunk(enc.finish(0, plan.reason)), finish(0, plan.reason)];
        if req.client_wants_usage {
            tail.push(chunk(enc.usage(&plan.usage)));
        }
        tail.extend([chunk(ChunkEncoder::done()), usage(plan.usage)]);
        pieces.extend(words);
        let paced = stream::iter(pieces).then(move |ev| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            ev
        });
        Ok(Box::pin(head.chain(paced).chain(stream::iter(tail))))
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
                return Err(
                    RelayError::invalid_request("input must be a string or an array of strings")
                        .with_param("input"),
                );
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
            usage: Some(TokenUsage {
                input_tokens: tokens,
                ..Default::default()
            }),
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

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> DemoChat {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn echoes_counts_and_truncates() {
        let p = plan(&req(json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]}]})));
        assert_eq!(p.tokens.concat(), "You said: hello there");
        assert_eq!(p.reason, FinishReason::Stop);
        assert_eq!((p.usage.input_tokens, p.usage.output_tokens), (4, 4));

        let p = plan(&req(
            json!({"max_tokens": 2, "messages": [{"role": "user", "content": "a b c"}]}),
        ));
        assert_eq!(p.tokens.concat(), "You said: ");
        assert_eq!(p.reason, FinishReason::Length);

        let p = plan(&req(
            json!({"stop": ["STOP"], "messages": [{"role": "user", "content": "a STOP b"}]}),
        ));
        assert_eq!(p.tokens.concat(), "You said: a ");
    }

    #[test]
    fn vectors_are_deterministic_and_bounded() {
        assert_eq!(demo_vector("x"), demo_vector("x"));
        assert_ne!(demo_vector("x"), demo_vector("y"));
        assert!(demo_vector("z").iter().all(|f| (-1.0..=1.0).contains(f)));
    }
}
