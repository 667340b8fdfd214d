//! What a finished request tells operators: model-level metrics (requests, latency, time to first
//! token, gaps between tokens, tokens and cost by model group, provider and deployment) and its one
//! access-log line. Labels never carry a key, user or address (see `relay_telemetry::catalogue`); the log
//! line carries ids Relay made, and every string a client chose is masked before it is written.

use std::time::Instant;

use metrics::Label;
use relay_core::ErrorCode;
use relay_core::pb::events::v1::{Outcome, UsageEvent};
use relay_telemetry::access_log;
use relay_telemetry::handles::{HandleCache, labels};
use relay_telemetry::redact::secrets;
use std::borrow::Cow;

use serde::Serialize;

/// The prompt and answer of a key that opted into content logging, cut at the configured size.
pub(crate) struct Content {
    max: usize,
    prompt: String,
    answer: Vec<u8>,
}

impl Content {
    /// Only for keys listed in `telemetry.access_log.content_keys`.
    pub(crate) fn for_key(key_id: &str, body: &[u8]) -> Option<Self> {
        let max = access_log::content_allowance(key_id)?;
        // Cut on a character boundary (a byte cut could split a multi-byte character).
        let prompt = access_log::truncate(&String::from_utf8_lossy(body), max).to_owned();
        Some(Self { max, prompt, answer: Vec::new() })
    }

    pub(crate) fn answer(&mut self, bytes: &[u8]) {
        // Up to one character past the cap, so the text is cut whole in `text()`.
        let room = (self.max + 4).saturating_sub(self.answer.len());
        self.answer.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The answer's text, at most `max` bytes, cut on a character boundary.
    fn answer_text(&self) -> String {
        access_log::truncate(&String::from_utf8_lossy(&self.answer), self.max).to_owned()
    }
}

/// When a stream's output tokens arrive: the first one (time to first token) and the gaps after it.
#[derive(Default)]
pub(crate) struct TokenClock {
    last: Option<Instant>,
    /// Milliseconds from the request's arrival to its first output token.
    pub(crate) ttft_ms: Option<u64>,
    gaps: Option<metrics::Histogram>,
}

impl TokenClock {
    /// New output tokens arrived on a stream of `ev` (served by its current deployment).
    pub(crate) fn tokens(&mut self, started: Instant, ev: &UsageEvent, route: &str) {
        let now = Instant::now();
        match self.last {
            None => {
                let ttft = now.duration_since(started);
                self.ttft_ms = Some(u64::try_from(ttft.as_millis()).unwrap_or(u64::MAX).max(1));
                let series = answer_series(ev, route);
                series.ttft.record(ttft.as_secs_f64());
                // Each later gap is a lock-free record.
                self.gaps = Some(series.gaps.clone());
            }
            Some(last) => {
                if let Some(h) = &self.gaps {
                    h.record(now.duration_since(last).as_secs_f64());
                }
            }
        }
        self.last = Some(now);
    }
}

/// Label sets kept per process (model groups × deployments × routes × statuses are configured, so few).
const SERIES_KEPT: usize = 4096;

/// What one (model group, provider, deployment, route) records as its answers arrive.
struct AnswerSeries {
    ttft: metrics::Histogram,
    gaps: metrics::Histogram,
    /// Input, output, cached input, cache write, reasoning.
    tokens: [metrics::Counter; 5],
}

const TOKEN_KINDS: [&str; 5] = ["input", "output", "cached_input", "cache_write", "reasoning"];

/// What one (model group, provider, deployment, route, status, outcome, currency) records at the end.
struct EndSeries {
    requests: metrics::Counter,
    duration: metrics::Histogram,
    /// Registered by the first priced answer (an unpriced group shows no cost series).
    cost: std::sync::OnceLock<metrics::Counter>,
}

/// The model group (only once routing resolved it: a name a client made up is never a label), provider
/// and deployment.
fn model_values<'a>(ev: &'a UsageEvent) -> [&'a str; 3] {
    let routed = !ev.deployment_id.is_empty();
    let or_none = |v: &'a str| if v.is_empty() { "none" } else { v };
    [if routed { ev.model.as_str() } else { "unrouted" }, or_none(&ev.provider), or_none(&ev.deployment_id)]
}

