//! The OpenAI endpoints clients call besides chat: legacy `/v1/completions`, `/v1/moderations`,
//! `/v1/images/generations`, `/v1/audio/speech`, `/v1/rerank`, and the multipart forms of
//! `/v1/audio/transcriptions` and `/v1/audio/translations`. Each runs the same pipeline as chat
//! (key, model allowlist, routing, limits and budgets, failover, one usage event) and is forwarded to the
//! routed upstream with only the model rewritten, when that upstream speaks OpenAI's API; elsewhere it is
//! a 400 that says so. Answers come back whole (a streamed variant is a 400 naming `stream`); usage is
//! the answer's own `usage` when it has one.

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use relay_core::RelayError;
use relay_core::pb::adapter::v1::{ForwardRequest, ForwardResponse};
use relay_core::pb::auth::v1::Principal;
use relay_core::pb::common::v1::{Protocol, TokenUsage};
use serde_json::{Map, Value};

use crate::Edge;
use crate::dispatch::{
    Order, OutputLimit, admission, admit, billable, check_end_user, decide, ensure_allowed, read_json,
    required_model, resident, route, served_headers,
};
use crate::error::OpenAiError;
use crate::failover::with_failover;
use crate::request::RequestCtx;
use crate::usage::UsageRecord;

/// One forwarded endpoint: its operation under the API root and the field a request cannot lack.
#[derive(Clone, Copy)]
pub struct Endpoint {
    pub operation: &'static str,
    required: &'static [&'static str],
    /// A multipart/form-data body (audio uploads) rather than JSON.
    form: bool,
}

const fn json_endpoint(operation: &'static str, required: &'static [&'static str]) -> Endpoint {
    Endpoint { operation, required, form: false }
}

pub const COMPLETIONS: Endpoint = json_endpoint("completions", &["prompt"]);
pub const MODERATIONS: Endpoint = json_endpoint("moderations", &["input"]);
pub const IMAGES: Endpoint = json_endpoint("images/generations", &["prompt"]);
pub const SPEECH: Endpoint = json_endpoint("audio/speech", &["input"]);
pub const RERANK: Endpoint = json_endpoint("rerank", &["query", "documents"]);
pub const TRANSCRIPTIONS: Endpoint =
    Endpoint { operation: "audio/transcriptions", required: &["file"], form: true };
pub const TRANSLATIONS: Endpoint =
    Endpoint { operation: "audio/translations", required: &["file"], form: true };

impl Endpoint {
    /// Images an answer of `/v1/images/generations` holds (the unit image models are priced by).
    fn images(&self, body: &[u8]) -> u64 {
        if self.operation != "images/generations" {
            return 0;
        }
        #[derive(serde::Deserialize)]
        struct Images {
            #[serde(default)]
            data: Vec<serde::de::IgnoredAny>,
        }
        serde_json::from_slice::<Images>(body).map_or(0, |i| i.data.len() as u64)
    }
}

/// A request body as read: JSON fields, or a form's parts (its `model` rewritten per deployment).
enum Payload {
    Json(axum::body::Bytes),
    Form(Vec<crate::multipart::Part>),
}

impl Payload {
    /// The body and content type for one deployment.
    fn for_deployment(&self, upstream_model: &str) -> (axum::body::Bytes, String) {
        match self {
            Self::Json(b) => (b.clone(), String::new()),
            Self::Form(parts) => {
                let mut parts = parts.clone();
                for p in parts.iter_mut().filter(|p| p.name == "model" && p.filename.is_none()) {
                    p.data = axum::body::Bytes::copy_from_slice(upstream_model.as_bytes());
                }
                let boundary = format!("relay-{}", uuid::Uuid::now_v7().simple());
                (
                    crate::multipart::write(&parts, &boundary),
                    format!("multipart/form-data; boundary={boundary}"),
                )
            }
        }
    }
}

/// Reads a form: its fields as a JSON object of strings (files left out), and its parts.
async fn read_form(
    edge: &Edge,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Map<String, Value>, Vec<crate::multipart::Part>), RelayError> {
    let kind = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let boundary = crate::multipart::boundary(kind)?;
    let limit = edge.inner.cfg.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        RelayError::new(
            relay_core::ErrorCode::PayloadTooLarge,
            format!("The request body is over {limit} bytes."),
        )
    })?;
    let parts = crate::multipart::parse(&bytes, &boundary)?;
    let mut fields = Map::new();
    for p in &parts {
        let value = match &p.filename {
            Some(_) => Value::Bool(true),
            None => Value::String(String::from_utf8_lossy(&p.data).into_owned()),
        };
        fields.insert(p.name.clone(), value);
    }
    Ok((fields, parts))
}

