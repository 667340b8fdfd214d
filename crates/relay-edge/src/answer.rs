//! Running one chat call to its end, whatever the client does: failover before the first byte, bytes
//! forwarded as they come, and the model group's disconnect policy when the client leaves early.
//!
//! The call runs in its own tracked task, so a client that goes away (its handler future dropped) cannot
//! cut the accounting short: with `drain` the task keeps reading the upstream (up to `edge.drain_max_secs`)
//! and books the provider's own usage; with `cancel` it stops the upstream and books what was produced
//! (input counted by the adapter afterwards, output delivered so far). Defaults: whole answers drain,
//! streams cancel.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use relay_core::contracts::ChatEventStream;
use relay_core::pb::adapter::v1::{ChatRequest, CountTokensRequest, chat_event::Event};
use relay_core::pb::common::v1::DisconnectPolicy;
use relay_core::pb::routing::v1::Deployment;
use relay_core::{ErrorCode, RelayError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Edge;
use crate::dispatch::served_headers;
use crate::error::Inbound;
use crate::failover::with_failover;
use crate::usage::UsageRecord;

/// What happens when the client leaves mid-answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Keep reading the upstream for at most this long, and bill the provider's usage.
    Drain(Duration),
    /// Stop the upstream; bill the counted input and the output delivered so far.
    Cancel,
}

impl Policy {
    /// The model group's choice, or the default for the answer's kind.
    pub fn of(configured: DisconnectPolicy, stream: bool, drain_max: Duration) -> Self {
        match configured {
            DisconnectPolicy::Drain => Self::Drain(drain_max),
            DisconnectPolicy::Cancel => Self::Cancel,
            DisconnectPolicy::Unspecified if stream => Self::Cancel,
            DisconnectPolicy::Unspecified => Self::Drain(drain_max),
        }
    }
}

/// One chat call, ready to dispatch: the request (its deployment filled in per attempt) and where to try.
pub struct ChatCall {
    pub request: ChatRequest,
    pub candidates: Vec<Deployment>,
    pub policy: Policy,
    pub inbound: Inbound,
    pub timeouts: Timeouts,
    pub order: crate::dispatch::Order,
    /// A stored Responses turn: what to keep once the answer is complete.
    pub state: Option<crate::state::Pending>,
    /// The response cache's plan for this request (its model group caches answers).
    pub cache: Option<crate::replay::Plan>,
    /// The model group's cache TTL (0: it does not cache; no `x-relay-cache` header).
    pub cache_ttl_secs: u32,
}

/// The model group's timeouts (`None` = no limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    /// Until a deployment accepts (its `Start`): past it that attempt fails as a timeout and is failed over.
    pub first_byte: Option<Duration>,
    /// Longest silence between two events of a streamed answer.
    pub idle: Option<Duration>,
    /// The whole answer, from the first attempt.
    pub total: Option<Duration>,
}

impl Timeouts {
    pub fn of(r: &relay_core::pb::routing::v1::RouteResponse) -> Self {
        let ms = |v: u32| (v > 0).then(|| Duration::from_millis(u64::from(v)));
        Self {
            first_byte: ms(r.first_byte_timeout_ms),
            idle: ms(r.idle_timeout_ms),
            total: ms(r.total_timeout_ms),
        }
    }
}

fn timed_out(what: &str) -> RelayError {
    RelayError::new(ErrorCode::UpstreamTimeout, format!("the upstream took too long ({what})"))
}

/// Runs the call in a tracked task and answers the client from it. If the client leaves, the task goes on
/// by the policy and books the usage itself.
pub async fn respond(edge: Edge, call: ChatCall, rec: UsageRecord) -> Response {
    let inbound = call.inbound;
    let (tx, rx) = tokio::sync::oneshot::channel::<Response>();
    let left = CancellationToken::new();
    let _client_gone = left.clone().drop_guard();
    let task_edge = edge.clone();
    // Boxed: the call's state machine is large; the task is moved by pointer, not copied into the runtime.
    edge.inner.background.spawn(Box::pin(
        async move {
            let resp = run(task_edge, call, rec, left, &tx).await;
            // Err = the client left: a stream body dropped here applies the policy itself.
            let _ = tx.send(resp);
        }
        .in_current_span(),
    ));
    rx.await
        .unwrap_or_else(|_| inbound.error(RelayError::internal("the answer task ended without an answer")))
}

