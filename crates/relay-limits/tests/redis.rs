//! The Redis limiter against a real Redis (REDIS_URL): two limiter instances stand for two replicas and
//! must share every limit exactly, under concurrency.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use relay_core::ErrorCode;
use relay_core::contracts::{Admission, Limiter};
use relay_core::pb::auth::v1::{Budget, BudgetPeriod, Limits, Scope, ScopeKind};
use relay_core::pb::common::v1::Money;
use relay_limits::{OnRedisError, RedisLimiter};

fn scope(id: &str, rpm: u32, tpm: u64, conc: u32, budget: i64) -> Scope {
    Scope {
        kind: ScopeKind::Key as i32,
        id: id.into(),
        limits: Some(Limits { requests_per_minute: rpm, tokens_per_minute: tpm, max_concurrent: conc }),
        budget: Some(Budget {
            limit: Some(Money { micros: budget, currency: "USD".into() }),
            period: BudgetPeriod::Daily as i32,
        }),
    }
}

fn adm(i: usize, s: &Scope, tokens: u64, cost: i64, at_ms: i64) -> Admission {
    Admission { request_id: format!("r{i}"), at_ms, scopes: vec![s.clone()], tokens, cost_micros: cost }
}

async fn replicas() -> Option<(Arc<RedisLimiter>, Arc<RedisLimiter>)> {
    let url = relay_test_support::env_service("REDIS_URL")?;
    let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
    let a = RedisLimiter::connect(&url, &prefix, OnRedisError::FailClosed).await.unwrap();
    let b = RedisLimiter::connect(&url, &prefix, OnRedisError::FailClosed).await.unwrap();
    Some((Arc::new(a), Arc::new(b)))
}

/// Admits `n` concurrent requests spread over both replicas; returns how many got in.
async fn race(
    a: &Arc<RedisLimiter>,
    b: &Arc<RedisLimiter>,
    s: &Scope,
    n: usize,
    tokens: u64,
    cost: i64,
    at_ms: i64,
) -> usize {
    admitted(a, b, s, n, (tokens, cost), at_ms).await.len()
}

/// Which of `n` concurrent requests got in.
async fn admitted(
    a: &Arc<RedisLimiter>,
    b: &Arc<RedisLimiter>,
    s: &Scope,
    n: usize,
    (tokens, cost): (u64, i64),
    at_ms: i64,
) -> Vec<usize> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let l = if i % 2 == 0 { a.clone() } else { b.clone() };
            let s = s.clone();
            tokio::spawn(async move { l.admit(&adm(i, &s, tokens, cost, at_ms)).await.is_ok() })
        })
        .collect();
    let mut ins = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if t.await.unwrap() {
            ins.push(i);
        }
    }
    ins
}

const NOW: i64 = 1_900_000_000_000;

#[tokio::test]
async fn requests_per_minute_are_shared_by_replicas() {
    let Some((a, b)) = replicas().await else { return };
    let s = scope("rpm", 25, 0, 0, 0);
    assert_eq!(race(&a, &b, &s, 100, 1, 0, NOW).await, 25);
    // Next minute window: a fresh allowance.
    assert_eq!(race(&a, &b, &s, 10, 1, 0, NOW + 60_000).await, 10);
}

#[tokio::test]
async fn tokens_per_minute_hold_reservations_and_settle_to_real_use() {
    let Some((a, b)) = replicas().await else { return };
    let s = scope("tpm", 0, 1000, 0, 0);
    let ins = admitted(&a, &b, &s, 50, (100, 0), NOW).await;
    assert_eq!(ins.len(), 10, "10 × 100 reserved tokens fill 1000");
    // Settle all ten at 30 real tokens: 700 tokens come back. Settling one never admitted gives nothing.
    for i in ins {
        a.settle(&adm(i, &s, 100, 0, NOW), 30, 0).await;
    }
    a.settle(&adm(999, &s, 100, 0, NOW), 0, 0).await;
    assert_eq!(race(&a, &b, &s, 50, 100, 0, NOW).await, 7);
}