fn answer_series(ev: &UsageEvent, route: &str) -> std::sync::Arc<AnswerSeries> {
    static KEPT: std::sync::LazyLock<HandleCache<AnswerSeries>> =
        std::sync::LazyLock::new(|| HandleCache::new(SERIES_KEPT));
    let [model, provider, deployment] = model_values(ev);
    let values = [model, provider, deployment, route];
    KEPT.get(&values, || {
        let base = ["model", "provider", "deployment"];
        let mut with_route = labels(&base, &values[..3]);
        with_route.push(Label::new("route", route.to_owned()));
        AnswerSeries {
            ttft: metrics::histogram!("relay_llm_time_to_first_token_seconds", with_route),
            gaps: metrics::histogram!("relay_llm_inter_token_seconds", labels(&base, &values[..3])),
            tokens: TOKEN_KINDS.map(|kind| {
                let mut l = labels(&base, &values[..3]);
                l.push(Label::new("kind", kind));
                metrics::counter!("relay_llm_tokens_total", l)
            }),
        }
    })
}

fn end_series(ev: &UsageEvent, route: &str, currency: &str) -> std::sync::Arc<EndSeries> {
    static KEPT: std::sync::LazyLock<HandleCache<EndSeries>> =
        std::sync::LazyLock::new(|| HandleCache::new(SERIES_KEPT));
    let [model, provider, deployment] = model_values(ev);
    let mut buf = [0; 10];
    let status = relay_telemetry::handles::decimal(&mut buf, ev.http_status);
    let outcome = outcome_label(ev);
    let values = [model, provider, deployment, route, status, outcome, currency];
    KEPT.get(&values, || {
        let base = labels(&["model", "provider", "deployment", "route"], &values[..4]);
        let with = |k: &'static str, v: &str| {
            let mut l = base.clone();
            l.push(Label::new(k, v.to_owned()));
            l
        };
        EndSeries {
            requests: metrics::counter!("relay_llm_requests_total", with("status", status)),
            duration: metrics::histogram!("relay_llm_request_duration_seconds", with("outcome", outcome)),
            cost: std::sync::OnceLock::new(),
        }
    })
}

fn outcome_label(ev: &UsageEvent) -> &'static str {
    match ev.outcome() {
        Outcome::Success => "success",
        Outcome::Cancelled => "cancelled",
        Outcome::Error | Outcome::Unspecified => "error",
    }
}

/// Metrics and the access-log line of a finished request, once its usage and cost are final.
pub(crate) fn finished(
    ev: &UsageEvent,
    route: &str,
    client_ip: &str,
    clock: &TokenClock,
    content: Option<Content>,
) {
    let cost = ev.cost.as_ref();
    let currency = cost.map_or("", |c| c.currency.as_str());
    let end = end_series(ev, route, if currency.is_empty() { "none" } else { currency });
    end.requests.increment(1);
    end.duration.record(ev.duration_ms as f64 / 1000.0);
    let usage = if ev.cache_hit { Default::default() } else { ev.usage.unwrap_or_default() };
    let counts = [
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
    ];
    if counts.iter().any(|n| *n > 0) {
        let series = answer_series(ev, route);
        for (counter, n) in series.tokens.iter().zip(counts) {
            if n > 0 {
                counter.increment(n);
            }
        }
    }
    if let Some(micros) = cost.and_then(|c| u64::try_from(c.micros).ok())
        && micros > 0
    {
        let [model, provider, deployment] = model_values(ev);
        end.cost
            .get_or_init(|| {
                let mut l = labels(&["model", "provider", "deployment"], &[model, provider, deployment]);
                l.push(Label::new("currency", currency.to_owned()));
                metrics::counter!("relay_llm_cost_micros_total", l)
            })
            .increment(micros);
    }
    // Errors answered before the stream began were counted with their response; these ended a stream.
    if ev.outcome() == Outcome::Error && ev.http_status == 200 {
        errors(route, ErrorCode::from_pb(ev.error_code));
    }
    if access_log::enabled() {
        request_line(ev, route, client_ip, clock, content);
    }
}

/// Counts an error answer.
pub(crate) fn errors(route: &str, code: ErrorCode) {
    metrics::counter!("relay_edge_errors_total", "route" => route.to_owned(), "code" => code.as_str())
        .increment(1);
}

/// A client-chosen string with secrets and personal data masked.
fn masked(text: &str) -> std::borrow::Cow<'_, str> {
    secrets(text)
}

