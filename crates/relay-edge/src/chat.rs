//! The chat routes: OpenAI `POST /v1/chat/completions`, Anthropic `POST /v1/messages` (and
//! `/v1/messages/count_tokens`), OpenAI `POST /v1/responses`. Each authenticates, reads and checks the few
//! fields the edge needs, routes, dispatches with failover before the first byte, then forwards the
//! adapter's bytes as they arrive. Errors answer in the route's protocol shape.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use relay_core::contracts::{ChatEventStream, RateHeaders};
use relay_core::pb::adapter::v1::{ChatRequest, CountTokensRequest, chat_event::Event};
use relay_core::pb::auth::v1::Principal;
use relay_core::{ErrorCode, RelayError};
use serde::Deserialize;
use serde_json::Value;

use crate::Edge;
use crate::dispatch::{admission, admit, ensure_allowed, read_json, required_model, route, with_failover};
use crate::error::Inbound;
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
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
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
            _ => Ok(()),
        }
    }

    /// The answer-length limit the client set, in whichever protocol field.
    fn max_output(&self) -> Option<u64> {
        [&self.max_completion_tokens, &self.max_tokens, &self.max_output_tokens]
            .iter()
            .find_map(|v| v.as_ref()?.as_u64())
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
    serve(edge.0, ctx.0, headers, body, Inbound::OpenAiChat).await
}

pub async fn messages(
    edge: State<Edge>,
    ctx: Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(edge.0, ctx.0, headers, body, Inbound::Anthropic).await
}

pub async fn responses(
    edge: State<Edge>,
    ctx: Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(edge.0, ctx.0, headers, body, Inbound::Responses).await
}

