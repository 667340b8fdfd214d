//! Budget counters are a cache of the ledger. The first time a process meets a budget scope in a period
//! (so after every start), and again every [`RECHECK`] for Redis (so after Redis lost its data), a missing
//! spent counter is rebuilt from billing's books before the admission runs. Billing lags the edge by the
//! outbox's delay, so a rebuilt counter may miss the last moments of spend; `fail_closed` refuses requests
//! while the books cannot be read, `fail_open` admits on what the counter holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_core::contracts::Billing;
use relay_core::pb::auth::v1::BudgetPeriod;
use relay_core::pb::billing::v1::SpentRequest;
use relay_core::{ErrorCode, RelayError};

/// How often a process looks again whether Redis still holds a budget counter.
pub const RECHECK: Duration = Duration::from_secs(30);
/// A refused prepaid scope's balance is read again after this long (a top-up applies within it), and
/// no sooner (an exhausted key retrying in a loop costs billing one read per scope per interval).
pub const REFRESH: Duration = Duration::from_secs(2);
/// Longest wait for billing's answer.
const LEDGER_TIMEOUT: Duration = Duration::from_secs(2);
/// After billing failed to answer for a scope's books, they are not asked again for this long: callers
/// get the failure at once (their `fail_open`/`fail_closed` policy applies) instead of each starting a
/// read that a slow ledger would not finish either.
pub const BOOKS_BACKOFF: Duration = Duration::from_secs(5);

/// (spent in the period, every top-up) as the books said, or why they could not be read.
type Books = Result<(i64, i64), RelayError>;

/// One scope-and-period's read of the books: at most one in flight; who waited for it takes its answer.
#[derive(Default)]
struct Flight {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// When the last read ended, and what it gave ((spent, top-ups), or the failure).
    last: Option<(Instant, Books)>,
}

pub struct Seeder {
    billing: Arc<dyn Billing>,
    /// Prepaid scope -> (when read, its top-ups): re-read every [`RECHECK`], so a top-up applies within it.
    prepaid: Mutex<HashMap<String, (Instant, i64)>>,
    /// Counter key -> when this process last made sure it exists.
    checked: Mutex<HashMap<String, Instant>>,
    recheck: Option<Duration>,
    /// (scope, period start, period end) -> its read of the books.
    flights: Mutex<HashMap<(String, i64, i64), Flight>>,
}