#[tokio::test]
async fn concurrency_slots_are_held_until_settled() {
    let Some((a, b)) = replicas().await else { return };
    let s = scope("conc", 0, 0, 4, 0);
    let held = admitted(&a, &b, &s, 20, (0, 0), NOW).await;
    assert_eq!(held.len(), 4);
    // Release one that really holds a slot (which four got in is up to the race).
    b.settle(&adm(held[0], &s, 0, 0, NOW), 0, 0).await;
    let e = a.admit(&adm(99, &s, 0, 0, NOW)).await;
    assert!(e.is_ok(), "a released slot is free again");
    assert_eq!(a.admit(&adm(100, &s, 0, 0, NOW)).await.unwrap_err().error.code, ErrorCode::RateLimited);
}

#[tokio::test]
async fn budgets_never_overspend_across_replicas() {
    let Some((a, b)) = replicas().await else { return };
    let s = scope("budget", 0, 0, 0, 10_000);
    // Reservations of 1000 each: at most 10 admitted at once.
    let ins = admitted(&a, &b, &s, 40, (0, 1000), NOW).await;
    assert_eq!(ins.len(), 10);
    let refusal = a.admit(&adm(500, &s, 0, 1000, NOW)).await.unwrap_err();
    assert_eq!(refusal.error.code, ErrorCode::InsufficientQuota);
    // Real cost 400 each: 6000 released, 4000 spent.
    for i in ins {
        a.settle(&adm(i, &s, 0, 1000, NOW), 0, 400).await;
    }
    assert_eq!(race(&a, &b, &s, 40, 0, 1000, NOW).await, 6);
}

/// A private Redis this test may kill (the shared one must stay up for the other tests).
struct OwnRedis {
    child: std::process::Child,
    url: String,
}

