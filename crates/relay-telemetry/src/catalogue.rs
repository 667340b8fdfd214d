//! Every metric a Relay process exports, with its kind, help text and (for histograms) its buckets. The
//! recorder describes them all at start, so `/metrics` carries `# HELP` and `# TYPE` for each, and the
//! histograms get buckets suited to LLM traffic (seconds to minutes for answers, milliseconds for token
//! gaps) instead of summaries, so they aggregate across replicas. A test checks that every metric the code
//! records is listed here with the right kind, and that the dashboards and alert rules name only these.
//!
//! Labels are bounded by construction: routes are the router's patterns, models are the operator's model
//! groups (`unrouted` otherwise), deployments and providers come from config, statuses and error codes
//! are closed sets. Never a key id, user, IP or request id.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Histogram bucket upper bounds (empty for counters and gauges).
    pub buckets: &'static [f64],
}

/// Whole answers and first tokens: 5 ms to 5 min.
pub const ANSWER_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];
/// Gaps between tokens of a stream: 0.5 ms to 2.5 s.
pub const GAP_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Internal calls: 0.25 ms up (a streamed adapter call lasts as long as its answer).
pub const CALL_BUCKETS: &[f64] =
    &[0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0];
/// Billing lag: 10 ms to 10 min.
pub const LAG_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0];

const fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric { name, kind: Kind::Counter, help, buckets: &[] }
}
const fn gauge(name: &'static str, help: &'static str) -> Metric {
    Metric { name, kind: Kind::Gauge, help, buckets: &[] }
}
const fn histogram(name: &'static str, help: &'static str, buckets: &'static [f64]) -> Metric {
    Metric { name, kind: Kind::Histogram, help, buckets }
}