async fn run(
    edge: Edge,
    mut call: ChatCall,
    mut rec: UsageRecord,
    left: CancellationToken,
    tx: &tokio::sync::oneshot::Sender<Response>,
) -> Response {
    let inbound = call.inbound;
    let policy = call.policy;
    let state = call.state.take();
    let cache = call.cache.take();
    if let Some(plan) = &cache
        && let Some((meta, bytes)) = plan.get().await
    {
        return cached(rec, call.request.stream, &meta, bytes);
    }
    let began = tokio::time::Instant::now();
    let stopping = edge.inner.stopping.clone();
    rec.countable(CountTokensRequest {
        request_id: call.request.request_id.clone(),
        protocol: call.request.protocol,
        body: call.request.body.clone(),
        deployment: None,
        passthrough_headers: call.request.passthrough_headers.clone(),
    });
    let opened = {
        let first_byte = call.timeouts.first_byte;
        // A hedged group races attempts to their first token, not just to the upstream's headers.
        let hedged = call.order.hedge_after.is_some();
        let open = with_failover(&edge, &call.candidates, call.order, Some(&mut rec), |dep| {
            let mut req = call.request.clone();
            req.deployment = Some(dep.clone());
            let edge = edge.clone();
            async move {
                let opening = open(&edge, req, hedged);
                match first_byte {
                    Some(limit) => tokio::time::timeout(limit, opening)
                        .await
                        .unwrap_or_else(|_| Err(timed_out("no answer in time"))),
                    None => opening.await,
                }
            }
        });
        tokio::select! {
            r = open => Some(r),
            () = gone(&left, policy, &stopping) => None,
        }
    };
    let events = match opened {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            let mut resp = inbound.error(e.clone());
            served_headers(resp.headers_mut(), &rec);
            rec.fail(&e, e.http_status());
            return resp;
        }
        // The client left while the upstream had not answered yet (or drain ran out): rec's drop books it.
        None => return inbound.error(RelayError::new(ErrorCode::Cancelled, "client disconnected")),
    };
    rec.started();
    if call.request.stream {
        let mut served = axum::http::HeaderMap::new();
        served_headers(&mut served, &rec);
        let t = call.timeouts;
        let mut resp = stream_response(ForwardStream {
            events: Some(events),
            rec: Some(rec),
            inbound,
            policy,
            edge: edge.clone(),
            span: tracing::Span::current(),
            idle: t.idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            deadline: t.total.map(|d| Box::pin(tokio::time::sleep_until(began + d))),
            _live: crate::observe::LiveStream::new(),
            state: state.map(|p| (p, crate::state::Capture::default())),
            cache: cache.map(|p| (p, Vec::new())),
        });
        resp.headers_mut().extend(served);
        mark_cache(&mut resp, call.cache_ttl_secs > 0, false);
        return resp;
    }
    let total = call.timeouts.total;
    let whole = tokio::select! {
        r = whole_response(events, &mut rec) => Some(r),
        () = gone(&left, policy, &stopping) => None,
        () = async { match total { Some(t) => tokio::time::sleep_until(began + t).await, None => std::future::pending().await } } => {
            Some(Err(timed_out("total time")))
        }
    };
    match whole {
        Some(Ok(body)) if tx.is_closed() => {
            rec.cancelled();
            json_response(body)
        }
        Some(Ok(body)) => {
            let body = match state {
                Some(pending) => pending.whole(&edge, body),
                None => body,
            };
            if let Some(plan) = cache {
                plan.put(&edge, &rec.served_meta(), &body);
            }
            let mut resp = json_response(body);
            served_headers(resp.headers_mut(), &rec);
            mark_cache(&mut resp, call.cache_ttl_secs > 0, false);
            rec.succeed();
            resp
        }
        Some(Err(e)) => {
            let mut resp = inbound.error(e.clone());
            served_headers(resp.headers_mut(), &rec);
            rec.fail(&e, e.http_status());
            resp
        }
        None => {
            rec.cancelled();
            inbound.error(RelayError::new(ErrorCode::Cancelled, "client disconnected"))
        }
    }
}