impl OwnRedis {
    fn start() -> Option<Self> {
        let port = relay_test_support::free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Self { child, url: format!("redis://127.0.0.1:{port}/") });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_redis_outage_follows_the_configured_policy() {
    // Runs where redis-server is installed (scripts/test.sh installs it); REDIS_URL says the suite has one.
    if relay_test_support::env_service("REDIS_URL").is_none() {
        return;
    }
    let mut own = OwnRedis::start().expect("redis-server on PATH");
    let open = RedisLimiter::connect(&own.url, "outage", OnRedisError::FailOpen).await.unwrap();
    let closed = RedisLimiter::connect(&own.url, "outage", OnRedisError::FailClosed).await.unwrap();
    let s = scope("outage", 4, 0, 0, 0);
    let money = scope("outage-budget", 0, 0, 0, 1000);
    // Two replicas are alive (each tells Redis every few seconds; here at once).
    for l in [&open, &closed, &open] {
        l.heartbeat().await;
    }
    assert!(open.admit(&adm(0, &s, 1, 0, NOW)).await.is_ok());
    let _ = own.child.kill();
    let _ = own.child.wait();
    let outage = std::time::Instant::now();
    // Fail-open: this replica keeps enforcing its half of each limit on its own (4 rpm → 2), so the
    // replicas together never grant more than the limit.
    assert!(open.admit(&adm(1, &s, 1, 0, NOW)).await.is_ok());
    assert!(open.admit(&adm(2, &s, 1, 0, NOW)).await.is_ok());
    assert_eq!(open.admit(&adm(3, &s, 1, 0, NOW)).await.unwrap_err().error.code, ErrorCode::RateLimited);
    // And its half of what is left of a budget.
    assert!(open.admit(&adm(10, &money, 1, 400, NOW)).await.is_ok());
    let e = open.admit(&adm(11, &money, 1, 400, NOW)).await.unwrap_err();
    assert_eq!(e.error.code, ErrorCode::InsufficientQuota, "800 > this replica's 500");
    // Settled where it was admitted (memory), although Redis is the store it would normally use.
    open.settle(&adm(10, &money, 1, 400, NOW), 1, 100).await;
    assert!(open.admit(&adm(12, &money, 1, 400, NOW)).await.is_ok(), "100 spent + 400 ≤ 500");
    // Fail-closed: refuse with 503.
    let e = closed.admit(&adm(4, &s, 1, 0, NOW)).await.unwrap_err();
    assert_eq!(e.error.code, ErrorCode::Unavailable);
    assert_eq!(e.error.http_status(), 503);
    // Four calls, each bounded by the 250 ms Redis timeout: an outage never stalls requests for long.
    assert!(outage.elapsed() < std::time::Duration::from_secs(3), "{:?}", outage.elapsed());
}

#[tokio::test]
async fn budget_counters_are_rebuilt_from_the_ledger_after_a_start_and_after_redis_loses_them() {
    let Some(url) = relay_test_support::env_service("REDIS_URL") else {
        return;
    };
    let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
    let books = Arc::new(relay_test_support::Books::new(950, &[]));
    let l = RedisLimiter::connect(&url, &prefix, OnRedisError::FailClosed)
        .await
        .unwrap()
        .with_ledger_every(books, std::time::Duration::ZERO);
    let s = scope("ledgered", 0, 0, 0, 1000);
    let now = relay_core::ids::now_ms();
    // A fresh process (empty Redis): the books say 950 of 1000 are spent, so 100 more is refused.
    let e = l.admit(&adm(1, &s, 1, 100, now)).await.unwrap_err();
    assert_eq!(e.error.code, ErrorCode::InsufficientQuota);
    l.admit(&adm(2, &s, 1, 40, now)).await.unwrap();
    l.settle(&adm(2, &s, 1, 40, now), 1, 40).await;
    // Redis loses everything: the counter comes back from the books, not from zero.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
    let e = l.admit(&adm(3, &s, 1, 100, now)).await.unwrap_err();
    assert_eq!(e.error.code, ErrorCode::InsufficientQuota, "rebuilt, not reset to zero");
}

#[tokio::test]
async fn a_reservation_never_settled_expires_on_its_own() {
    let Some((a, b)) = replicas().await else { return };
    let mut s = scope("leaked", 0, 0, 0, 1000);
    s.budget.as_mut().unwrap().period = BudgetPeriod::Total as i32;
    let now = relay_core::ids::now_ms();
    let crashed_at = now - relay_limits::LEASE_TTL_MS - 1_000;
    // A replica reserved 600 and crashed before settling: its lease is older than any live request.
    a.admit(&adm(1, &s, 1, 600, crashed_at)).await.unwrap();
    // A fresh reservation would not fit beside it; once its lease is past, it no longer counts.
    b.admit(&adm(2, &s, 1, 600, now)).await.unwrap();
    let e = b.admit(&adm(3, &s, 1, 600, now)).await.unwrap_err();
    assert_eq!(e.error.code, ErrorCode::InsufficientQuota, "the live reservation still counts");
}

#[tokio::test]
async fn settling_twice_gives_nothing_back_twice() {
    let Some((a, b)) = replicas().await else { return };
    let s = scope("twice", 0, 100, 1, 1000);
    let first = adm(1, &s, 80, 500, NOW);
    a.admit(&first).await.unwrap();
    a.settle(&first, 20, 100).await;
    b.settle(&first, 20, 100).await; // a duplicate, from another replica
    b.admit(&adm(2, &s, 80, 0, NOW)).await.unwrap();
    let e = a.admit(&adm(3, &s, 1, 0, NOW)).await.unwrap_err();
    assert_eq!(e.error.code, ErrorCode::RateLimited, "20 + 80 tokens used: the minute is full");
}

#[tokio::test]
async fn the_answer_cache_is_shared_by_replicas_and_expires() {
    use relay_core::contracts::AnswerCache as _;
    let Some((a, b)) = replicas().await else { return };
    let (a, b) = (a.answer_cache(), b.answer_cache());
    assert!(a.get("org-1:k").await.is_none());
    a.put("org-1:k", bytes::Bytes::from_static(b"{\"x\":1}\nanswer"), std::time::Duration::from_secs(1))
        .await;
    assert_eq!(
        b.get("org-1:k").await.as_deref(),
        Some(&b"{\"x\":1}\nanswer"[..]),
        "another replica reads it"
    );
    assert!(b.get("org-2:k").await.is_none());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(a.get("org-1:k").await.is_none(), "expired");
}
