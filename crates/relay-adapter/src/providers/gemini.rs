//! Google Gemini upstreams (AI Studio `generateContent` / `streamGenerateContent?alt=sse`,
//! `x-goog-api-key`). Gemini-shaped clients (`/v1beta/models/{model}:generateContent`) are forwarded
//! as they came; every other client protocol is converted.

use base64::Engine as _;
use http::HeaderMap;
use relay_core::contracts::Result;
use relay_core::pb::adapter::v1::{
    ChatRequest, CountTokensRequest, CountTokensResponse, EmbedRequest, EmbedResponse,
};
use relay_core::pb::common::v1::{Protocol, TokenUsage};
use relay_core::{ErrorCode, RelayError};
use serde_json::{Map, Value, json};

use super::{Dialect, HttpProvider, base_url, credential, upstream_model};
use crate::config::ProviderConfig;
use crate::inbound::args_object;
use crate::ir::{self, Delta, Finish, Part, Request, Role, ToolChoice};
use crate::sse::SseEvent;
use crate::upstream::{Decoder, Http, in_band_error};

pub struct Gemini {
    base_url: String,
}

pub fn provider(cfg: &ProviderConfig) -> anyhow::Result<HttpProvider<Gemini>> {
    let auth = credential(cfg, "x-goog-api-key", str::to_owned)?;
    let dialect = Gemini { base_url: base_url(cfg, "https://generativelanguage.googleapis.com/v1beta") };
    Ok(HttpProvider { http: Http::new(cfg, auth)?, dialect })
}

impl Gemini {
    fn url(&self, model: &str, action: &str) -> String {
        format!("{}/models/{model}:{action}", self.base_url)
    }
}

#[async_trait::async_trait]
impl Dialect for Gemini {
    fn system(&self) -> &'static str {
        "gcp.gemini"
    }

    fn native(&self) -> Protocol {
        Protocol::GeminiGenerate
    }

    /// The model is in the URL, so the client's body goes on untouched.
    fn native_body(&self, req: &ChatRequest, _model: &str) -> Result<Vec<u8>> {
        Ok(req.body.to_vec())
    }

    fn chat_url(&self, model: &str, stream: bool) -> String {
        if stream {
            self.url(model, "streamGenerateContent?alt=sse")
        } else {
            self.url(model, "generateContent")
        }
    }

    fn build(&self, ir: &Request, _model: &str, _stream: bool) -> Result<Value> {
        Ok(build(ir))
    }

    fn decoder(&self) -> Box<dyn Decoder> {
        Box::new(StreamDecoder::default())
    }

    fn whole(&self, body: &[u8]) -> std::result::Result<Vec<Delta>, ()> {
        let v: Value = serde_json::from_slice(body).map_err(|_| ())?;
        let mut d = StreamDecoder::default();
        let mut out = d.response(&v);
        if !d.finished {
            out.push(Delta::Finish { choice: 0, reason: Finish::Stop });
        }
        Ok(out)
    }

    async fn embed(&self, http: &Http, req: EmbedRequest) -> Result<EmbedResponse> {
        let model = upstream_model(req.deployment.as_ref());
        let body: Value =
            serde_json::from_slice(&req.body).map_err(|e| RelayError::invalid_request(e.to_string()))?;
        let inputs: Vec<String> = match &body["input"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_string) => {
                a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
            }
            _ => {
                return Err(RelayError::invalid_request("input must be a string or an array of strings")
                    .with_param("input"));
            }
        };
        let requests: Vec<Value> = inputs
            .iter()
            .map(|t| json!({"model": format!("models/{model}"), "content": {"parts": [{"text": t}]}}))
            .collect();
        let payload = json!({"requests": requests}).to_string().into_bytes();
        let v = http
            .post_json(&self.url(&model, "batchEmbedContents"), &req.request_id, HeaderMap::new(), payload)
            .await?;
        let base64 = body["encoding_format"].as_str() == Some("base64");
        let data: Vec<Value> = v["embeddings"]
            .as_array()
            .ok_or_else(|| http.invalid_answer())?
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let values: Vec<f32> = e["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_f64)
                    .map(|f| f as f32)
                    .collect();
                let embedding = if base64 {
                    let bytes: Vec<u8> = values.iter().flat_map(|f| f.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(values)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        // Gemini does not count embedding tokens; the usage reported is zero rather than a guess.
        let out = json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}});
        Ok(EmbedResponse { body: out.to_string().into(), usage: Some(TokenUsage::default()) })
    }

    async fn count_tokens(
        &self,
        http: &Http,
        ir: &Request,
        req: &CountTokensRequest,
    ) -> Result<CountTokensResponse> {
        let model = upstream_model(req.deployment.as_ref());
        let payload = json!({"contents": build(ir)["contents"]}).to_string().into_bytes();
        let v = http
            .post_json(&self.url(&model, "countTokens"), &req.request_id, HeaderMap::new(), payload)
            .await?;
        let n = v["totalTokens"].as_u64().ok_or_else(|| http.invalid_answer())?;
        Ok(CountTokensResponse {
            input_tokens: n,
            exact: true,
            source: relay_core::pb::common::v1::UsageSource::Provider as i32,
        })
    }
}

