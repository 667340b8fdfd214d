//! The chat routes: OpenAI `POST /v1/chat/completions`, Anthropic `POST /v1/messages` (and
//! `/v1/messages/count_tokens`), OpenAI `POST /v1/responses`. Each authenticates, reads and checks the few
//! fields the edge needs, routes, admits, and hands the call to [`answer`] (failover, forwarding, what
//! happens when the client leaves). Errors answer in the route's protocol shape.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use relay_core::RelayError;
use relay_core::contracts::RateHeaders;
use relay_core::pb::adapter::v1::{ChatRequest, CountTokensRequest};
use relay_core::pb::auth::v1::Principal;
use serde::Deserialize;
use serde_json::Value;

use crate::Edge;
use crate::answer::{self, ChatCall};
use crate::dispatch::{
    Order, admission, admit, billable, check_end_user, decide, ensure_allowed, read_json, required_model,
    resident, route,
};
use crate::error::Inbound;
use crate::failover::with_failover;
use crate::request::RequestCtx;
use crate::usage::UsageRecord;

/// The few fields the edge reads, across the chat protocols; everything else is the adapter's business and
/// passes through untouched.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Shape>,
    #[serde(default)]
    input: Option<Shape>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<Value>,
    #[serde(default)]
    n: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
    /// Legacy completions: the prompt.
    #[serde(default)]
    prompt: Option<Shape>,
    /// Gemini: the turns, and the limits inside `generationConfig`.
    #[serde(default)]
    contents: Option<Shape>,
    #[serde(default, rename = "generationConfig", alias = "generation_config")]
    generation_config: Option<GenerationConfig>,
}

#[derive(Deserialize)]
struct GenerationConfig {
    #[serde(default, rename = "maxOutputTokens", alias = "max_output_tokens")]
    max_output_tokens: Option<Value>,
    #[serde(default, rename = "candidateCount", alias = "candidate_count")]
    candidate_count: Option<Value>,
}

/// A JSON value's kind, read without building the value: message arrays can be megabytes of images, and
/// the edge only needs to know they are non-empty (the adapter parses them once, where it must).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Array(usize),
    String,
    Other,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> serde::de::Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mut n = 0;
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            n += 1;
        }
        Ok(Shape::Array(n))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        Ok(Shape::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::String)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl Envelope {
    /// Shape checks each protocol's own API would make before doing anything.
    fn validate(&self, inbound: Inbound) -> Result<(), RelayError> {
        let param = if self.user.is_some() { "user" } else { "metadata.user_id" };
        check_end_user(self.end_user(), param)?;
        let non_empty_array = |v: &Option<Shape>| matches!(v, Some(Shape::Array(n)) if *n > 0);
        match inbound {
            Inbound::OpenAiChat if !non_empty_array(&self.messages) => {
                Err(RelayError::invalid_request("`messages` must be a non-empty array")
                    .with_param("messages"))
            }
            Inbound::Anthropic if !non_empty_array(&self.messages) => {
                Err(RelayError::invalid_request("messages: Field required").with_param("messages"))
            }
            Inbound::Anthropic if !self.max_tokens.as_ref().is_some_and(Value::is_u64) => {
                Err(RelayError::invalid_request("max_tokens: Field required").with_param("max_tokens"))
            }
            Inbound::Responses if self.input != Some(Shape::String) && !non_empty_array(&self.input) => {
                Err(RelayError::invalid_request("`input` must be a string or a non-empty array")
                    .with_param("input"))
            }
            Inbound::Completions if self.prompt.is_none() => {
                Err(RelayError::invalid_request("you must provide a prompt parameter").with_param("prompt"))
            }
            Inbound::Gemini if !non_empty_array(&self.contents) => Err(RelayError::invalid_request(
                "* GenerateContentRequest.contents: contents is not specified",
            )
            .with_param("contents")),
            _ => Ok(()),
        }
    }

    /// The answer-length limit the client set, read from the one field the upstream will obey for this
    /// protocol (OpenAI chat: `max_completion_tokens`, else `max_tokens`; Anthropic: `max_tokens`;
    /// Responses: `max_output_tokens`), and how many answers it asks for (`n`). A limit that is not a
    /// whole number in range is a 400, so a reservation is always a real bound.
    fn output_limit(&self, inbound: Inbound) -> Result<crate::dispatch::OutputLimit, RelayError> {
        let present = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).is_some();
        let (param, value) = match inbound {
            Inbound::OpenAiChat if present(&self.max_completion_tokens) => {
                ("max_completion_tokens", &self.max_completion_tokens)
            }
            Inbound::OpenAiChat | Inbound::Anthropic | Inbound::Embeddings | Inbound::Completions => {
                ("max_tokens", &self.max_tokens)
            }
            Inbound::Responses => ("max_output_tokens", &self.max_output_tokens),
            Inbound::Gemini => {
                static UNSET: Option<Value> = None;
                let limit = self.generation_config.as_ref().map_or(&UNSET, |g| &g.max_output_tokens);
                ("generationConfig.maxOutputTokens", limit)
            }
        };
        let tokens = crate::dispatch::token_count(param, value.as_ref(), crate::dispatch::MAX_OUTPUT_TOKENS)?;
        let choices = match inbound {
            Inbound::OpenAiChat | Inbound::Completions => {
                crate::dispatch::token_count("n", self.n.as_ref(), crate::dispatch::MAX_CHOICES)?
                    .unwrap_or(1)
                    .max(1)
            }
            Inbound::Gemini => crate::dispatch::token_count(
                "generationConfig.candidateCount",
                self.generation_config.as_ref().and_then(|g| g.candidate_count.as_ref()),
                crate::dispatch::MAX_CHOICES,
            )?
            .unwrap_or(1)
            .max(1),
            _ => 1,
        };
        Ok(crate::dispatch::OutputLimit { tokens, choices, images: 0 })
    }

    fn end_user(&self) -> &str {
        self.user
            .as_deref()
            .or_else(|| self.metadata.as_ref().and_then(|m| m.get("user_id")).and_then(Value::as_str))
            .unwrap_or("")
    }
}