/// Resolves when the call must stop because the client left: at once under `cancel`, after the drain
/// bound under `drain`; and when the process is shutting down and the client is gone.
async fn gone(left: &CancellationToken, policy: Policy, stopping: &CancellationToken) {
    left.cancelled().await;
    match policy {
        Policy::Cancel => {}
        Policy::Drain(max) => {
            tokio::select! {
                () = tokio::time::sleep(max) => {
                    metrics::counter!("relay_edge_drain_cut_total").increment(1);
                }
                () = stopping.cancelled() => {}
            }
        }
    }
}

/// Calls the adapter and waits for the upstream to accept (the `Start` event). A failure before that is
/// returned as an error, so the caller can fail over or answer with a real HTTP status.
/// Calls the adapter and waits for the upstream to accept (its `Start`); with `to_first_event`, also for
/// the next event (the first token, or an error before it), which the returned stream still begins with.
async fn open(edge: &Edge, req: ChatRequest, to_first_event: bool) -> Result<ChatEventStream, RelayError> {
    let mut events = edge.inner.services.adapter.chat(req).await?;
    match events.next().await.and_then(|e| e.event) {
        Some(Event::Start(_)) if to_first_event => match events.next().await {
            Some(ev) => match ev.event {
                Some(Event::Error(e)) => Err(RelayError::from_pb(&e)),
                _ => Ok(Box::pin(futures_util::stream::iter([ev]).chain(events))),
            },
            None => Err(RelayError::new(ErrorCode::UpstreamProtocol, "the upstream ended without an answer")),
        },
        Some(Event::Start(_)) => Ok(events),
        Some(Event::Error(e)) => Err(RelayError::from_pb(&e)),
        _ => {
            Err(RelayError::new(ErrorCode::UpstreamProtocol, "the adapter ended the call without an answer"))
        }
    }
}