/// `max_tokens` of a legacy completion bounds its answer (the API's default is 16).
fn output_limit(e: Endpoint, body: &Map<String, Value>) -> Result<OutputLimit, RelayError> {
    if e.operation != "completions" {
        // An image request reserves the images it asks for (`n`, 1 by default).
        let images = match e.operation {
            "images/generations" => {
                body.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, crate::dispatch::MAX_CHOICES)
            }
            _ => 0,
        };
        return Ok(OutputLimit { tokens: Some(0), choices: 1, images });
    }
    let tokens = match body.get("max_tokens") {
        None | Some(Value::Null) => 16,
        Some(v) => v.as_u64().filter(|n| *n <= crate::dispatch::MAX_OUTPUT_TOKENS).ok_or_else(|| {
            RelayError::invalid_request("max_tokens must be a whole number").with_param("max_tokens")
        })?,
    };
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, crate::dispatch::MAX_CHOICES);
    Ok(OutputLimit { tokens: Some(tokens), choices: n, images: 0 })
}

pub async fn handle(edge: Edge, ctx: RequestCtx, headers: HeaderMap, body: Body, e: Endpoint) -> Response {
    let p = match edge.principal(&ctx, &headers).await {
        Ok(p) => p,
        Err(err) => return OpenAiError(err).into_response(),
    };
    let mut rec = UsageRecord::new(&edge, &ctx, &p, Protocol::OpenaiForwarded);
    match forward(&edge, &ctx, &p, &headers, body, e, &mut rec).await {
        Ok((resp, characters)) => {
            let images = e.images(&resp.body);
            rec.usage(TokenUsage { images, characters, ..resp.usage.unwrap_or_default() });
            rec.first_byte();
            let mut r = (StatusCode::OK, resp.body).into_response();
            let kind = HeaderValue::from_str(&resp.content_type)
                .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
            r.headers_mut().insert(header::CONTENT_TYPE, kind);
            served_headers(r.headers_mut(), &rec);
            rec.succeed();
            r
        }
        Err(err) => {
            let mut r = OpenAiError(err.clone()).into_response();
            served_headers(r.headers_mut(), &rec);
            rec.fail(&err, err.http_status());
            r
        }
    }
}