fn part(ir: &Request, p: &Part) -> Option<Value> {
    Some(match p {
        Part::Text(t) if t.is_empty() => return None,
        Part::Text(t) => json!({"text": t}),
        Part::Image(ir::Image::Base64 { media_type, data }) => {
            json!({"inlineData": {"mimeType": media_type, "data": data}})
        }
        Part::Image(ir::Image::Url(u)) => json!({"fileData": {"fileUri": u}}),
        Part::ToolCall { name, arguments, .. } => {
            json!({"functionCall": {"name": name, "args": args_object(arguments)}})
        }
        Part::ToolResult { id, content, .. } => {
            // Gemini pairs results with calls by function name.
            let name = ir.tool_name_for(id).unwrap_or(id);
            json!({"functionResponse": {"name": name, "response": {"content": content}}})
        }
        Part::Thinking { .. } | Part::RedactedThinking { .. } => return None,
    })
}

/// A `generateContent` request from the neutral form.
pub fn build(ir: &Request) -> Value {
    let mut contents: Vec<Value> = Vec::new();
    for m in &ir.messages {
        let role = if m.role == Role::User { "user" } else { "model" };
        let parts: Vec<Value> = m.parts.iter().filter_map(|p| part(ir, p)).collect();
        if parts.is_empty() {
            continue;
        }
        match contents.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(a) = last["parts"].as_array_mut() {
                    a.extend(parts);
                }
            }
            _ => contents.push(json!({"role": role, "parts": parts})),
        }
    }
    let mut b = Map::new();
    b.insert("contents".into(), Value::Array(contents));
    if !ir.system.is_empty() {
        b.insert("systemInstruction".into(), json!({"parts": [{"text": ir.system.join("\n\n")}]}));
    }
    if !ir.tools.is_empty() {
        let decls: Vec<Value> = ir
            .tools
            .iter()
            .map(|t| {
                let mut d = json!({"name": t.name, "parametersJsonSchema": t.parameters});
                if let Some(desc) = &t.description {
                    d["description"] = json!(desc);
                }
                d
            })
            .collect();
        b.insert("tools".into(), json!([{"functionDeclarations": decls}]));
        let cfg = match &ir.tool_choice {
            ToolChoice::Auto => json!({"mode": "AUTO"}),
            ToolChoice::None => json!({"mode": "NONE"}),
            ToolChoice::Required => json!({"mode": "ANY"}),
            ToolChoice::Function(n) => json!({"mode": "ANY", "allowedFunctionNames": [n]}),
        };
        b.insert("toolConfig".into(), json!({"functionCallingConfig": cfg}));
    }
    let mut g = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            g.insert(k.into(), v);
        }
    };
    put("maxOutputTokens", ir.max_tokens.map(|n| json!(n)));
    put("temperature", ir.temperature.map(|n| json!(n)));
    put("topP", ir.top_p.map(|n| json!(n)));
    put("topK", ir.top_k.map(|n| json!(n)));
    put("presencePenalty", ir.presence_penalty.map(|n| json!(n)));
    put("frequencyPenalty", ir.frequency_penalty.map(|n| json!(n)));
    put("seed", ir.seed.map(|n| json!(n)));
    put("stopSequences", (!ir.stop.is_empty()).then(|| json!(ir.stop)));
    put("candidateCount", ir.n.filter(|n| *n > 1).map(|n| json!(n)));
    match &ir.response_format {
        Some(ir::ResponseFormat::JsonObject) => put("responseMimeType", Some(json!("application/json"))),
        Some(ir::ResponseFormat::JsonSchema { schema, .. }) => {
            put("responseMimeType", Some(json!("application/json")));
            put("responseJsonSchema", Some(schema.clone()));
        }
        None => {}
    }
    put(
        "thinkingConfig",
        ir.reasoning.as_ref().map(|r| json!({"thinkingBudget": r.budget(), "includeThoughts": true})),
    );
    if !g.is_empty() {
        b.insert("generationConfig".into(), Value::Object(g));
    }
    Value::Object(b)
}