async fn whole_response(mut events: ChatEventStream, rec: &mut UsageRecord) -> Result<Vec<u8>, RelayError> {
    let mut body = Vec::new();
    let mut failed = None;
    while let Some(ev) = events.next().await {
        match ev.event {
            Some(Event::Chunk(c)) => {
                rec.output_seen(c.output_tokens);
                rec.answer_bytes(&c.data);
                body.extend_from_slice(&c.data);
            }
            Some(Event::Usage(u)) => rec.usage(u),
            // Usage may follow an error (what the upstream produced before failing): keep reading.
            Some(Event::Error(e)) => failed = Some(RelayError::from_pb(&e)),
            Some(Event::Start(_) | Event::Finish(_)) | None => {}
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    rec.first_byte();
    Ok(body)
}

fn json_response(body: impl Into<Body>) -> Response {
    let mut resp = (StatusCode::OK, body.into()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `x-relay-cache` on answers of a model group that caches: `hit` or `miss`.
fn mark_cache(resp: &mut Response, caching: bool, hit: bool) {
    if caching {
        resp.headers_mut()
            .insert("x-relay-cache", HeaderValue::from_static(if hit { "hit" } else { "miss" }));
    }
}

/// An answer from the response cache: the same bytes the first request got, whole or as a stream; no
/// upstream is called and the usage event is a cache hit.
fn cached(mut rec: UsageRecord, stream: bool, meta: &crate::replay::Meta, bytes: Bytes) -> Response {
    rec.cache_hit(meta);
    rec.first_byte();
    let mut resp = if stream {
        let mut resp = (StatusCode::OK, Body::from(bytes)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    } else {
        json_response(bytes)
    };
    mark_cache(&mut resp, true, true);
    rec.succeed();
    resp
}

fn stream_response(forward: ForwardStream) -> Response {
    let mut resp = (StatusCode::OK, Body::from_stream(forward)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// The response body of a stream: adapter bytes out as they come, side events into the usage record.
/// Dropped early (client gone) it applies the policy: `cancel` drops the adapter stream (which cancels the
/// upstream call) and books what was delivered; `drain` hands the stream to a task that reads it to the end.
struct ForwardStream {
    events: Option<ChatEventStream>,
    rec: Option<UsageRecord>,
    inbound: Inbound,
    policy: Policy,
    edge: Edge,
    span: tracing::Span,
    /// The group's idle limit, and the timer it arms (reset by every event).
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// The group's total limit.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counted in `relay_edge_streams_in_flight` while alive.
    _live: crate::observe::LiveStream,
    /// A stored Responses turn, and the watch for its final response object.
    state: Option<(crate::state::Pending, crate::state::Capture)>,
    /// The response cache's plan, and the bytes sent so far (dropped past the largest entry).
    cache: Option<(crate::replay::Plan, Vec<u8>)>,
}

impl ForwardStream {
    /// Has a timeout fired? Then the answer ends here, as a timeout error.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<RelayError> {
        if self.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready()) {
            return Some(timed_out("total time"));
        }
        if self.idle.as_mut().is_some_and(|(_, t)| t.as_mut().poll(cx).is_ready()) {
            return Some(timed_out("the stream stalled"));
        }
        None
    }
}

impl Stream for ForwardStream {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let span = this.span.clone();
        let _g = span.enter();
        loop {
            if this.rec.is_none() || this.events.is_none() {
                return Poll::Ready(None);
            }
            let ev = match this.events.as_mut().map(|e| e.poll_next_unpin(cx)) {
                Some(Poll::Ready(ev)) => ev,
                _ => match this.expired(cx) {
                    // Dropping the events cancels the upstream; the client gets the protocol's error.
                    Some(e) => {
                        metrics::counter!("relay_edge_stream_timeouts_total").increment(1);
                        if let Some(rec) = this.rec.take() {
                            rec.fail(&e, 200);
                        }
                        this.events = None;
                        return Poll::Ready(Some(Ok(this.inbound.stream_error(&e))));
                    }
                    None => return Poll::Pending,
                },
            };
            if let Some((limit, timer)) = this.idle.as_mut() {
                timer.as_mut().reset(tokio::time::Instant::now() + *limit);
            }
            let Some(rec) = this.rec.as_mut() else { return Poll::Ready(None) };
            match ev.and_then(|e| e.event) {
                Some(Event::Chunk(c)) => {
                    rec.first_byte();
                    rec.output_seen(c.output_tokens);
                    rec.answer_bytes(&c.data);
                    if let Some((_, capture)) = this.state.as_mut() {
                        capture.feed(&c.data);
                    }
                    if let Some((_, sent)) = this.cache.as_mut() {
                        sent.extend_from_slice(&c.data);
                        if sent.len() > crate::replay::MAX_ENTRY {
                            this.cache = None;
                        }
                    }
                    return Poll::Ready(Some(Ok(c.data)));
                }
                Some(Event::Usage(u)) => rec.usage(u),
                Some(Event::Start(_) | Event::Finish(_)) => {}
                Some(Event::Error(e)) => {
                    let e = RelayError::from_pb(&e);
                    if let Some(rec) = this.rec.take() {
                        rec.fail(&e, 200);
                    }
                    this.events = None;
                    return Poll::Ready(Some(Ok(this.inbound.stream_error(&e))));
                }
                None => {
                    if let Some(rec) = this.rec.take() {
                        if let Some((plan, sent)) = this.cache.take() {
                            plan.put(&this.edge, &rec.served_meta(), &sent);
                        }
                        rec.succeed();
                    }
                    if let Some((pending, capture)) = this.state.take()
                        && let Some(response) = capture.last
                    {
                        pending.streamed(&this.edge, response);
                    }
                    this.events = None;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for ForwardStream {
    fn drop(&mut self) {
        let (Some(rec), Some(events)) = (self.rec.take(), self.events.take()) else { return };
        match self.policy {
            // Dropping `events` cancels the upstream; dropping `rec` books it cancelled, counted.
            Policy::Cancel => drop((events, rec)),
            Policy::Drain(max) => {
                let stopping = self.edge.inner.stopping.clone();
                self.edge
                    .inner
                    .background
                    .spawn(drain(events, rec, max, stopping).instrument(self.span.clone()));
            }
        }
    }
}

/// Reads an abandoned answer to its end (or the bound), so that the provider's own usage is billed.
async fn drain(
    mut events: ChatEventStream,
    mut rec: UsageRecord,
    max: Duration,
    stopping: CancellationToken,
) {
    let read = async {
        while let Some(ev) = events.next().await {
            match ev.event {
                Some(Event::Chunk(c)) => rec.output_seen(c.output_tokens),
                Some(Event::Usage(u)) => rec.usage(u),
                _ => {}
            }
        }
    };
    tokio::select! {
        () = read => {}
        () = tokio::time::sleep(max) => metrics::counter!("relay_edge_drain_cut_total").increment(1),
        () = stopping.cancelled() => {}
    }
    rec.cancelled();
}