async fn forward(
    edge: &Edge,
    ctx: &RequestCtx,
    p: &Principal,
    headers: &HeaderMap,
    body: Body,
    e: Endpoint,
    rec: &mut UsageRecord,
) -> Result<(ForwardResponse, u64), RelayError> {
    let (payload, obj) = if e.form {
        let (fields, parts) = read_form(edge, headers, body).await?;
        (Payload::Form(parts), fields)
    } else {
        let (bytes, obj): (axum::body::Bytes, Map<String, Value>) = read_json(edge, body).await?;
        (Payload::Json(bytes), obj)
    };
    // What a reservation and the access log see: the JSON body, or a form's text fields (not its audio).
    let bytes = match &payload {
        Payload::Json(b) => b.clone(),
        Payload::Form(_) => {
            let text: Map<String, Value> =
                obj.iter().filter(|(_, v)| v.is_string()).map(|(k, v)| (k.clone(), v.clone())).collect();
            axum::body::Bytes::from(Value::Object(text).to_string())
        }
    };
    let model = required_model(obj.get("model").and_then(Value::as_str).map(str::to_owned))?;
    for field in e.required {
        if obj.get(*field).is_none_or(Value::is_null) {
            return Err(RelayError::invalid_request(format!("you must provide a {field} parameter"))
                .with_param(*field));
        }
    }
    let streamed =
        |v: Option<&Value>| matches!(v, Some(Value::Bool(true))) || v.and_then(Value::as_str) == Some("true");
    if streamed(obj.get("stream")) || obj.get("stream_format").and_then(Value::as_str) == Some("sse") {
        return Err(RelayError::invalid_request(format!(
            "streaming is not supported on /v1/{}: ask for a whole answer (or stream with /v1/chat/completions)",
            e.operation
        ))
        .with_param("stream"));
    }
    // Speech is priced by the characters it reads.
    let characters = match e.operation {
        "audio/speech" => obj.get("input").and_then(Value::as_str).map_or(0, |s| s.chars().count() as u64),
        _ => 0,
    };
    let user = obj.get("user").and_then(Value::as_str).unwrap_or("");
    check_end_user(user, "user")?;
    let limit = output_limit(e, &obj)?;
    rec.request(&model, false, user, &bytes);
    ensure_allowed(p, &model)?;
    let route = route(edge, &model, false).await?;
    let candidates = resident(p, &model, &route.candidates)?;
    let candidates = billable(p, &model, &candidates)?;
    let lease = admission(ctx, p, bytes.len(), limit, &candidates);
    admit(edge, rec, lease).await.map_err(|d| d.error)?;
    let decision = decide(edge, headers, p, &route, rec.lease()).await?;
    rec.routing_rule(decision.rule.as_deref());
    let tokens = (bytes.len() as u64 / 4, limit.tokens.unwrap_or(0).saturating_mul(limit.choices));
    let order = Order { strategy: decision.strategy, tokens, ..Default::default() }.hedging(&route);
    with_failover(edge, &candidates, order, Some(rec), |dep| {
        let (body, content_type) = payload.for_deployment(&dep.upstream_model);
        edge.inner.services.adapter.forward(ForwardRequest {
            request_id: ctx.request_id.clone(),
            operation: e.operation.to_owned(),
            body,
            deployment: Some(dep.clone()),
            content_type,
        })
    })
    .await
    .map(|r| (r, characters))
}

macro_rules! endpoint_handler {
    ($name:ident, $endpoint:expr) => {
        pub async fn $name(
            State(edge): State<Edge>,
            Extension(ctx): Extension<RequestCtx>,
            headers: HeaderMap,
            body: Body,
        ) -> Response {
            handle(edge, ctx, headers, body, $endpoint).await
        }
    };
}

/// `POST /v1/completions`: a streamed completion runs as a stream (the chat pipeline, forwarded as it is
/// to OpenAI-compatible upstreams); a whole one is forwarded like the other endpoints.
pub async fn completions(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    #[derive(serde::Deserialize)]
    struct Streamed {
        #[serde(default)]
        stream: Option<Value>,
    }
    let (bytes, s): (axum::body::Bytes, Streamed) = match read_json(&edge, body).await {
        Ok(x) => x,
        Err(e) => return OpenAiError(e).into_response(),
    };
    let body = Body::from(bytes);
    if s.stream == Some(Value::Bool(true)) {
        let url = crate::chat::InUrl::default();
        return crate::chat::serve(edge, ctx, headers, body, crate::error::Inbound::Completions, url).await;
    }
    handle(edge, ctx, headers, body, COMPLETIONS).await
}
endpoint_handler!(moderations, MODERATIONS);
endpoint_handler!(images, IMAGES);
endpoint_handler!(speech, SPEECH);
endpoint_handler!(rerank, RERANK);
endpoint_handler!(transcriptions, TRANSCRIPTIONS);
endpoint_handler!(translations, TRANSLATIONS);
