//! One usage event per authenticated request, whatever happens: success, error, or a client that left.
//! The event is handed to the usage sink (a durable outbox in front of the bus) after the response, off
//! the request path. When the answer ended without the provider's usage, the record bills Relay's counts:
//! input as the adapter counts it for the deployment (the provider's count-tokens endpoint where it has
//! one, else the model's tokenizer; the body's bytes / 4 if even that fails), asked only then, off the
//! request path; output as counted on the chunks that reached the edge.

use std::time::{Duration, Instant};

use relay_core::contracts::Admission;
use relay_core::pb::adapter::v1::CountTokensRequest;
use relay_core::pb::auth::v1::Principal;
use relay_core::pb::common::v1::{Money, Protocol, TokenUsage, UsageSource};
use relay_core::pb::events::v1::{Outcome, UsageEvent};
use relay_core::pb::routing::v1::{Deployment, Price};
use relay_core::{ErrorCode, RelayError, USAGE_EVENT_SCHEMA_VERSION};

use crate::Edge;
use crate::observe::{Content, TokenClock};
use crate::request::RequestCtx;

/// Publication attempts before an event is reported lost.
const PUBLISH_ATTEMPTS: u32 = 10;

pub struct UsageRecord {
    edge: Edge,
    event: UsageEvent,
    started: Instant,
    finished: bool,
    /// The limits reservation to settle when the request ends.
    lease: Option<Admission>,
    /// Price of the deployment that answered (the last one tried).
    price: Option<Price>,
    /// Request body size, for an input estimate when nothing better is known.
    body_bytes: u64,
    /// The request as the adapter can count it (set once a deployment was tried).
    countable: Option<CountTokensRequest>,
    /// Output tokens on the last chunk that reached the edge (Relay's count).
    output_seen: u64,
    /// An upstream accepted the request (its `Start` arrived).
    upstream_started: bool,
    /// When each attempt began, and its deployment's price (by index in the attempt log).
    attempt_started: Vec<(Instant, Option<Price>)>,
    /// The attempt that answered (its tokens are the event's).
    served: Option<usize>,
    /// Attempts started and not yet ended (a hedge race in progress).
    running: Vec<usize>,
    /// Upstream account leases (deployment RPM/TPM), settled with the request's real tokens.
    upstream_leases: Vec<(usize, Admission)>,
    /// Route pattern and client address, for metrics and the access log.
    route: String,
    client_ip: String,
    /// Time to first token and gaps between tokens (streams).
    clock: TokenClock,
    /// Prompt and answer, for keys that opted into content logging.
    content: Option<Content>,
    /// The key stores no content anywhere (its prompts are never logged, whatever the log config says).
    zero_retention: bool,
}

impl UsageRecord {
    pub fn new(edge: &Edge, ctx: &RequestCtx, principal: &Principal, protocol: Protocol) -> Self {
        let event = UsageEvent {
            schema_version: USAGE_EVENT_SCHEMA_VERSION,
            request_id: ctx.request_id.clone(),
            client_request_id: ctx.client_request_id.clone().unwrap_or_default(),
            key_id: principal.key_id.clone(),
            team_id: principal.team_id.clone(),
            org_id: principal.org_id.clone(),
            protocol: protocol as i32,
            started_at_unix_ms: ctx.started_unix_ms,
            trace_context: ctx.trace_context.clone(),
            batch_id: ctx.batch.as_ref().map(|b| b.batch_id.clone()).unwrap_or_default(),
            ..Default::default()
        };
        ctx.recorded.store(true, std::sync::atomic::Ordering::Release);
        Self {
            edge: edge.clone(),
            event,
            started: ctx.started,
            finished: false,
            lease: None,
            price: None,
            body_bytes: 0,
            countable: None,
            output_seen: 0,
            upstream_started: false,
            attempt_started: Vec::new(),
            served: None,
            running: Vec::new(),
            upstream_leases: Vec::new(),
            route: ctx.route.clone(),
            client_ip: ctx.client_ip.clone(),
            clock: TokenClock::default(),
            content: None,
            zero_retention: principal.zero_retention,
        }
    }

