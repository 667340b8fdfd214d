//! Limits in this process: the embedded default, and the fail-open fallback when Redis is down.

use std::collections::HashMap;
use std::sync::Mutex;

use relay_core::contracts::{Admission, Denial, Limiter, RateHeaders};

use crate::{LEASE_TTL_MS, Refusal, active, denial, headers, i64_of, minute, period_key, scope_name};

#[derive(Default)]
struct State {
    requests: HashMap<(String, i64), i64>,
    tokens: HashMap<(String, i64), i64>,
    /// scope → request id → admitted at (ms).
    slots: HashMap<String, HashMap<String, i64>>,
    /// scope → request id → (admitted at ms, money held). A reservation whose settlement never comes
    /// (a crash, a lost task) stops counting after [`LEASE_TTL_MS`].
    reserved: HashMap<String, HashMap<String, (i64, i64)>>,
    spent: HashMap<(String, String), i64>,
    /// Every admission not yet settled: request id → admitted at (ms). Settling needs one, so a duplicate
    /// settlement gives nothing back twice, and a caller can ask whether this store admitted a request.
    leases: HashMap<String, i64>,
}

#[derive(Default)]
pub struct MemoryLimiter {
    state: Mutex<State>,
    seeder: Option<crate::seed::Seeder>,
    /// This process's share of every limit: 1 normally; the live replica count when standing in for
    /// Redis (fail-open), so the replicas together stay within each limit.
    share: std::sync::atomic::AtomicU32,
}

impl MemoryLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Enforces `1/replicas` of every rate and concurrency limit, and of every budget's remainder (as
    /// this process knows it), from now on.
    pub fn set_share(&self, replicas: u32) {
        self.share.store(replicas.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn share(&self) -> i64 {
        i64::from(self.share.load(std::sync::atomic::Ordering::Relaxed).max(1))
    }

    /// Did this store admit `request_id` (and has it not been settled yet)?
    pub fn holds(&self, request_id: &str) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).leases.contains_key(request_id)
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

    /// Money a scope holds for requests in flight (leases past their lifetime no longer count).
    fn reserved(&mut self, scope: &str, now_ms: i64) -> i64 {
        let Some(leases) = self.reserved.get_mut(scope) else { return 0 };
        leases.retain(|_, (at, _)| *at > now_ms - LEASE_TTL_MS);
        leases.values().fold(0i64, |sum, (_, cost)| sum.saturating_add(*cost))
    }
}

/// `limit` split `share` ways, rounded up (a replica may always admit one request).
fn part(limit: i64, share: i64) -> i64 {
    if limit <= 0 || share <= 1 { limit } else { limit.saturating_add(share - 1) / share }
}

