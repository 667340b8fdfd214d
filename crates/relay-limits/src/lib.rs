//! relay-limits: requests per minute, tokens per minute, concurrent requests and money budgets, for
//! every scope of a caller (key, team, org), enforced before dispatch and settled to real usage after.
//!
//! [`RedisLimiter`] shares counters across replicas with one atomic Lua call per admission (and one per
//! settlement, off the request path); [`MemoryLimiter`] keeps them in process (embedded mode, and the
//! fail-open fallback when Redis is down). The bound both state and test: within any calendar minute, a
//! scope admits at most `rpm` requests and reserves at most `tpm` tokens; at any moment, spent plus reserved
//! money never exceeds the budget, so total spend ≤ budget (+ the difference between one request's real
//! and reserved cost when an upstream overruns its reservation).
//! Budget spend counters are a cache of billing's ledger, rebuilt from it ([`seed`]).
//! The response cache's shared store ([`answer_cache`]) lives here too: it rides the limiter's Redis
//! connection, so an edge has one Redis client.
//! What does not belong here: who the caller is (auth), prices (routing), recording usage (billing).

pub mod answer_cache;
mod memory;
mod redis_limiter;
pub mod seed;

use relay_core::contracts::{Admission, Denial, RateHeaders};
use relay_core::pb::auth::v1::{BudgetPeriod, Scope, ScopeKind};
use relay_core::{ErrorCode, RelayError};
use serde::Deserialize;

pub use memory::MemoryLimiter;
pub use redis_limiter::RedisLimiter;

/// `[limits]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Redis holding the shared counters. Unset: in-memory (per process).
    pub redis_url: Option<String>,
    /// When Redis cannot be reached: `fail_open` (enforce per-replica limits in memory) or `fail_closed`
    /// (refuse requests with 503).
    pub on_redis_error: OnRedisError,
    /// Prefix of every Redis key (several deployments can share one Redis).
    pub key_prefix: String,
    /// Longest wait for Redis before the outage policy applies.
    pub redis_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            on_redis_error: OnRedisError::FailOpen,
            key_prefix: "relay".into(),
            redis_timeout_ms: 250,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    FailOpen,
    FailClosed,
}

/// Longest a request holds a concurrency slot and a budget reservation if its settlement never arrives
/// (a crashed replica, a lost task): past it they stop counting on their own. Longer than the edge's
/// request deadline plus its drain, so a live request never loses its lease.
pub const LEASE_TTL_MS: i64 = 20 * 60 * 1000;

/// What one scope enforces, read from its protobuf form (0 = no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Rules {
    pub rpm: i64,
    pub tpm: i64,
    pub concurrent: i64,
    pub budget: i64,
    pub period: BudgetPeriod,
    /// The limit is the scope's top-ups in the ledger ([`seed::apply_prepaid`] sets `budget`).
    pub prepaid: bool,
}

impl Rules {
    pub fn of(s: &Scope) -> Self {
        let l = s.limits.unwrap_or_default();
        let b = s.budget.clone().unwrap_or_default();
        let period = BudgetPeriod::try_from(b.period).unwrap_or(BudgetPeriod::Total);
        let prepaid = period == BudgetPeriod::Prepaid;
        Self {
            rpm: i64::from(l.requests_per_minute),
            tpm: i64::try_from(l.tokens_per_minute).unwrap_or(i64::MAX),
            concurrent: i64::from(l.max_concurrent),
            // Until the balance is read, a prepaid scope counts spend against an unreachable limit.
            budget: if prepaid { i64::MAX / 4 } else { b.limit.map_or(0, |m| m.micros) },
            period,
            prepaid,
        }
    }

    pub fn any(&self) -> bool {
        self.rpm > 0 || self.tpm > 0 || self.concurrent > 0 || self.budget > 0
    }
}

/// `key:abc`, `team:t1`, `org:o1`.
pub(crate) fn scope_name(s: &Scope) -> String {
    let kind = match ScopeKind::try_from(s.kind).unwrap_or(ScopeKind::Unspecified) {
        ScopeKind::Key => "key",
        ScopeKind::Team => "team",
        ScopeKind::Org => "org",
        ScopeKind::Deployment => "deployment",
        ScopeKind::Unspecified => "scope",
    };
    format!("{kind}:{}", s.id)
}

pub(crate) fn minute(at_ms: i64) -> i64 {
    at_ms.div_euclid(60_000)
}