    pub fn request(&mut self, model: &str, stream: bool, end_user: &str, body: &[u8]) {
        self.event.model = model.to_owned();
        self.event.stream = stream;
        self.event.end_user = end_user.to_owned();
        self.body_bytes = u64::try_from(body.len()).unwrap_or(u64::MAX);
        if !self.zero_retention {
            self.content = Content::for_key(&self.event.key_id, body);
        }
    }

    /// Answer bytes sent to the client (kept only for keys that log content).
    pub fn answer_bytes(&mut self, bytes: &[u8]) {
        if let Some(c) = self.content.as_mut() {
            c.answer(bytes);
        }
    }

    /// The upstream accepted the request.
    pub fn started(&mut self) {
        self.upstream_started = true;
    }

    /// How attempt `i` ended: answered (`None`; it now serves the request) or failed before its first
    /// byte.
    pub fn attempt_ended(&mut self, i: usize, failure: Option<&RelayError>) {
        let took = self.attempt_started.get(i).map_or(0, |(at, _)| elapsed_ms(*at));
        self.running.retain(|r| *r != i);
        let Some(a) = self.event.attempt_log.get_mut(i) else { return };
        a.duration_ms = took;
        a.answered = failure.is_none();
        match failure {
            Some(e) => {
                a.error_code = e.code.to_pb() as i32;
                a.upstream_status = e.upstream_status.map_or(0, u32::from);
            }
            None => self.served = Some(i),
        }
    }

    /// Attempt `i` lost a hedge race and was cancelled: the provider may bill its input (`input_estimate`
    /// tokens), which is hedge overhead, recorded on the attempt and never charged to the caller.
    pub fn hedge_lost(&mut self, i: usize, input_estimate: u64) {
        let took = self.attempt_started.get(i).map_or(0, |(at, _)| elapsed_ms(*at));
        self.running.retain(|r| *r != i);
        if let Some(a) = self.event.attempt_log.get_mut(i) {
            a.duration_ms = took;
            a.hedge_lost = true;
            a.input_tokens = input_estimate;
            a.error_code = ErrorCode::Cancelled.to_pb() as i32;
            if let Some(p) = self.attempt_started.get(i).and_then(|(_, p)| p.clone()) {
                let input = TokenUsage { input_tokens: input_estimate, ..Default::default() };
                a.overhead_cost =
                    Some(Money { micros: relay_core::cost_micros(&input, &p), currency: p.currency });
            }
        }
        metrics::counter!("relay_edge_hedge_overhead_tokens_total").increment(input_estimate);
    }

    /// The deployment the answer now comes from (the winner of a hedge race).
    pub fn serving(&mut self, d: &Deployment) {
        if let Some(c) = self.countable.as_mut() {
            c.deployment = Some(d.clone());
        }
        self.event.deployment_id = d.id.clone();
        self.event.provider = d.provider.clone();
        self.event.upstream_model = d.upstream_model.clone();
        self.price = d.price.clone();
    }

    /// The deployment that served the request (the last one tried) and how many were tried, for the
    /// `x-relay-deployment` and `x-relay-attempts` response headers.
    pub fn served_by(&self) -> (&str, u32) {
        (&self.event.deployment_id, self.event.attempts)
    }

    /// What to count the input of, should the answer end without the provider's usage.
    pub fn countable(&mut self, req: CountTokensRequest) {
        self.countable = Some(req);
    }

    /// Output tokens produced up to a chunk the edge received.
    pub fn output_seen(&mut self, output_tokens: u64) {
        if output_tokens > self.output_seen && self.event.stream {
            self.clock.tokens(self.started, &self.event, &self.route);
        }
        self.output_seen = self.output_seen.max(output_tokens);
    }

    /// A new attempt on `d` (`hedge`: started while an earlier one was still waiting); returns its index.
    /// Until one answers, the latest attempt is the one the request is billed to.
    pub fn attempt(&mut self, d: &Deployment, hedge: bool) -> usize {
        self.attempt_started.push((Instant::now(), d.price.clone()));
        self.event.attempt_log.push(relay_core::pb::events::v1::Attempt {
            deployment_id: d.id.clone(),
            provider: d.provider.clone(),
            upstream_model: d.upstream_model.clone(),
            hedge,
            ..Default::default()
        });
        self.event.attempts += 1;
        self.running.push(self.event.attempt_log.len() - 1);
        if self.served.is_none() {
            self.serving(d);
        }
        self.event.attempt_log.len() - 1
    }