pub const METRICS: &[Metric] = &[
    // --- model traffic (edge, one per authenticated request, when it ends) ---
    counter(
        "relay_llm_requests_total",
        "Model requests by route, model group, provider, deployment and HTTP status (499: the client left).",
    ),
    histogram(
        "relay_llm_request_duration_seconds",
        "Whole request time, first byte in to last byte out, by route, model group, provider, deployment and outcome.",
        ANSWER_BUCKETS,
    ),
    histogram(
        "relay_llm_time_to_first_token_seconds",
        "Streams: time from the request's arrival to its first output token.",
        ANSWER_BUCKETS,
    ),
    histogram(
        "relay_llm_inter_token_seconds",
        "Streams: time between two chunks that carried new output tokens.",
        GAP_BUCKETS,
    ),
    counter(
        "relay_llm_tokens_total",
        "Tokens billed, by model group, provider, deployment and kind (input, output, cached_input, cache_write, reasoning).",
    ),
    counter(
        "relay_llm_cost_micros_total",
        "Provider cost of the tokens billed, in millionths of the currency.",
    ),
    // --- edge HTTP ---
    counter("relay_edge_requests_total", "HTTP requests by route and status, including refused ones."),
    histogram(
        "relay_edge_request_duration_seconds",
        "HTTP time to response headers by route.",
        ANSWER_BUCKETS,
    ),
    histogram(
        "relay_edge_time_to_first_byte_seconds",
        "Time to the first answer byte sent to the client, stream or not.",
        ANSWER_BUCKETS,
    ),
    counter(
        "relay_edge_errors_total",
        "Errors answered, by route and error code (mid-stream errors included).",
    ),
    gauge("relay_edge_streams_in_flight", "Streamed answers being sent right now."),
    counter(
        "relay_edge_overload_refusals_total",
        "Requests refused with 503 because the in-flight or buffered-body bound was reached.",
    ),
    counter("relay_edge_deadline_cuts_total", "Requests cut at the total request deadline."),
    counter(
        "relay_edge_body_timeouts_total",
        "Requests whose body did not arrive within body_read_timeout_ms.",
    ),
    counter(
        "relay_edge_stream_timeouts_total",
        "Streams ended by their model group's idle or total timeout.",
    ),
    counter("relay_edge_drain_cut_total", "Drained answers (client gone) cut at the drain bound."),
    counter(
        "relay_edge_response_cache_total",
        "Response cache lookups of caching model groups, by result (hit, miss).",
    ),
    counter(
        "relay_edge_responses_not_stored_total",
        "Responses API answers that could not be stored (the answer was delivered).",
    ),
    counter(
        "relay_edge_conversation_appends_failed_total",
        "Responses turns that could not be added to their conversation (the answer was delivered).",
    ),
    counter(
        "relay_edge_batch_lines_total",
        "Batch input lines answered by Relay's batch runner, by result (ok, error).",
    ),
    // --- edge keys ---
    counter(
        "relay_edge_auth_cache_total",
        "Key lookups at the edge by result: hit, miss, joined (coalesced), refused (negative cache).",
    ),
    counter(
        "relay_edge_auth_throttled_total",
        "Requests refused because their address failed authentication too often.",
    ),
    counter("relay_edge_invalidations_total", "Key, team or org invalidations applied."),
    // --- edge routing and failover ---
    counter(
        "relay_edge_upstream_attempts_total",
        "Upstream attempts by deployment and result (answered, or the error code).",
    ),
    histogram(
        "relay_edge_upstream_answer_seconds",
        "Time from an attempt's start to the upstream's answer, by provider and deployment.",
        ANSWER_BUCKETS,
    ),
    gauge("relay_edge_breaker_open", "1 while a deployment's circuit breaker is open, else 0."),
    counter("relay_edge_breaker_changes_total", "Circuit breaker transitions."),
    gauge("relay_edge_retry_budget_left", "Retries the edge may still spend in the current window."),
    counter("relay_edge_retry_rounds_total", "Extra rounds over a model group's deployments."),
    counter(
        "relay_edge_retry_budget_exhausted_total",
        "Failovers skipped because the retry budget was spent.",
    ),
    counter("relay_edge_failover_total", "Failovers to the next deployment, by the error that caused them."),
    counter("relay_edge_hedges_total", "Hedged second attempts started."),
    counter(
        "relay_edge_hedge_overhead_tokens_total",
        "Input tokens of hedge attempts that lost (provider overhead, never billed to callers).",
    ),
    counter(
        "relay_edge_upstream_limit_skips_total",
        "Deployments skipped because their upstream account RPM/TPM was full.",
    ),
    counter("relay_edge_routing_rule_total", "Requests whose strategy a routing rule chose, by rule."),
    // --- edge usage delivery ---
    counter("relay_edge_usage_published_total", "Usage events handed to the outbox."),
    counter(
        "relay_edge_usage_lost_total",
        "Usage events that could not be stored or delivered (should stay 0).",
    ),
    counter("relay_outbox_published_total", "Outbox events acknowledged by the bus."),
    counter("relay_outbox_publish_failures_total", "Outbox publish attempts that failed (retried)."),
    counter("relay_outbox_write_errors_total", "Outbox writes to disk that failed."),
    gauge("relay_outbox_pending_events", "Usage events in the outbox not yet acknowledged by the bus."),
    gauge("relay_outbox_oldest_pending_age_seconds", "Age of the oldest unacknowledged outbox event."),
    // --- limits ---
    counter(
        "relay_limits_refused_total",
        "Admissions refused, by limit: requests, tokens, concurrency, budget.",
    ),
    counter("relay_limits_redis_errors_total", "Limiter calls to Redis that failed."),
    counter(
        "relay_limits_budget_rebuilt_total",
        "Budget counters rebuilt from the ledger (after a Redis data loss).",
    ),
    counter("relay_limits_prepaid_reads_total", "Prepaid balances read from billing."),
    // --- adapter ---
    counter("relay_adapter_calls_total", "Adapter calls by kind."),
    counter(
        "relay_adapter_unknown_deployment_total",
        "Calls naming a deployment this adapter does not serve.",
    ),
    counter(
        "relay_adapter_upstream_requests_total",
        "HTTP requests to providers by provider and status (0: no answer).",
    ),
    histogram(
        "relay_adapter_upstream_duration_seconds",
        "Provider time to response headers, by provider.",
        ANSWER_BUCKETS,
    ),
    counter(
        "relay_upstream_auth_failures_total",
        "Provider refusals of Relay's own credentials, by provider.",
    ),
    counter(
        "relay_upstream_usage_missing_total",
        "Answers that ended without the provider's usage (Relay counted).",
    ),
    // --- gRPC (every service) ---
    counter("relay_grpc_server_requests_total", "gRPC calls served, by method and status code."),
    histogram(
        "relay_grpc_server_duration_seconds",
        "gRPC time to response headers, by method.",
        CALL_BUCKETS,
    ),
    counter("relay_grpc_unauthenticated_total", "gRPC calls refused for a missing or wrong service token."),
    // --- bus and billing ---
    gauge(
        "relay_bus_consumer_pending_events",
        "Usage events on the bus not yet recorded by billing (consumer lag).",
    ),
    counter("relay_usage_events_poison_total", "Undecodable usage events kept as dead letters."),
    counter(
        "relay_usage_events_total",
        "Usage events handled by billing, by result (inserted, duplicate, dead_letter).",
    ),
    counter("relay_access_log_dropped_total", "Access log lines dropped because the writer fell behind."),
    histogram(
        "relay_billing_lag_seconds",
        "Time from a request's end to its usage being booked in the ledger.",
        LAG_BUCKETS,
    ),
];

/// The catalogue entry of `name`, if any.
pub fn find(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prefixed_and_histograms_have_ascending_buckets() {
        let mut seen = std::collections::HashSet::new();
        for m in METRICS {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("relay_") && !m.help.is_empty(), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters end in _total",
                m.name
            );
            assert_eq!(m.kind == Kind::Histogram, !m.buckets.is_empty(), "{}", m.name);
            assert!(m.buckets.windows(2).all(|w| w[0] < w[1]), "{}", m.name);
        }
    }
}