fn finish_of(s: &str, had_calls: bool) -> Finish {
    match s {
        "MAX_TOKENS" => Finish::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            Finish::ContentFilter
        }
        _ if had_calls => Finish::ToolCalls,
        _ => Finish::Stop,
    }
}

fn usage_of(u: &Value) -> TokenUsage {
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    TokenUsage {
        input_tokens: n("promptTokenCount"),
        output_tokens: n("candidatesTokenCount") + n("thoughtsTokenCount"),
        cached_input_tokens: n("cachedContentTokenCount"),
        cache_write_tokens: 0,
        reasoning_tokens: n("thoughtsTokenCount"),
        ..Default::default()
    }
}

/// Reads `GenerateContentResponse` chunks (each stream event is one).
#[derive(Default)]
pub struct StreamDecoder {
    /// Tool calls seen per candidate.
    calls: std::collections::HashMap<u32, u32>,
    finished: bool,
}

impl StreamDecoder {
    fn response(&mut self, v: &Value) -> Vec<Delta> {
        let mut out = Vec::new();
        if let Some(id) = v["responseId"].as_str() {
            out.push(Delta::Meta {
                id: Some(id.to_owned()),
                model: v["modelVersion"].as_str().map(str::to_owned),
            });
        }
        for (i, c) in v["candidates"].as_array().into_iter().flatten().enumerate() {
            let choice = c["index"].as_u64().unwrap_or(i as u64) as u32;
            for p in c["content"]["parts"].as_array().into_iter().flatten() {
                if let Some(t) = p["text"].as_str() {
                    if p["thought"].as_bool() == Some(true) {
                        out.push(Delta::Thinking { choice, text: t.to_owned() });
                    } else if !t.is_empty() {
                        out.push(Delta::Text { choice, text: t.to_owned() });
                    }
                }
                if let Some(fc) = p.get("functionCall") {
                    let n = self.calls.entry(choice).or_default();
                    let index = *n;
                    *n += 1;
                    let id = fc["id"]
                        .as_str()
                        .map_or_else(|| format!("call_{}", uuid::Uuid::now_v7().simple()), str::to_owned);
                    out.push(Delta::ToolCallStart {
                        choice,
                        index,
                        id,
                        name: fc["name"].as_str().unwrap_or("").to_owned(),
                    });
                    let args = if fc["args"].is_null() { "{}".to_owned() } else { fc["args"].to_string() };
                    out.push(Delta::ToolCallArgs { choice, index, fragment: args });
                }
            }
            if let Some(r) = c["finishReason"].as_str() {
                self.finished = true;
                let had_calls = self.calls.get(&choice).is_some_and(|n| *n > 0);
                out.push(Delta::Finish { choice, reason: finish_of(r, had_calls) });
            }
        }
        if v["usageMetadata"].is_object() {
            out.push(Delta::Usage(usage_of(&v["usageMetadata"])));
        }
        out
    }
}

impl Decoder for StreamDecoder {
    fn event(&mut self, ev: &SseEvent) -> std::result::Result<Vec<Delta>, RelayError> {
        if ev.data.is_empty() {
            return Ok(vec![]);
        }
        let v: Value = serde_json::from_str(&ev.data).map_err(|_| {
            RelayError::new(ErrorCode::UpstreamProtocol, "upstream sent an invalid stream event")
        })?;
        if v.get("error").is_some() {
            return Err(in_band_error("gemini", &v));
        }
        Ok(self.response(&v))
    }

    fn complete(&self) -> bool {
        self.finished
    }
}