/// Client headers an upstream of the same protocol needs (lower-case names).
fn passthrough(inbound: Inbound, headers: &HeaderMap) -> HashMap<String, String> {
    let names: &[&str] =
        if inbound == Inbound::Anthropic { &["anthropic-version", "anthropic-beta"] } else { &[] };
    names
        .iter()
        .filter_map(|n| {
            headers.get(*n).and_then(|v| v.to_str().ok()).map(|v| ((*n).to_owned(), v.to_owned()))
        })
        .collect()
}

pub async fn chat_completions(
    edge: State<Edge>,
    ctx: Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(edge.0, ctx.0, headers, body, Inbound::OpenAiChat, InUrl::default()).await
}

pub async fn messages(
    edge: State<Edge>,
    ctx: Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(edge.0, ctx.0, headers, body, Inbound::Anthropic, InUrl::default()).await
}

pub async fn responses(
    edge: State<Edge>,
    ctx: Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(edge.0, ctx.0, headers, body, Inbound::Responses, InUrl::default()).await
}

/// What a protocol carries in the URL rather than the body (Gemini: the model and whether to stream).
#[derive(Debug, Clone, Default)]
pub struct InUrl {
    pub model: Option<String>,
    pub stream: Option<bool>,
}

pub async fn serve(
    edge: Edge,
    ctx: RequestCtx,
    headers: HeaderMap,
    body: Body,
    inbound: Inbound,
    url: InUrl,
) -> Response {
    let principal = match edge.principal(&ctx, &headers).await {
        Ok(p) => p,
        Err(e) => return inbound.error(e),
    };
    let mut rec = UsageRecord::new(&edge, &ctx, &principal, inbound.protocol());
    match prepare(&edge, &ctx, &principal, &headers, body, (inbound, url), &mut rec).await {
        Ok((call, rate)) => with_rate_headers(answer::respond(edge, call, rec).await, &rate),
        Err((e, rate)) => {
            rec.fail(&e, e.http_status());
            with_rate_headers(inbound.error(e), &rate)
        }
    }
}

fn with_rate_headers(mut resp: Response, rate: &RateHeaders) -> Response {
    for (name, value) in rate {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(*name, v);
        }
    }
    resp
}