    /// The routing rule that chose the strategy, if one did (usage event and response header).
    pub fn routing_rule(&mut self, rule: Option<&str>) {
        self.event.routing_rule = rule.unwrap_or_default().to_owned();
    }

    pub fn rule(&self) -> &str {
        &self.event.routing_rule
    }

    /// Attempts started and not ended yet.
    pub fn attempts_running(&self) -> Vec<usize> {
        self.running.clone()
    }

    pub fn request_id(&self) -> &str {
        &self.event.request_id
    }

    /// A lease on the upstream RPM/TPM of the deployment about to be attempted, settled with this
    /// request's tokens when it ends.
    pub fn hold_upstream(&mut self, lease: Admission) {
        self.upstream_leases.push((self.event.attempt_log.len(), lease));
    }

    /// Input tokens estimated from the body (every 4 bytes a token), for overhead a provider may bill.
    pub fn input_estimate(&self) -> u64 {
        self.body_bytes.div_ceil(4)
    }

    /// The admission this request holds, if it was admitted against limits (routing rules read its scopes).
    pub fn lease(&self) -> Option<&Admission> {
        self.lease.as_ref()
    }

    /// The limits reservation this request holds; settled with real usage when it ends.
    pub fn hold(&mut self, lease: Admission) {
        self.lease = Some(lease);
    }

    pub fn first_byte(&mut self) {
        if self.event.time_to_first_byte_ms == 0 {
            self.event.time_to_first_byte_ms = elapsed_ms(self.started).max(1);
            metrics::histogram!("relay_edge_time_to_first_byte_seconds", "stream" => if self.event.stream { "true" } else { "false" })
                .record(self.started.elapsed().as_secs_f64());
        }
    }

    pub fn usage(&mut self, u: TokenUsage) {
        self.event.usage = Some(u);
    }

    /// Answered from the response cache: what the cached answer used, no upstream, no price.
    pub fn cache_hit(&mut self, m: &crate::replay::Meta) {
        self.event.cache_hit = true;
        self.event.usage = Some(m.usage());
        self.event.deployment_id = m.deployment.clone();
        self.event.provider = m.provider.clone();
        self.event.upstream_model = m.upstream_model.clone();
        self.price = None;
    }

    /// What served the request, for the response cache.
    pub fn served_meta(&self) -> crate::replay::Meta {
        let u = self.event.usage.unwrap_or_default();
        crate::replay::Meta {
            deployment: self.event.deployment_id.clone(),
            provider: self.event.provider.clone(),
            upstream_model: self.event.upstream_model.clone(),
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cached_input_tokens: u.cached_input_tokens,
            reasoning_tokens: u.reasoning_tokens,
        }
    }

    pub fn succeed(mut self) {
        self.finish(Outcome::Success, None, 200);
    }

    pub fn fail(mut self, e: &RelayError, http_status: u16) {
        self.finish(Outcome::Error, Some(e), http_status);
    }

    /// The client left before the answer ended (whatever was read of it is billed).
    pub fn cancelled(mut self) {
        self.cancel();
    }

    fn cancel(&mut self) {
        let e = RelayError::new(ErrorCode::Cancelled, "client disconnected");
        self.finish(Outcome::Cancelled, Some(&e), 499);
    }

    /// Does this end need Relay's own count? Only when no `Usage` event arrived, and then not for an error
    /// the upstream answered before accepting the request (providers do not bill refusals); a client that
    /// left while an upstream was working on its request is billed that request's input.
    fn needs_count(&self, outcome: Outcome) -> bool {
        let in_flight = self.event.attempts > 0 && outcome == Outcome::Cancelled;
        self.event.usage.is_none() && outcome != Outcome::Success && (self.upstream_started || in_flight)
    }