impl Seeder {
    /// `recheck`: look again after this long (Redis can lose data); `None`: once per process (memory).
    pub fn new(billing: Arc<dyn Billing>, recheck: Option<Duration>) -> Self {
        Self {
            billing,
            prepaid: Mutex::new(HashMap::new()),
            checked: Mutex::new(HashMap::new()),
            recheck,
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// Has this counter not been made sure of recently?
    pub fn due(&self, counter: &str) -> bool {
        let checked = self.checked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (checked.get(counter), self.recheck) {
            (None, _) => true,
            (Some(at), Some(every)) => at.elapsed() > every,
            (Some(_), None) => false,
        }
    }

    pub fn done(&self, counter: String) {
        let mut checked = self.checked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if checked.len() > 100_000 {
            checked.clear();
        }
        checked.insert(counter, Instant::now());
    }

    /// What the books say `scope` (`key:<id>`…) spent in the period `at_ms` falls in.
    pub async fn spent(&self, scope: &str, period: BudgetPeriod, at_ms: i64) -> Result<i64, RelayError> {
        Ok(self.books(scope, period, at_ms).await?.0)
    }

    /// (spent in the period, all top-ups) for `scope`. Reads of the same scope and period share one
    /// query (at startup every concurrent request meets the same unseeded counter, and summing a large
    /// tenant's history once per request would flood the database), and a failed read is not repeated
    /// for [`BOOKS_BACKOFF`].
    async fn books(&self, scope: &str, period: BudgetPeriod, at_ms: i64) -> Result<(i64, i64), RelayError> {
        let (from, to) = period_bounds(period, at_ms);
        let key = (scope.to_owned(), from, to);
        let asked = Instant::now();
        let recent = |flights: &HashMap<(String, i64, i64), Flight>| {
            let (at, r) = flights.get(&key)?.last.as_ref()?;
            // A read that ended after this caller asked answers it; so does a recent failure.
            (*at >= asked || (r.is_err() && at.elapsed() < BOOKS_BACKOFF)).then(|| r.clone())
        };
        let lock = {
            let mut flights = self.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(r) = recent(&flights) {
                return r;
            }
            if flights.len() > 10_000 {
                flights.retain(|_, f| Arc::strong_count(&f.lock) > 1);
            }
            flights.entry(key.clone()).or_default().lock.clone()
        };
        let _turn = lock.lock().await;
        if let Some(r) = recent(&self.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner)) {
            return r;
        }
        let r = self.read_books(scope, from, to).await;
        let mut flights = self.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        flights.entry(key).or_default().last = Some((Instant::now(), r.clone()));
        r
    }

    async fn read_books(&self, scope: &str, from: i64, to: i64) -> Result<(i64, i64), RelayError> {
        let req = SpentRequest { scope: scope.to_owned(), from_unix_ms: from, to_unix_ms: to };
        match tokio::time::timeout(LEDGER_TIMEOUT, self.billing.spent(req)).await {
            Ok(Ok(r)) => Ok((r.spent.map_or(0, |m| m.micros), r.prepaid.map_or(0, |m| m.micros))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RelayError::new(ErrorCode::Unavailable, "billing did not answer in time")),
        }
    }

    /// After a budget refusal: forgets the balances of this admission's prepaid scopes read longer than
    /// [`REFRESH`] ago. `true` = one was forgotten, so admitting again may see a top-up.
    pub fn refresh_prepaid(&self, a: &relay_core::contracts::Admission) -> bool {
        let mut cache = self.prepaid.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut forgot = false;
        for (s, _) in crate::active(a).into_iter().filter(|(_, r)| r.prepaid) {
            let name = crate::scope_name(s);
            if cache.get(&name).is_some_and(|(at, _)| at.elapsed() > REFRESH) {
                cache.remove(&name);
                forgot = true;
            }
        }
        forgot
    }

    /// A prepaid scope's limit: everything topped up or credited to it.
    async fn prepaid_limit(&self, scope: &str, at_ms: i64) -> Result<i64, RelayError> {
        let fresh = {
            let cache = self.prepaid.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // An empty balance is read again soon: a top-up must apply quickly.
            cache
                .get(scope)
                .filter(|(at, v)| at.elapsed() <= if *v > 0 { RECHECK } else { REFRESH })
                .map(|(_, v)| *v)
        };
        if let Some(v) = fresh {
            return Ok(v);
        }
        metrics::counter!("relay_limits_prepaid_reads_total").increment(1);
        let (_, prepaid) = self.books(scope, BudgetPeriod::Prepaid, at_ms).await?;
        let mut cache = self.prepaid.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(scope.to_owned(), (Instant::now(), prepaid));
        Ok(prepaid)
    }
}

/// The UTC window `[from, to)` of the budget period `at_ms` falls in.
pub fn period_bounds(period: BudgetPeriod, at_ms: i64) -> (i64, i64) {
    use chrono::{Datelike, NaiveDate};
    let t = chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_default().date_naive();
    let ms = |d: Option<NaiveDate>| {
        d.and_then(|d| d.and_hms_opt(0, 0, 0)).map_or(0, |d| d.and_utc().timestamp_millis())
    };
    match period {
        BudgetPeriod::Daily => (ms(Some(t)), ms(t.succ_opt())),
        BudgetPeriod::Monthly => {
            let first = NaiveDate::from_ymd_opt(t.year(), t.month(), 1);
            let next = if t.month() == 12 {
                NaiveDate::from_ymd_opt(t.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(t.year(), t.month() + 1, 1)
            };
            (ms(first), ms(next))
        }
        BudgetPeriod::Total | BudgetPeriod::Prepaid | BudgetPeriod::Unspecified => (0, i64::MAX),
    }
}

/// Sets the limit of every prepaid scope from the books; a scope with nothing topped up is refused here.
/// Without the books (no billing configured, or unreachable) a prepaid scope cannot be admitted.
pub(crate) async fn apply_prepaid(
    seeder: Option<&Seeder>,
    a: &relay_core::contracts::Admission,
    scopes: &mut [(&relay_core::pb::auth::v1::Scope, crate::Rules)],
) -> Result<(), relay_core::contracts::Denial> {
    for (s, r) in scopes.iter_mut().filter(|(_, r)| r.prepaid) {
        let name = crate::scope_name(s);
        let Some(seeder) = seeder else {
            tracing::error!(scope = %name, "prepaid budget without billing configured (remote.billing)");
            return Err(unavailable());
        };
        match seeder.prepaid_limit(&name, a.at_ms).await {
            Ok(limit) if limit > 0 => r.budget = limit,
            Ok(_) => {
                return Err(crate::denial(s, crate::Refusal::Budget, a.at_ms, Vec::new()));
            }
            Err(e) => {
                tracing::warn!(scope = %name, error = %e, "prepaid balance unreadable");
                return Err(unavailable());
            }
        }
    }
    Ok(())
}

/// After an admission: was it a budget refusal that a fresh read of a prepaid balance could lift (a
/// top-up since the balance was read)? Then the balance was forgotten and admitting once more is worth it.
pub(crate) fn worth_retrying(
    seeder: Option<&Seeder>,
    a: &relay_core::contracts::Admission,
    result: &Result<relay_core::contracts::RateHeaders, relay_core::contracts::Denial>,
) -> bool {
    matches!(result, Err(d) if d.error.code == ErrorCode::InsufficientQuota)
        && seeder.is_some_and(|s| s.refresh_prepaid(a))
}

/// The refusal when the books must be read and cannot be (`fail_closed`).
pub fn unavailable() -> relay_core::contracts::Denial {
    relay_core::contracts::Denial {
        error: RelayError::new(
            ErrorCode::Unavailable,
            "Budget accounting is unavailable; try again shortly.",
        ),
        headers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_core::pb::billing::v1 as pb;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Billing whose books take 50 ms to read, and fail while `down`.
    struct SlowBooks {
        reads: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Billing for SlowBooks {
        async fn get_usage(
            &self,
            _: pb::GetUsageRequest,
        ) -> relay_core::contracts::Result<relay_core::pb::events::v1::UsageEvent> {
            unreachable!()
        }
        async fn usage_summary(
            &self,
            _: pb::UsageSummaryRequest,
        ) -> relay_core::contracts::Result<pb::UsageSummaryResponse> {
            unreachable!()
        }
        async fn spent(&self, _: pb::SpentRequest) -> relay_core::contracts::Result<pb::SpentResponse> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.down.load(Ordering::SeqCst) {
                return Err(RelayError::new(ErrorCode::Unavailable, "down"));
            }
            let micros = |m| Some(relay_core::pb::common::v1::Money { micros: m, currency: "USD".into() });
            Ok(pb::SpentResponse { spent: micros(700), prepaid: micros(0) })
        }
    }

    #[tokio::test]
    async fn concurrent_reads_of_one_scope_share_a_query_and_failures_back_off() {
        let books = Arc::new(SlowBooks { reads: AtomicUsize::new(0), down: Default::default() });
        let seeder = Arc::new(Seeder::new(books.clone(), None));
        let at = 1_795_374_211_000;
        let all: Vec<_> = (0..50)
            .map(|_| {
                let s = seeder.clone();
                tokio::spawn(async move { s.spent("key:k", BudgetPeriod::Monthly, at).await })
            })
            .collect();
        for t in all {
            assert_eq!(t.await.unwrap().unwrap(), 700);
        }
        assert_eq!(books.reads.load(Ordering::SeqCst), 1, "one query for 50 waiting admissions");
        // Another scope, or a later read of the same one, asks again.
        seeder.spent("key:other", BudgetPeriod::Monthly, at).await.unwrap();
        seeder.spent("key:k", BudgetPeriod::Monthly, at).await.unwrap();
        assert_eq!(books.reads.load(Ordering::SeqCst), 3);

        books.down.store(true, Ordering::SeqCst);
        assert!(seeder.spent("key:k", BudgetPeriod::Monthly, at).await.is_err());
        for _ in 0..20 {
            assert!(seeder.spent("key:k", BudgetPeriod::Monthly, at).await.is_err(), "the failure stands");
        }
        assert_eq!(books.reads.load(Ordering::SeqCst), 4, "not asked again within the backoff");
    }

    #[test]
    fn periods_are_utc_calendar_windows() {
        let at = 1_795_374_211_000; // 2026-11-22T...Z
        let (d0, d1) = period_bounds(BudgetPeriod::Daily, at);
        assert_eq!((d1 - d0, d0 <= at && at < d1), (86_400_000, true));
        let (m0, m1) = period_bounds(BudgetPeriod::Monthly, at);
        assert_eq!((m1 - m0) / 86_400_000, 30, "November");
        assert!(m0 <= at && at < m1);
        let dec = 1_796_083_200_000 + 5; // 2026-12-01
        let (_, end) = period_bounds(BudgetPeriod::Monthly, dec);
        assert_eq!((end - 1_796_083_200_000) / 86_400_000, 31, "December rolls into January");
        assert_eq!(period_bounds(BudgetPeriod::Total, at), (0, i64::MAX));
    }
}