async fn serve(edge: Edge, ctx: RequestCtx, headers: HeaderMap, body: Body, inbound: Inbound) -> Response {
    let principal = match edge.principal(&ctx, &headers).await {
        Ok(p) => p,
        Err(e) => return inbound.error(e),
    };
    let mut rec = UsageRecord::new(&edge, &ctx, &principal, inbound.protocol());
    match dispatch(&edge, &ctx, &principal, &headers, body, inbound, &mut rec).await {
        Ok((events, true, rate)) => with_rate_headers(stream_response(events, rec, inbound), &rate),
        Ok((events, false, rate)) => with_rate_headers(whole_response(events, rec, inbound).await, &rate),
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

async fn dispatch(
    edge: &Edge,
    ctx: &RequestCtx,
    principal: &Principal,
    headers: &HeaderMap,
    body: Body,
    inbound: Inbound,
    rec: &mut UsageRecord,
) -> Result<(ChatEventStream, bool, RateHeaders), (RelayError, RateHeaders)> {
    let plain = |e: RelayError| (e, Vec::new());
    let (bytes, env): (Bytes, Envelope) =
        read_json(body, edge.inner.cfg.max_body_bytes).await.map_err(plain)?;
    let model = required_model(env.model.clone()).map_err(plain)?;
    env.validate(inbound).map_err(plain)?;
    let stream = env.stream.unwrap_or(false);
    rec.request(&model, stream, env.end_user());
    ensure_allowed(principal, &model).map_err(plain)?;
    let route = route(edge, &model, stream).await.map_err(plain)?;
    let lease = admission(ctx, principal, bytes.len(), env.max_output(), &route.candidates);
    let rate = admit(edge, rec, lease).await.map_err(|d| (d.error, d.headers))?;
    let wants_usage = env.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let passthrough = passthrough(inbound, headers);
    let events = with_failover(&route.candidates, Some(rec), |dep| {
        let req = ChatRequest {
            request_id: ctx.request_id.clone(),
            protocol: inbound.protocol() as i32,
            body: bytes.clone(),
            deployment: Some(dep.clone()),
            stream,
            client_wants_usage: wants_usage,
            passthrough_headers: passthrough.clone(),
            client_model: model.clone(),
        };
        open(edge, req)
    })
    .await
    .map_err(|e| (e, rate.clone()))?;
    Ok((events, stream, rate))
}

/// Calls the adapter and waits for the upstream to accept (the `Start` event). A failure before that is
/// returned as an error, so the caller can fail over or answer with a real HTTP status.
async fn open(edge: &Edge, req: ChatRequest) -> Result<ChatEventStream, RelayError> {
    let mut events = edge.inner.services.adapter.chat(req).await?;
    match events.next().await.and_then(|e| e.event) {
        Some(Event::Start(_)) => Ok(events),
        Some(Event::Error(e)) => Err(RelayError::from_pb(&e)),
        _ => {
            Err(RelayError::new(ErrorCode::UpstreamProtocol, "the adapter ended the call without an answer"))
        }
    }
}

async fn whole_response(mut events: ChatEventStream, mut rec: UsageRecord, inbound: Inbound) -> Response {
    let mut body = Vec::new();
    while let Some(ev) = events.next().await {
        match ev.event {
            Some(Event::Chunk(c)) => body.extend_from_slice(&c.data),
            Some(Event::Usage(u)) => rec.usage(u),
            Some(Event::Error(e)) => {
                let e = RelayError::from_pb(&e);
                rec.fail(&e, e.http_status());
                return inbound.error(e);
            }
            Some(Event::Start(_) | Event::Finish(_)) | None => {}
        }
    }
    rec.first_byte();
    rec.succeed();
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn stream_response(events: ChatEventStream, rec: UsageRecord, inbound: Inbound) -> Response {
    let body =
        Body::from_stream(ForwardStream { events, rec: Some(rec), inbound, span: tracing::Span::current() });
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// The response body of a stream: adapter bytes out as they come, side events into the usage record.
/// Dropped early (client gone) it drops the adapter stream, which cancels the upstream call, and the
/// record reports the request as cancelled.
struct ForwardStream {
    events: ChatEventStream,
    rec: Option<UsageRecord>,
    inbound: Inbound,
    span: tracing::Span,
}

impl Stream for ForwardStream {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let _g = this.span.enter();
        loop {
            let Some(rec) = this.rec.as_mut() else {
                return Poll::Ready(None);
            };
            let ev = match this.events.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(ev) => ev,
            };
            match ev.and_then(|e| e.event) {
                Some(Event::Chunk(c)) => {
                    rec.first_byte();
                    return Poll::Ready(Some(Ok(c.data)));
                }
                Some(Event::Usage(u)) => rec.usage(u),
                Some(Event::Start(_) | Event::Finish(_)) => {}
                Some(Event::Error(e)) => {
                    let e = RelayError::from_pb(&e);
                    if let Some(rec) = this.rec.take() {
                        rec.fail(&e, 200);
                    }
                    return Poll::Ready(Some(Ok(this.inbound.stream_error(&e))));
                }
                None => {
                    if let Some(rec) = this.rec.take() {
                        rec.succeed();
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
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
    let result = async {
        let principal = edge.principal(&ctx, &headers).await?;
        let (bytes, env): (Bytes, Envelope) = read_json(body, edge.inner.cfg.max_body_bytes).await?;
        let model = required_model(env.model)?;
        ensure_allowed(&principal, &model)?;
        let route = route(&edge, &model, false).await?;
        let passthrough = passthrough(inbound, &headers);
        with_failover(&route.candidates, None, |dep| {
            edge.inner.services.adapter.count_tokens(CountTokensRequest {
                request_id: ctx.request_id.clone(),
                protocol: inbound.protocol() as i32,
                body: bytes.clone(),
                deployment: Some(dep.clone()),
                passthrough_headers: passthrough.clone(),
            })
        })
        .await
    }
    .await;
    match result {
        Ok(r) => axum::Json(serde_json::json!({"input_tokens": r.input_tokens})).into_response(),
        Err(e) => inbound.error(e),
    }
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