    fn finish(&mut self, outcome: Outcome, e: Option<&RelayError>, http_status: u16) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.event.outcome = outcome as i32;
        self.event.error_code = e.map_or(0, |e| e.code.to_pb() as i32);
        self.event.http_status = u32::from(http_status);
        self.event.duration_ms = elapsed_ms(self.started);
        // What the adapter should count (only when needed), and the estimate if it cannot.
        let count =
            self.needs_count(outcome).then(|| (self.countable.take(), self.body_bytes, self.output_seen));
        let mut event = std::mem::take(&mut self.event);
        let (sink, limiter) =
            (self.edge.inner.services.usage.clone(), self.edge.inner.services.limiter.clone());
        let adapter = self.edge.inner.services.adapter.clone();
        let (lease, price, served) = (self.lease.take(), self.price.take(), self.served);
        let upstream_leases = std::mem::take(&mut self.upstream_leases);
        let (route, client_ip) = (std::mem::take(&mut self.route), std::mem::take(&mut self.client_ip));
        let (clock, content) = (std::mem::take(&mut self.clock), self.content.take());
        self.edge.inner.background.spawn(async move {
            if let Some((countable, body_bytes, output)) = count {
                let (input, source) = count_input(adapter.as_ref(), countable, body_bytes).await;
                event.usage = Some(TokenUsage {
                    input_tokens: input,
                    input_source: source as i32,
                    output_tokens: output,
                    output_source: UsageSource::Counted as i32,
                    ..Default::default()
                });
            }
            let usage = event.usage.unwrap_or_default();
            if let Some(a) = served.and_then(|i| event.attempt_log.get_mut(i)) {
                a.input_tokens = usage.input_tokens;
                a.output_tokens = usage.output_tokens;
            }
            let mut cost = price.as_ref().map_or(0, |p| relay_core::cost_micros(&usage, p));
            if !event.batch_id.is_empty() {
                cost = relay_core::batch_cost_micros(cost);
            }
            let currency = price.as_ref().map_or_else(|| "USD".to_owned(), |p| p.currency.clone());
            event.cost = Some(Money { micros: cost, currency });
            if let Some(lease) = lease {
                // A cache hit used no upstream tokens.
                let tokens = if event.cache_hit { 0 } else { usage.input_tokens + usage.output_tokens };
                limiter.settle(&lease, tokens, cost).await;
            }
            for (i, lease) in &upstream_leases {
                // The serving attempt's lease holds the answer's tokens; the others' only their input.
                let tokens = if Some(*i) == served { usage.input_tokens + usage.output_tokens } else { 0 };
                limiter.settle(lease, tokens, 0).await;
            }
            crate::observe::finished(&event, &route, &client_ip, &clock, content);
            publish(sink.as_ref(), event).await
        });
    }
}

/// Longest wait for the adapter's count of an abandoned request's input.
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// The input of a request whose answer ended without usage: counted by the adapter for the deployment
/// that was called, else estimated from its size (every 4 bytes a token).
async fn count_input(
    adapter: &dyn relay_core::contracts::Adapter,
    req: Option<CountTokensRequest>,
    body_bytes: u64,
) -> (u64, UsageSource) {
    let estimate = (body_bytes.div_ceil(4), UsageSource::Estimated);
    let Some(req) = req.filter(|r| r.deployment.is_some()) else { return estimate };
    match tokio::time::timeout(COUNT_TIMEOUT, adapter.count_tokens(req)).await {
        Ok(Ok(r)) if r.input_tokens > 0 => {
            let source = match r.source() {
                UsageSource::Unspecified => UsageSource::Counted,
                s => s,
            };
            (r.input_tokens, source)
        }
        _ => estimate,
    }
}

impl Drop for UsageRecord {
    /// Dropped unfinished = the client went away (the response future or body stream was dropped).
    fn drop(&mut self) {
        if !self.finished {
            self.cancel();
        }
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn publish(sink: &dyn relay_core::contracts::UsageSink, event: UsageEvent) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=PUBLISH_ATTEMPTS {
        match sink.publish(event.clone()).await {
            Ok(()) => {
                metrics::counter!("relay_edge_usage_published_total").increment(1);
                return;
            }
            Err(e) => {
                tracing::warn!(request_id = %event.request_id, attempt, error = %e, "usage event publish failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    metrics::counter!("relay_edge_usage_lost_total").increment(1);
    tracing::error!(request_id = %event.request_id, "usage event lost after {PUBLISH_ATTEMPTS} attempts");
}
