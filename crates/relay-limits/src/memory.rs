//! Limits in this process: the embedded default, and the fail-open fallback when Redis is down.

use std::collections::HashMap;
use std::sync::Mutex;

use relay_core::contracts::{Admission, Denial, Limiter, RateHeaders};

use crate::{Refusal, SLOT_TTL_MS, active, denial, headers, i64_of, minute, period_key, scope_name};

#[derive(Default)]
struct State {
    requests: HashMap<(String, i64), i64>,
    tokens: HashMap<(String, i64), i64>,
    /// scope → request id → admitted at (ms).
    slots: HashMap<String, HashMap<String, i64>>,
    reserved: HashMap<String, i64>,
    spent: HashMap<(String, String), i64>,
}

#[derive(Default)]
pub struct MemoryLimiter {
    state: Mutex<State>,
    seeder: Option<crate::seed::Seeder>,
}

impl MemoryLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts each budget counter from billing's books the first time this process meets it.
    pub fn with_ledger(mut self, billing: std::sync::Arc<dyn relay_core::contracts::Billing>) -> Self {
        self.seeder = Some(crate::seed::Seeder::new(billing, None));
        self
    }

    async fn seed(&self, a: &Admission) -> Result<(), Denial> {
        let Some(seeder) = &self.seeder else { return Ok(()) };
        for (s, r) in active(a).into_iter().filter(|(_, r)| r.budget > 0) {
            let name = scope_name(s);
            let period = period_key(r.period, a.at_ms);
            let counter = format!("{name}/{period}");
            if !seeder.due(&counter) {
                continue;
            }
            match seeder.spent(&name, r.period, a.at_ms).await {
                Ok(spent) => {
                    let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    let v = st.spent.entry((name, period)).or_default();
                    *v = (*v).max(spent);
                    seeder.done(counter);
                }
                Err(e) => {
                    tracing::warn!(scope = %name, error = %e, "budget counter not rebuilt from the ledger yet")
                }
            }
        }
        Ok(())
    }

    /// Money spent by a scope in a period.
    #[cfg(test)]
    fn spent(&self, scope: &str, period: &str) -> i64 {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.spent.get(&(scope.to_owned(), period.to_owned())).copied().unwrap_or(0)
    }
}

impl State {
    fn forget_old_windows(&mut self, now_minute: i64) {
        if self.requests.len() + self.tokens.len() > 10_000 {
            self.requests.retain(|(_, m), _| *m >= now_minute - 1);
            self.tokens.retain(|(_, m), _| *m >= now_minute - 1);
        }
    }
}