/// Everything before the upstream call: the body read and checked, the route, the admission.
async fn prepare(
    edge: &Edge,
    ctx: &RequestCtx,
    principal: &Principal,
    headers: &HeaderMap,
    body: Body,
    (inbound, url): (Inbound, InUrl),
    rec: &mut UsageRecord,
) -> Result<(ChatCall, RateHeaders), (RelayError, RateHeaders)> {
    let plain = |e: RelayError| (e, Vec::new());
    let (bytes, env): (Bytes, Envelope) = read_json(edge, body).await.map_err(plain)?;
    let model = required_model(url.model.or_else(|| env.model.clone())).map_err(plain)?;
    env.validate(inbound).map_err(plain)?;
    let limit = env.output_limit(inbound).map_err(plain)?;
    let stream = url.stream.or(env.stream).unwrap_or(false);
    rec.request(&model, stream, env.end_user(), &bytes);
    ensure_allowed(principal, &model).map_err(plain)?;
    let route = route(edge, &model, stream).await.map_err(plain)?;
    // Responses state: Relay's (earlier turns and referenced items expanded into the body sent on), or
    // the provider's (the ids checked to be the org's, the body sent as it is).
    let (bytes, state) = match inbound {
        Inbound::Responses if route.provider_responses_state => {
            crate::state::provider_owned(edge, principal, bytes).await.map_err(plain)?
        }
        Inbound::Responses => crate::state::expand(edge, principal, bytes).await.map_err(plain)?,
        _ => (bytes, None),
    };
    if inbound == Inbound::Responses {
        rec.request(&model, stream, env.end_user(), &bytes);
    }
    let candidates = resident(principal, &model, &route.candidates).map_err(plain)?;
    let candidates = billable(principal, &model, &candidates).map_err(plain)?;
    let lease = admission(ctx, principal, bytes.len(), limit, &candidates);
    let rate = admit(edge, rec, lease).await.map_err(|d| (d.error, d.headers))?;
    let decision = decide(edge, headers, principal, &route, rec.lease()).await.map_err(plain)?;
    rec.routing_rule(decision.rule.as_deref());
    let drain_max = std::time::Duration::from_secs(edge.inner.cfg.drain_max_secs);
    let policy = answer::Policy::of(route.on_disconnect(), stream, drain_max);
    let request = ChatRequest {
        request_id: ctx.request_id.clone(),
        protocol: inbound.protocol() as i32,
        body: bytes,
        deployment: None,
        stream,
        client_wants_usage: env.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        passthrough_headers: passthrough(inbound, headers),
        client_model: model,
    };
    let timeouts = answer::Timeouts::of(&route);
    let tokens = (request.body.len() as u64 / 4, limit.tokens.unwrap_or(1024).saturating_mul(limit.choices));
    let order = Order {
        strategy: decision.strategy,
        tokens,
        session: crate::dispatch::session(headers, principal, &route, &request.body),
        hedge_after: None,
    }
    .hedging(&route);
    // The key's own cache setting, else its model group's.
    let ttl = match principal.response_cache_ttl_secs {
        0 => route.response_cache_ttl_secs,
        key => key,
    };
    let cache = crate::replay::plan(
        edge.inner.services.cache.as_ref(),
        principal,
        inbound,
        &request.body,
        stream,
        ttl,
    );
    Ok((
        ChatCall { request, candidates, policy, inbound, timeouts, order, state, cache, cache_ttl_secs: ttl },
        rate,
    ))
}

/// `POST /v1/messages/count_tokens`: input tokens for an Anthropic-shaped request on the routed model
/// (the provider's own count where it has one). Not billed, so no usage event.
pub async fn count_tokens(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let inbound = Inbound::Anthropic;
    match count(&edge, &ctx, &headers, body, inbound, None).await {
        Ok(n) => axum::Json(serde_json::json!({"input_tokens": n})).into_response(),
        Err(e) => inbound.error(e),
    }
}

/// Input tokens of a request in `inbound`'s shape on the routed model (`model` when the URL names it).
pub async fn count(
    edge: &Edge,
    ctx: &RequestCtx,
    headers: &HeaderMap,
    body: Body,
    inbound: Inbound,
    model: Option<String>,
) -> Result<u64, RelayError> {
    let principal = edge.principal(ctx, headers).await?;
    let (bytes, env): (Bytes, Envelope) = read_json(edge, body).await?;
    let model = required_model(model.or(env.model))?;
    ensure_allowed(&principal, &model)?;
    let route = route(edge, &model, false).await?;
    let passthrough = passthrough(inbound, headers);
    let candidates = resident(&principal, &model, &route.candidates)?;
    let strategy = decide(edge, headers, &principal, &route, None).await?.strategy;
    let order = Order { strategy, ..Default::default() };
    let r = with_failover(edge, &candidates, order, None, |dep| {
        edge.inner.services.adapter.count_tokens(CountTokensRequest {
            request_id: ctx.request_id.clone(),
            protocol: inbound.protocol() as i32,
            body: bytes.clone(),
            deployment: Some(dep.clone()),
            passthrough_headers: passthrough.clone(),
        })
    })
    .await?;
    Ok(r.input_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_read_without_building_values() {
        let shape = |j: &str| serde_json::from_str::<Shape>(j).unwrap();
        assert_eq!(shape(r#"[{"role":"user","content":[{"type":"image_url"}]},1,"x"]"#), Shape::Array(3));
        assert_eq!(shape("[]"), Shape::Array(0));
        assert_eq!(shape(r#""hello""#), Shape::String);
        for other in ["{}", r#"{"a":[1]}"#, "null", "true", "-3", "4.5", "7"] {
            assert_eq!(shape(other), Shape::Other, "{other}");
        }
        assert!(serde_json::from_str::<Shape>("[1,").is_err());
    }
}
