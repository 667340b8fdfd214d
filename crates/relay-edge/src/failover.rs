//! Failover, retries and hedging for one request, shared by every pipeline (chat, count_tokens,
//! embeddings): the candidates in relay-select's order for the request, each attempt's outcome fed back
//! into its deployment's health (and announced to the other replicas when a breaker changes), every
//! attempt noted in the usage record.
//!
//! - A retryable failure before the first byte moves to the next candidate, within the retry budget
//!   (extra upstream attempts stay within ~20 % of requests, so an outage does not multiply load).
//! - A deployment with its own upstream RPM/TPM is admitted against them first (counted across replicas
//!   by the limiter): at its limit it is skipped, as if it had answered 429, without a call.
//! - When every candidate failed retryably, one more round after a backoff: the upstream's
//!   `Retry-After` when it gave one up to [`MAX_RETRY_AFTER`] (longer: no retry, the client gets it), else
//!   100-300 ms of jitter; within the same retry budget. An upstream 429 with `Retry-After` isolates
//!   that deployment for that long on every replica.
//! - Hedging (opt-in per group): when the running attempt has not answered after `hedge_after`, a second
//!   one starts on the next candidate; the first to answer wins, the other is cancelled and its input
//!   recorded as hedge overhead.

use std::sync::LazyLock;

use relay_telemetry::handles::HandleCache;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use relay_core::contracts::Admission;
use relay_core::pb::auth::v1::{Limits, Scope, ScopeKind};
use relay_core::pb::routing::v1::Deployment;
use relay_core::{ErrorCode, RelayError};

use crate::Edge;
use crate::dispatch::Order;
use crate::usage::UsageRecord;

/// Longest upstream `Retry-After` Relay waits out itself before one more round.
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

type Running<'f, T> =
    Pin<Box<dyn Future<Output = (usize, usize, Instant, Result<T, RelayError>)> + Send + 'f>>;