impl MemoryLimiter {
    async fn admit_once(&self, a: &Admission) -> Result<RateHeaders, Denial> {
        self.seed(a).await?;
        let mut scopes = active(a);
        crate::seed::apply_prepaid(self.seeder.as_ref(), a, &mut scopes).await?;
        let m = minute(a.at_ms);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.forget_old_windows(m);
        let tokens = i64_of(a.tokens);
        for (scope, r) in &scopes {
            let name = scope_name(scope);
            let key = (name.clone(), m);
            let requests = st.requests.get(&key).copied().unwrap_or(0);
            let used_tokens = st.tokens.get(&key).copied().unwrap_or(0);
            let slots = st.slots.entry(name.clone()).or_default();
            slots.retain(|_, at| *at > a.at_ms - SLOT_TTL_MS);
            let busy = i64::try_from(slots.len()).unwrap_or(i64::MAX);
            let period = (name.clone(), period_key(r.period, a.at_ms));
            let committed =
                st.spent.get(&period).copied().unwrap_or(0) + st.reserved.get(&name).copied().unwrap_or(0);
            let refusal = if r.rpm > 0 && requests + 1 > r.rpm {
                Some(Refusal::Requests)
            } else if r.tpm > 0 && used_tokens + tokens > r.tpm {
                Some(Refusal::Tokens)
            } else if r.concurrent > 0 && busy + 1 > r.concurrent {
                Some(Refusal::Concurrency)
            } else if r.budget > 0 && committed + a.cost_micros > r.budget {
                Some(Refusal::Budget)
            } else {
                None
            };
            if let Some(why) = refusal {
                return Err(denial(scope, why, a.at_ms, headers(r, requests, used_tokens, a.at_ms)));
            }
        }
        let mut out = Vec::new();
        for (i, (scope, r)) in scopes.iter().enumerate() {
            let name = scope_name(scope);
            let key = (name.clone(), m);
            let requests = *st.requests.entry(key.clone()).and_modify(|v| *v += 1).or_insert(1);
            let used = *st.tokens.entry(key).and_modify(|v| *v += tokens).or_insert(tokens);
            if r.concurrent > 0 {
                st.slots.entry(name.clone()).or_default().insert(a.request_id.clone(), a.at_ms);
            }
            if r.budget > 0 {
                *st.reserved.entry(name).or_default() += a.cost_micros;
            }
            if i == 0 {
                out = headers(r, requests, used, a.at_ms);
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl Limiter for MemoryLimiter {
    async fn admit(&self, a: &Admission) -> Result<RateHeaders, Denial> {
        let first = self.admit_once(a).await;
        if crate::seed::worth_retrying(self.seeder.as_ref(), a, &first) {
            self.admit_once(a).await
        } else {
            first
        }
    }

    async fn budget_used(&self, a: &Admission) -> Option<f64> {
        let scopes = crate::budgeted(self.seeder.as_ref(), a).await?;
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        scopes
            .iter()
            .map(|(s, r)| {
                let spent =
                    st.spent.get(&(scope_name(s), period_key(r.period, a.at_ms))).copied().unwrap_or(0);
                spent as f64 / r.budget as f64
            })
            .reduce(f64::max)
    }

    async fn settle(&self, a: &Admission, tokens: u64, cost_micros: i64) {
        let m = minute(a.at_ms);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for (scope, r) in active(a) {
            let name = scope_name(scope);
            if let Some(t) = st.tokens.get_mut(&(name.clone(), m)) {
                *t += i64_of(tokens) - i64_of(a.tokens);
            }
            if let Some(s) = st.slots.get_mut(&name) {
                s.remove(&a.request_id);
            }
            if r.budget > 0 {
                let res = st.reserved.entry(name.clone()).or_default();
                *res = (*res - a.cost_micros).max(0);
                *st.spent.entry((name, period_key(r.period, a.at_ms))).or_default() += cost_micros;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_core::ErrorCode;
    use relay_core::pb::auth::v1::{Budget, BudgetPeriod, Limits, Scope, ScopeKind};
    use relay_core::pb::common::v1::Money;

    pub(crate) fn scope(kind: ScopeKind, id: &str, rpm: u32, tpm: u64, conc: u32, budget: i64) -> Scope {
        Scope {
            kind: kind as i32,
            id: id.into(),
            limits: Some(Limits { requests_per_minute: rpm, tokens_per_minute: tpm, max_concurrent: conc }),
            budget: Some(Budget {
                limit: Some(Money { micros: budget, currency: "USD".into() }),
                period: BudgetPeriod::Total as i32,
            }),
        }
    }

    fn adm(id: &str, scopes: Vec<Scope>, tokens: u64, cost: i64) -> Admission {
        Admission { request_id: id.into(), at_ms: 1_800_000_000_000, scopes, tokens, cost_micros: cost }
    }

    #[tokio::test]
    async fn a_restarted_process_starts_budgets_from_the_books() {
        let books = relay_test_support::Books::new(0, &[("org:o", 900)]);
        let l = MemoryLimiter::new().with_ledger(std::sync::Arc::new(books));
        let org = scope(ScopeKind::Org, "o", 0, 0, 0, 1000);
        let e = l.admit(&adm("1", vec![org.clone()], 1, 200)).await.unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InsufficientQuota, "900 booked before the restart");
        l.admit(&adm("2", vec![org.clone()], 1, 100)).await.unwrap();
        l.settle(&adm("2", vec![org.clone()], 1, 100), 1, 100).await;
        assert_eq!(l.spent("org:o", "total"), 1000, "seeded once, then counted here");
    }

    #[tokio::test]
    async fn each_limit_refuses_at_its_bound_and_settles() {
        let l = MemoryLimiter::new();
        let key = scope(ScopeKind::Key, "k", 2, 0, 0, 0);
        assert!(l.admit(&adm("1", vec![key.clone()], 1, 0)).await.is_ok());
        let h = l.admit(&adm("2", vec![key.clone()], 1, 0)).await.unwrap();
        assert!(h.contains(&("x-ratelimit-remaining-requests", "0".into())));
        let e = l.admit(&adm("3", vec![key], 1, 0)).await.unwrap_err();
        assert_eq!(e.error.code, ErrorCode::RateLimited);
        assert!(e.error.retry_after_secs.is_some());

        let team = scope(ScopeKind::Team, "t", 0, 100, 0, 0);
        let a = adm("4", vec![team.clone()], 80, 0);
        l.admit(&a).await.unwrap();
        assert!(l.admit(&adm("5", vec![team.clone()], 30, 0)).await.is_err(), "80 + 30 > 100");
        l.settle(&a, 20, 0).await; // real use was 20: 80 returned
        assert!(l.admit(&adm("6", vec![team], 30, 0)).await.is_ok());

        let org = scope(ScopeKind::Org, "o", 0, 0, 1, 0);
        let a = adm("7", vec![org.clone()], 0, 0);
        l.admit(&a).await.unwrap();
        assert!(l.admit(&adm("8", vec![org.clone()], 0, 0)).await.is_err());
        l.settle(&a, 0, 0).await;
        assert!(l.admit(&adm("9", vec![org], 0, 0)).await.is_ok());
    }

    #[tokio::test]
    async fn budgets_reserve_then_book_real_cost() {
        let l = MemoryLimiter::new();
        let key = scope(ScopeKind::Key, "b", 0, 0, 0, 1000);
        let a = adm("1", vec![key.clone()], 0, 600);
        l.admit(&a).await.unwrap();
        let e = l.admit(&adm("2", vec![key.clone()], 0, 600)).await.unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InsufficientQuota);
        l.settle(&a, 0, 250).await;
        assert_eq!(l.spent("key:b", "total"), 250);
        l.admit(&adm("3", vec![key.clone()], 0, 700)).await.unwrap();
        assert!(
            l.admit(&adm("4", vec![key], 0, 100)).await.is_err(),
            "250 spent + 700 reserved + 100 > 1000"
        );
    }

    #[tokio::test]
    async fn a_refused_scope_holds_nothing_in_the_others() {
        let l = MemoryLimiter::new();
        let key = scope(ScopeKind::Key, "k", 10, 0, 0, 0);
        let org = scope(ScopeKind::Org, "o", 1, 0, 0, 0);
        l.admit(&adm("1", vec![key.clone(), org.clone()], 0, 0)).await.unwrap();
        assert!(l.admit(&adm("2", vec![key.clone(), org], 0, 0)).await.is_err());
        let h = l.admit(&adm("3", vec![key], 0, 0)).await.unwrap();
        assert!(h.contains(&("x-ratelimit-remaining-requests", "8".into())), "{h:?}");
    }
}