impl MemoryLimiter {
    async fn admit_once(&self, a: &Admission) -> Result<RateHeaders, Denial> {
        self.seed(a).await?;
        let mut scopes = active(a);
        crate::seed::apply_prepaid(self.seeder.as_ref(), a, &mut scopes).await?;
        let share = self.share();
        let m = minute(a.at_ms);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.forget_old_windows(m);
        let tokens = i64_of(a.tokens);
        let cost = a.cost_micros.max(0);
        for (scope, r) in &scopes {
            let name = scope_name(scope);
            let key = (name.clone(), m);
            let requests = st.requests.get(&key).copied().unwrap_or(0);
            let used_tokens = st.tokens.get(&key).copied().unwrap_or(0);
            let slots = st.slots.entry(name.clone()).or_default();
            slots.retain(|_, at| *at > a.at_ms - LEASE_TTL_MS);
            let busy = i64::try_from(slots.len()).unwrap_or(i64::MAX);
            let spent = st.spent.get(&(name.clone(), period_key(r.period, a.at_ms))).copied().unwrap_or(0);
            let committed = spent.saturating_add(st.reserved(&name, a.at_ms));
            // Standing in for Redis: this replica's part of what is left of the budget.
            let budget = if share > 1 {
                spent.saturating_add(part((r.budget - spent).max(0), share))
            } else {
                r.budget
            };
            // Sums in i128: counters near the top of the range compare exactly instead of wrapping.
            let over =
                |used: i64, more: i64, limit: i64| i128::from(used) + i128::from(more) > i128::from(limit);
            let refusal = if r.rpm > 0 && over(requests, 1, part(r.rpm, share)) {
                Some(Refusal::Requests)
            } else if r.tpm > 0 && over(used_tokens, tokens, part(r.tpm, share)) {
                Some(Refusal::Tokens)
            } else if r.concurrent > 0 && over(busy, 1, part(r.concurrent, share)) {
                Some(Refusal::Concurrency)
            } else if r.budget > 0 && over(committed, cost, budget) {
                Some(Refusal::Budget)
            } else {
                None
            };
            if let Some(why) = refusal {
                return Err(denial(scope, why, a.at_ms, headers(r, requests, used_tokens, a.at_ms)));
            }
        }
        if st.leases.len() >= 100_000 {
            st.leases.retain(|_, at| *at > a.at_ms - LEASE_TTL_MS);
        }
        st.leases.insert(a.request_id.clone(), a.at_ms);
        let mut out = Vec::new();
        for (i, (scope, r)) in scopes.iter().enumerate() {
            let name = scope_name(scope);
            let key = (name.clone(), m);
            let requests =
                *st.requests.entry(key.clone()).and_modify(|v| *v = v.saturating_add(1)).or_insert(1);
            let used = *st.tokens.entry(key).and_modify(|v| *v = v.saturating_add(tokens)).or_insert(tokens);
            if r.concurrent > 0 {
                st.slots.entry(name.clone()).or_default().insert(a.request_id.clone(), a.at_ms);
            }
            if r.budget > 0 {
                st.reserved.entry(name).or_default().insert(a.request_id.clone(), (a.at_ms, cost));
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
        // No lease: settled already (a duplicate gives nothing back twice) or never admitted here.
        if st.leases.remove(&a.request_id).is_none() {
            return;
        }
        for (scope, r) in active(a) {
            let name = scope_name(scope);
            if let Some(s) = st.slots.get_mut(&name) {
                s.remove(&a.request_id);
            }
            if let Some(l) = st.reserved.get_mut(&name) {
                l.remove(&a.request_id);
            }
            if let Some(t) = st.tokens.get_mut(&(name.clone(), m)) {
                *t = t.saturating_add(i64_of(tokens)).saturating_sub(i64_of(a.tokens)).max(0);
            }
            if r.budget > 0 {
                let v = st.spent.entry((name, period_key(r.period, a.at_ms))).or_default();
                *v = v.saturating_add(cost_micros.max(0));
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
    async fn leases_expire_settle_once_and_arithmetic_saturates() {
        let l = MemoryLimiter::new();
        let key = scope(ScopeKind::Key, "leak", 0, 0, 1, 1000);
        let mut crashed = adm("1", vec![key.clone()], 0, 600);
        crashed.at_ms -= LEASE_TTL_MS + 1;
        l.admit(&crashed).await.unwrap();
        // Never settled: once past its lifetime, the slot and the money are free again.
        let live = adm("2", vec![key.clone()], 0, 600);
        l.admit(&live).await.unwrap();
        assert!(l.holds("2"));
        l.settle(&live, 0, 100).await;
        l.settle(&live, 0, 100).await; // a duplicate books nothing more
        assert_eq!((l.spent("key:leak", "total"), l.holds("2")), (100, false));
        // Values at the edge of the integer range refuse instead of wrapping.
        let tpm = scope(ScopeKind::Team, "huge", 0, u64::MAX, 0, i64::MAX);
        let huge = adm("3", vec![tpm.clone()], u64::MAX, i64::MAX);
        assert!(l.admit(&huge).await.is_ok(), "exactly at the limit");
        assert!(l.admit(&adm("4", vec![tpm], u64::MAX, i64::MAX)).await.is_err(), "no wrap past it");
    }

    #[tokio::test]
    async fn a_share_splits_every_limit_and_the_budget_left() {
        let l = MemoryLimiter::new();
        l.set_share(3);
        let key = scope(ScopeKind::Key, "shared", 9, 0, 0, 900);
        for i in 0..3 {
            l.admit(&adm(&i.to_string(), vec![key.clone()], 0, 0)).await.unwrap();
        }
        assert!(l.admit(&adm("x", vec![key.clone()], 0, 0)).await.is_err(), "9 rpm / 3 replicas");
        let money = scope(ScopeKind::Org, "money", 0, 0, 0, 900);
        l.admit(&adm("m1", vec![money.clone()], 0, 300)).await.unwrap();
        assert!(l.admit(&adm("m2", vec![money], 0, 1)).await.is_err(), "a third of 900");
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