/// Tries the candidates until one answers; see the module header.
pub async fn with_failover<'f, T, F, Fut>(
    edge: &Edge,
    candidates: &[Deployment],
    order: Order,
    mut rec: Option<&mut UsageRecord>,
    mut call: F,
) -> Result<T, RelayError>
where
    F: FnMut(&Deployment) -> Fut,
    Fut: Future<Output = Result<T, RelayError>> + Send + 'f,
    T: Send + 'f,
{
    let selector = &edge.inner.selector;
    let candidates = selector.order_for(candidates, order.strategy, order.tokens, order.session);
    selector.first_attempt();
    let mut next = 0;
    let mut running: Vec<Running<'f, T>> = Vec::with_capacity(2);
    let mut last_err: Option<RelayError> = None;
    let mut hedged = false;
    let mut rounds_left = 1;
    let span = tracing::Span::current();
    span.record("relay.routing.strategy", order.strategy.name());
    loop {
        if running.is_empty() {
            if next >= candidates.len() {
                // Every candidate failed retryably: one more round after a backoff, if the budget allows.
                let Some(wait) = last_err.as_ref().and_then(|e| backoff(e, selector.jitter())) else {
                    return Err(last_err.unwrap_or_else(none_left));
                };
                if rounds_left == 0 || !selector.may_retry() {
                    return Err(last_err.unwrap_or_else(none_left));
                }
                rounds_left -= 1;
                metrics::counter!("relay_edge_retry_rounds_total").increment(1);
                tokio::time::sleep(wait).await;
                next = 0;
            } else if last_err.is_some() && !selector.may_retry() {
                // A failover after a failed attempt spends the retry budget; the first attempt does not.
                metrics::counter!("relay_edge_retry_budget_exhausted_total").increment(1);
                tracing::warn!("retry budget spent: not failing over");
                return Err(last_err.unwrap_or_else(none_left));
            }
            match start(edge, &candidates, &mut next, order, &mut rec, &mut call, false).await {
                Ok(r) => running.push(r),
                Err(limited) => return Err(limited.or(last_err).unwrap_or_else(none_left)),
            }
        }
        let hedge_now =
            order.hedge_after.filter(|_| !hedged && running.len() == 1 && next < candidates.len());
        let timer = async {
            match hedge_now {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        let finished = tokio::select! {
            (done, _, rest) = futures_util::future::select_all(running.drain(..)) => {
                running = rest;
                Some(done)
            }
            () = timer => None,
        };
        let Some((i, attempt, began, result)) = finished else {
            hedged = true;
            if selector.may_retry() {
                metrics::counter!("relay_edge_hedges_total").increment(1);
                if let Ok(r) = start(edge, &candidates, &mut next, order, &mut rec, &mut call, true).await {
                    running.push(r);
                }
            }
            continue;
        };
        let dep = &candidates[i];
        ended(edge, dep, attempt, began, result.as_ref().err(), &mut rec);
        match result {
            Ok(v) => {
                // The hedge race is over: whatever still runs is cancelled (dropped) as overhead.
                span.record("relay.routing.deployment", dep.id.as_str());
                if let Some(r) = rec.as_deref_mut() {
                    r.serving(dep);
                    span.record("relay.routing.attempts", r.served_by().1);
                    let lost = r.attempts_running();
                    let estimate = r.input_estimate();
                    for a in lost {
                        r.hedge_lost(a, estimate);
                    }
                }
                return Ok(v);
            }
            Err(e) if e.code.is_retryable() => {
                metrics::counter!("relay_edge_failover_total", "code" => e.code.as_str()).increment(1);
                tracing::warn!(deployment = %dep.id, code = e.code.as_str(), "deployment failed before first byte");
                last_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long to wait before another round after `e`, or `None` to give up (the error is final, or the
/// upstream asked for a longer pause than Relay waits out).
fn backoff(e: &RelayError, jitter: f64) -> Option<std::time::Duration> {
    if !e.code.is_retryable() {
        return None;
    }
    match e.retry_after_secs {
        Some(s) if s > 0 => {
            let wait = std::time::Duration::from_secs(u64::from(s));
            (wait <= MAX_RETRY_AFTER).then_some(wait)
        }
        _ => Some(std::time::Duration::from_millis(100 + (jitter * 200.0) as u64)),
    }
}

fn none_left() -> RelayError {
    RelayError::new(ErrorCode::Unavailable, "no deployment is available for this model")
}

/// Starts the next candidate that its upstream limits admit. `Err(Some(e))`: every remaining one was at
/// its limit (e is the 429 to answer); `Err(None)`: none left.
#[allow(clippy::too_many_arguments)]
async fn start<'f, T, F, Fut>(
    edge: &Edge,
    candidates: &[Deployment],
    next: &mut usize,
    order: Order,
    rec: &mut Option<&mut UsageRecord>,
    call: &mut F,
    hedge: bool,
) -> Result<Running<'f, T>, Option<RelayError>>
where
    F: FnMut(&Deployment) -> Fut,
    Fut: Future<Output = Result<T, RelayError>> + Send + 'f,
    T: Send + 'f,
{
    let mut limited = None;
    while *next < candidates.len() {
        let i = *next;
        *next += 1;
        let dep = &candidates[i];
        if rec.is_some()
            && let Err(e) = upstream_limits(edge, dep, order.tokens, rec).await
        {
            limited = Some(e);
            continue;
        }
        let attempt = rec.as_deref_mut().map_or(0, |r| r.attempt(dep, hedge));
        let fut = call(dep);
        let began = Instant::now();
        return Ok(Box::pin(async move { (i, attempt, began, fut.await) }));
    }
    Err(limited)
}

/// Records how an attempt ended: usage record, breaker and health, metrics.
fn ended(
    edge: &Edge,
    dep: &Deployment,
    attempt: usize,
    began: Instant,
    err: Option<&RelayError>,
    rec: &mut Option<&mut UsageRecord>,
) {
    if let Some(r) = rec.as_deref_mut() {
        r.attempt_ended(attempt, err);
    }
    let outcome = match err {
        None => relay_select::Outcome::Answered { latency: began.elapsed() },
        Some(e) => match (e.upstream_status, e.retry_after_secs) {
            (Some(429), Some(s)) if s > 0 => {
                relay_select::Outcome::Throttled { retry_after: std::time::Duration::from_secs(u64::from(s)) }
            }
            _ => relay_select::Outcome::Failed { code: e.code, upstream_status: e.upstream_status },
        },
    };
    let series = deployment_series(dep);
    if let Some(t) = edge.inner.selector.record(&dep.id, outcome) {
        let open = matches!(t, relay_select::Transition::Opened { .. });
        series.breaker.set(f64::from(u8::from(open)));
        edge.announce(t.message(&dep.id));
    } else if err.is_none() {
        // Present (0) for every deployment that answered, so dashboards show closed breakers too.
        series.breaker.set(0.0);
    }
    match err {
        None => {
            series.answered.increment(1);
            series.answer_seconds.record(began.elapsed().as_secs_f64());
        }
        Some(e) => {
            static FAILED: LazyLock<HandleCache<metrics::Counter>> = LazyLock::new(|| HandleCache::new(4096));
            FAILED
                .counter(
                    "relay_edge_upstream_attempts_total",
                    &["deployment", "result"],
                    &[&dep.id, e.code.as_str()],
                )
                .increment(1);
        }
    }
    static BUDGET: LazyLock<metrics::Gauge> =
        LazyLock::new(|| metrics::gauge!("relay_edge_retry_budget_left"));
    BUDGET.set(edge.inner.selector.retry_budget_left());
}

/// The series one deployment's attempts update, resolved once.
struct DeploymentSeries {
    breaker: metrics::Gauge,
    answered: metrics::Counter,
    answer_seconds: metrics::Histogram,
}

fn deployment_series(dep: &Deployment) -> std::sync::Arc<DeploymentSeries> {
    static KEPT: LazyLock<HandleCache<DeploymentSeries>> = LazyLock::new(|| HandleCache::new(4096));
    KEPT.get(&[&dep.id, &dep.provider], || DeploymentSeries {
        breaker: metrics::gauge!("relay_edge_breaker_open", "deployment" => dep.id.clone()),
        answered: metrics::counter!("relay_edge_upstream_attempts_total", "deployment" => dep.id.clone(), "result" => "answered"),
        answer_seconds: metrics::histogram!("relay_edge_upstream_answer_seconds", "provider" => dep.provider.clone(), "deployment" => dep.id.clone()),
    })
}

/// Admits one attempt against its deployment's upstream account limits (shared by every replica). The
/// lease is settled with the request's real tokens when the request ends.
async fn upstream_limits(
    edge: &Edge,
    dep: &Deployment,
    (input, output): (u64, u64),
    rec: &mut Option<&mut UsageRecord>,
) -> Result<(), RelayError> {
    if dep.requests_per_minute == 0 && dep.tokens_per_minute == 0 {
        return Ok(());
    }
    let a = Admission {
        request_id: rec.as_deref().map(UsageRecord::request_id).unwrap_or_default().to_owned(),
        at_ms: relay_core::ids::now_ms(),
        scopes: vec![Scope {
            kind: ScopeKind::Deployment as i32,
            id: dep.id.clone(),
            limits: Some(Limits {
                requests_per_minute: dep.requests_per_minute,
                tokens_per_minute: dep.tokens_per_minute,
                max_concurrent: 0,
            }),
            budget: None,
        }],
        tokens: input.saturating_add(output),
        cost_micros: 0,
    };
    match edge.inner.services.limiter.admit(&a).await {
        Ok(headers) => {
            edge.inner.selector.note_headroom(&dep.id, headroom(&headers));
            if let Some(r) = rec.as_deref_mut() {
                r.hold_upstream(a);
            }
            Ok(())
        }
        Err(d) => {
            edge.inner.selector.note_headroom(&dep.id, 0.0);
            metrics::counter!("relay_edge_upstream_limit_skips_total", "deployment" => dep.id.clone())
                .increment(1);
            Err(RelayError::new(
                ErrorCode::RateLimited,
                "Every deployment of this model is at its upstream rate limit; retry later.",
            )
            .with_retry_after(d.error.retry_after_secs))
        }
    }
}

/// The smallest share left of the limits the admission headers report (1 = none reported).
fn headroom(headers: &relay_core::contracts::RateHeaders) -> f64 {
    let get = |n: &str| headers.iter().find(|(k, _)| *k == n).and_then(|(_, v)| v.parse::<f64>().ok());
    [
        ("x-ratelimit-remaining-requests", "x-ratelimit-limit-requests"),
        ("x-ratelimit-remaining-tokens", "x-ratelimit-limit-tokens"),
    ]
    .iter()
    .filter_map(|(left, limit)| Some(get(left)? / get(limit)?.max(1.0)))
    .fold(1.0, f64::min)
}
