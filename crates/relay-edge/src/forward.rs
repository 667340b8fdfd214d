//! The OpenAI endpoints clients call besides chat: legacy `/v1/completions`, `/v1/moderations`,
//! `/v1/images/generations`, `/v1/audio/speech` and `/v1/rerank`. Each runs the same pipeline as chat
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
use relay_core::pb::common::v1::Protocol;
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
}

pub const COMPLETIONS: Endpoint = Endpoint { operation: "completions", required: &["prompt"] };
pub const MODERATIONS: Endpoint = Endpoint { operation: "moderations", required: &["input"] };
pub const IMAGES: Endpoint = Endpoint { operation: "images/generations", required: &["prompt"] };
pub const SPEECH: Endpoint = Endpoint { operation: "audio/speech", required: &["input"] };
pub const RERANK: Endpoint = Endpoint { operation: "rerank", required: &["query", "documents"] };

/// `max_tokens` of a legacy completion bounds its answer (the API's default is 16).
fn output_limit(e: Endpoint, body: &Map<String, Value>) -> Result<OutputLimit, RelayError> {
    if e.operation != "completions" {
        return Ok(OutputLimit { tokens: Some(0), choices: 1 });
    }
    let tokens = match body.get("max_tokens") {
        None | Some(Value::Null) => 16,
        Some(v) => v.as_u64().filter(|n| *n <= crate::dispatch::MAX_OUTPUT_TOKENS).ok_or_else(|| {
            RelayError::invalid_request("max_tokens must be a whole number").with_param("max_tokens")
        })?,
    };
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, crate::dispatch::MAX_CHOICES);
    Ok(OutputLimit { tokens: Some(tokens), choices: n })
}

pub async fn handle(edge: Edge, ctx: RequestCtx, headers: HeaderMap, body: Body, e: Endpoint) -> Response {
    let p = match edge.principal(&ctx, &headers).await {
        Ok(p) => p,
        Err(err) => return OpenAiError(err).into_response(),
    };
    let mut rec = UsageRecord::new(&edge, &ctx, &p, Protocol::OpenaiForwarded);
    match forward(&edge, &ctx, &p, &headers, body, e, &mut rec).await {
        Ok(resp) => {
            rec.usage(resp.usage.unwrap_or_default());
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
) -> Result<ForwardResponse, RelayError> {
    let (bytes, obj): (axum::body::Bytes, Map<String, Value>) = read_json(edge, body).await?;
    let model = required_model(obj.get("model").and_then(Value::as_str).map(str::to_owned))?;
    for field in e.required {
        if obj.get(*field).is_none_or(Value::is_null) {
            return Err(RelayError::invalid_request(format!("you must provide a {field} parameter"))
                .with_param(*field));
        }
    }
    if obj.get("stream").and_then(Value::as_bool) == Some(true)
        || obj.get("stream_format").and_then(Value::as_str) == Some("sse")
    {
        return Err(RelayError::invalid_request(format!(
            "streaming is not supported on /v1/{}: ask for a whole answer (or stream with /v1/chat/completions)",
            e.operation
        ))
        .with_param("stream"));
    }
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
        edge.inner.services.adapter.forward(ForwardRequest {
            request_id: ctx.request_id.clone(),
            operation: e.operation.to_owned(),
            body: bytes.clone(),
            deployment: Some(dep.clone()),
        })
    })
    .await
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

endpoint_handler!(completions, COMPLETIONS);
endpoint_handler!(moderations, MODERATIONS);
endpoint_handler!(images, IMAGES);
endpoint_handler!(speech, SPEECH);
endpoint_handler!(rerank, RERANK);