/// The budget period an instant falls in, as a key suffix.
pub(crate) fn period_key(period: BudgetPeriod, at_ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_default();
    match period {
        BudgetPeriod::Daily => t.format("d%Y%m%d").to_string(),
        BudgetPeriod::Monthly => t.format("m%Y%m").to_string(),
        BudgetPeriod::Total | BudgetPeriod::Prepaid | BudgetPeriod::Unspecified => "total".into(),
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Requests,
    Tokens,
    Concurrency,
    Budget,
}

/// Seconds until the minute window of `at_ms` ends.
fn window_reset(at_ms: i64) -> u32 {
    u32::try_from(60 - at_ms.rem_euclid(60_000) / 1000).unwrap_or(60).max(1)
}

/// Exports every refusal counter at zero, so rates and alerts see the series before the first refusal.
pub fn register_metrics() {
    for limit in ["requests", "tokens", "concurrency", "budget"] {
        metrics::counter!("relay_limits_refused_total", "limit" => limit).increment(0);
    }
}

pub(crate) fn denial(scope: &Scope, why: Refusal, at_ms: i64, headers: RateHeaders) -> Denial {
    let name = scope_name(scope);
    let (code, msg, retry) = match why {
        Refusal::Requests => (
            ErrorCode::RateLimited,
            format!("Rate limit reached for {name}: requests per minute."),
            Some(window_reset(at_ms)),
        ),
        Refusal::Tokens => (
            ErrorCode::RateLimited,
            format!("Rate limit reached for {name}: tokens per minute."),
            Some(window_reset(at_ms)),
        ),
        Refusal::Concurrency => {
            (ErrorCode::RateLimited, format!("Too many concurrent requests for {name}."), Some(1))
        }
        Refusal::Budget => (
            ErrorCode::InsufficientQuota,
            format!("You exceeded the budget of {name}. Raise the budget or wait for the next period."),
            None,
        ),
    };
    metrics::counter!("relay_limits_refused_total", "limit" => format!("{why:?}").to_lowercase())
        .increment(1);
    Denial { error: RelayError::new(code, msg).with_retry_after(retry), headers }
}

/// OpenAI-style `x-ratelimit-*` headers for the key scope, after this admission.
pub(crate) fn headers(rules: &Rules, requests_used: i64, tokens_used: i64, at_ms: i64) -> RateHeaders {
    let reset = format!("{}s", window_reset(at_ms));
    let mut h = Vec::new();
    if rules.rpm > 0 {
        h.push(("x-ratelimit-limit-requests", rules.rpm.to_string()));
        h.push(("x-ratelimit-remaining-requests", (rules.rpm - requests_used).max(0).to_string()));
        h.push(("x-ratelimit-reset-requests", reset.clone()));
    }
    if rules.tpm > 0 {
        h.push(("x-ratelimit-limit-tokens", rules.tpm.to_string()));
        h.push(("x-ratelimit-remaining-tokens", (rules.tpm - tokens_used).max(0).to_string()));
        h.push(("x-ratelimit-reset-tokens", reset));
    }
    h
}

/// The scopes of an admission that enforce anything, with their rules.
pub(crate) fn active(a: &Admission) -> Vec<(&Scope, Rules)> {
    a.scopes.iter().map(|s| (s, Rules::of(s))).filter(|(_, r)| r.any()).collect()
}

/// The admission's scopes that have a budget (prepaid ones at their balance), for `budget_used`; `None`
/// when there are none or a prepaid balance cannot be read.
pub(crate) async fn budgeted<'a>(
    seeder: Option<&seed::Seeder>,
    a: &'a Admission,
) -> Option<Vec<(&'a Scope, Rules)>> {
    let mut scopes = active(a);
    seed::apply_prepaid(seeder, a, &mut scopes).await.ok()?;
    scopes.retain(|(_, r)| r.budget > 0);
    (!scopes.is_empty()).then_some(scopes)
}

pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_windows_are_utc_calendar_based() {
        let at = 1_795_374_211_000; // 2026-11-22T...Z
        assert_eq!(period_key(BudgetPeriod::Daily, at), "d20261122");
        assert_eq!(period_key(BudgetPeriod::Monthly, at), "m202611");
        assert_eq!(period_key(BudgetPeriod::Total, at), "total");
        assert_eq!(minute(at), at / 60_000);
        assert!((1..=60).contains(&window_reset(at)));
    }
}