/// The trace id of a W3C `traceparent` (`00-<trace>-<span>-<flags>`).
pub(crate) fn trace_id(ctx: &std::collections::HashMap<String, String>) -> &str {
    ctx.get("traceparent").and_then(|t| t.split('-').nth(1)).unwrap_or("")
}

fn timestamp(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One access-log line. Ids are Relay's own; every field a client chose is masked; absent fields are
/// left out (a refused request has no key, model or tokens).
#[derive(Serialize, Default)]
struct Line<'a> {
    timestamp: String,
    #[serde(rename = "type")]
    kind: &'static str,
    request_id: &'a str,
    client_request_id: Cow<'a, str>,
    trace_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    team_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    org_id: Option<&'a str>,
    client_ip: &'a str,
    route: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deployment: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    status: u32,
    outcome: &'static str,
    error_code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cached_input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_micros: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttfb_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttft_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_user: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    routing_rule: Option<&'a str>,
    /// Answered from the response cache.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cache_hit: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<String>,
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn write(line: &Line<'_>) {
    if let Ok(text) = serde_json::to_string(line) {
        access_log::write(text);
    }
}

fn request_line(ev: &UsageEvent, route: &str, client_ip: &str, clock: &TokenClock, content: Option<Content>) {
    let usage = ev.usage.unwrap_or_default();
    let cost = ev.cost.as_ref();
    let ended = ev.started_at_unix_ms.saturating_add(i64::try_from(ev.duration_ms).unwrap_or(0));
    write(&Line {
        timestamp: timestamp(ended),
        kind: "request",
        request_id: &ev.request_id,
        client_request_id: masked(&ev.client_request_id),
        trace_id: trace_id(&ev.trace_context),
        key_id: Some(&ev.key_id),
        team_id: Some(&ev.team_id),
        org_id: Some(&ev.org_id),
        client_ip,
        route,
        model: Some(masked(&ev.model)),
        deployment: nonempty(&ev.deployment_id),
        provider: nonempty(&ev.provider),
        upstream_model: nonempty(&ev.upstream_model),
        stream: Some(ev.stream),
        status: ev.http_status,
        outcome: outcome_label(ev),
        error_code: (ev.error_code != 0).then(|| ErrorCode::from_pb(ev.error_code).as_str()),
        attempts: Some(ev.attempts),
        input_tokens: Some(usage.input_tokens),
        output_tokens: Some(usage.output_tokens),
        cached_input_tokens: Some(usage.cached_input_tokens),
        reasoning_tokens: Some(usage.reasoning_tokens),
        cost_micros: cost.map(|c| c.micros),
        currency: cost.map(|c| c.currency.as_str()),
        duration_ms: ev.duration_ms,
        ttfb_ms: (ev.time_to_first_byte_ms > 0).then_some(ev.time_to_first_byte_ms),
        ttft_ms: clock.ttft_ms,
        end_user: nonempty(&ev.end_user).map(masked),
        routing_rule: nonempty(&ev.routing_rule),
        cache_hit: ev.cache_hit,
        prompt: content.as_ref().map(|c| masked(&c.prompt).into_owned()),
        answer: content.as_ref().map(|c| masked(&c.answer_text()).into_owned()),
    });
}

/// The line of a request that ended before it had a usage record (refused key, bad route, overload).
pub(crate) fn refused(ctx: &crate::request::RequestCtx, route: &str, status: u16, code: Option<ErrorCode>) {
    if !access_log::enabled() {
        return;
    }
    write(&Line {
        timestamp: timestamp(relay_core::ids::now_ms()),
        kind: "request",
        request_id: &ctx.request_id,
        client_request_id: masked(ctx.client_request_id.as_deref().unwrap_or("")),
        trace_id: trace_id(&ctx.trace_context),
        client_ip: &ctx.client_ip,
        route,
        status: u32::from(status),
        outcome: if status < 400 { "success" } else { "error" },
        error_code: code.map(ErrorCode::as_str),
        duration_ms: u64::try_from(ctx.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        ..Default::default()
    });
}

/// Counts a streamed answer in `relay_edge_streams_in_flight` while it is alive.
pub(crate) struct LiveStream(metrics::Gauge);

impl LiveStream {
    pub(crate) fn new() -> Self {
        let g = metrics::gauge!("relay_edge_streams_in_flight");
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
