//! `POST /v1/chat/completions`: authenticate, read and check the body, route, dispatch with failover before
//! the first byte, then forward the adapter's bytes as they arrive.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use relay_core::contracts::ChatEventStream;
use relay_core::pb::adapter::v1::{ChatRequest, chat_event::Event};
use relay_core::pb::auth::v1::Principal;
use relay_core::pb::common::v1::Protocol;
use relay_core::pb::routing::v1::{Deployment, RouteRequest, RouteResponse};
use relay_core::{ErrorCode, RelayError};
use serde::Deserialize;

use crate::Edge;
use crate::error::{OpenAiError, openai_stream_error};
use crate::request::RequestCtx;
use crate::usage::UsageRecord;

/// The few fields the edge reads; everything else is the adapter's business and passes through untouched.
#[derive(Deserialize)]
struct ChatEnvelope {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

pub async fn chat_completions(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let principal = match edge
        .inner
        .principals
        .authenticate(edge.inner.services.auth.as_ref(), &headers)
        .await
    {
        Ok(p) => p,
        Err(e) => return OpenAiError(e).into_response(),
    };
    let mut rec = UsageRecord::new(&edge, &ctx, &principal, Protocol::OpenaiChat);
    match handle(&edge, &ctx, &principal, body, &mut rec).await {
        Ok(Dispatched { events, stream: true }) => stream_response(events, rec),
        Ok(Dispatched {
            events,
            stream: false,
        }) => whole_response(events, rec).await,
        Err(e) => {
            let status = e.http_status();
            rec.fail(&e, status);
            OpenAiError(e).into_response()
        }
    }
}

struct Dispatched {
    events: ChatEventStream,
    stream: bool,
}

async fn handle(
    edge: &Edge,
    ctx: &RequestCtx,
    principal: &Principal,
    body: Body,
    rec: &mut UsageRecord,
) -> Result<Dispatched, RelayError> {
    let (bytes, env): (Bytes, ChatEnvelope) = read_json(body, edge.inner.cfg.max_body_bytes).await?;
    let model = required_model(env.model)?;
    match &env.messages {
        Some(serde_json::Value::Array(a)) if !a.is_empty() => {}
        _ => {
            return Err(
                RelayError::invalid_request("`messages` must be a non-empty array").with_param("messages"),
            );
        }
    }
    let stream = env.stream.unwrap_or(false);
    rec.request(&model, stream, env.user.as_deref().unwrap_or(""));
    ensure_allowed(principal, &model)?;
    let route = route(edge, &model, stream).await?;
    let wants_usage = env.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let events = with_failover(&route.candidates, rec, |dep| {
        let req = ChatRequest {
            request_id: ctx.request_id.clone(),
            protocol: Protocol::OpenaiChat as i32,
            body: bytes.clone(),
            deployment: Some(dep.clone()),
            stream,
            client_wants_usage: wants_usage,
            passthrough_headers: Default::default(),
            client_model: model.clone(),
        };
        open(edge, req)
    })
    .await?;
    Ok(Dispatched { events, stream })
}

/// Tries each candidate in order until one accepts; moves on only on retryable failures.
pub async fn with_failover<T, F, Fut>(
    candidates: &[Deployment],
    rec: &mut UsageRecord,
    mut call: F,
) -> Result<T, RelayError>
where
    F: FnMut(&Deployment) -> Fut,
    Fut: std::future::Future<Output = Result<T, RelayError>>,
{
    let mut last = None;
    for (i, dep) in candidates.iter().enumerate() {
        rec.attempt(dep);
        match call(dep).await {
            Ok(v) => return Ok(v),
            Err(e) if e.code.is_retryable() && i + 1 < candidates.len() => {
                note_failover(dep, &e);
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        RelayError::new(
            ErrorCode::Unavailable,
            "no deployment is available for this model",
        )
    }))
}

fn note_failover(dep: &Deployment, e: &RelayError) {
    metrics::counter!("relay_edge_failover_total", "code" => e.code.as_str()).increment(1);
    tracing::warn!(deployment = %dep.id, code = e.code.as_str(), "deployment failed before first byte; trying next");
}

/// Reads the body up to `limit` bytes (anything larger is refused without being read to the end) and
/// parses the fields a handler needs; the bytes are kept to forward untouched.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    body: Body,
    limit: usize,
) -> Result<(Bytes, T), RelayError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        RelayError::new(
            ErrorCode::PayloadTooLarge,
            format!("Request body too large: the limit is {limit} bytes."),
        )
    })?;
    let parsed = serde_json::from_slice(&bytes).map_err(|e| {
        RelayError::invalid_request(format!("We could not parse the JSON body of your request: {e}"))
    })?;
    Ok((bytes, parsed))
}

pub fn required_model(model: Option<String>) -> Result<String, RelayError> {
    model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| RelayError::invalid_request("you must provide a model parameter").with_param("model"))
}

pub fn ensure_allowed(principal: &Principal, model: &str) -> Result<(), RelayError> {
    if relay_core::model_allowed(&principal.allowed_models, model) {
        Ok(())
    } else {
        Err(RelayError::new(
            ErrorCode::PermissionDenied,
            format!("This key may not use model `{model}`."),
        )
        .with_param("model"))
    }
}

pub async fn route(edge: &Edge, model: &str, stream: bool) -> Result<Arc<RouteResponse>, RelayError> {
    if let Some(r) = edge.inner.routes.get(&model.to_owned()) {
        return Ok(r);
    }
    let req = RouteRequest {
        model: model.to_owned(),
        stream,
        ..Default::default()
    };
    let resp = Arc::new(edge.inner.services.router.route(req).await?);
    let ttl = std::time::Duration::from_millis(u64::from(resp.cache_ttl_ms));
    edge.inner.routes.insert(model.to_owned(), resp.clone(), ttl);
    Ok(resp)
}

/// Calls the adapter and waits for the upstream to accept (the `Start` event). A failure before that is
/// returned as an error, so the caller can fail over or answer with a real HTTP status.
async fn open(edge: &Edge, req: ChatRequest) -> Result<ChatEventStream, RelayError> {
    let mut events = edge.inner.services.adapter.chat(req).await?;
    match events.next().await.and_then(|e| e.event) {
        Some(Event::Start(_)) => Ok(events),
        Some(Event::Error(e)) => Err(RelayError::from_pb(&e)),
        _ => Err(RelayError::new(
            ErrorCode::UpstreamProtocol,
            "the adapter ended the call without an answer",
        )),
    }
}

async fn whole_response(mut events: ChatEventStream, mut rec: UsageRecord) -> Response {
    let mut body = Vec::new();
    while let Some(ev) = events.next().await {
        match ev.event {
            Some(Event::Chunk(c)) => body.extend_from_slice(&c.data),
            Some(Event::Usage(u)) => rec.usage(u),
            Some(Event::Error(e)) => {
                let e = RelayError::from_pb(&e);
                rec.fail(&e, e.http_status());
                return OpenAiError(e).into_response();
            }
            Some(Event::Start(_) | Event::Finish(_)) | None => {}
        }
    }
    rec.first_byte();
    rec.succeed();
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn stream_response(events: ChatEventStream, rec: UsageRecord) -> Response {
    let body = Body::from_stream(ForwardStream {
        events,
        rec: Some(rec),
        span: tracing::Span::current(),
    });
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
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
                    return Poll::Ready(Some(Ok(openai_stream_error(&e))));
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
