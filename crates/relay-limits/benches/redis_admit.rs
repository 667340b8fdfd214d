//! One admission through Redis (the Lua script checking and taking RPM, TPM, concurrency and budget for
//! key, team and org) and its settlement, against REDIS_URL. Prints p50 / p99 latency and throughput.
//! `REDIS_URL=redis://127.0.0.1:6379/ cargo bench -p relay-limits --bench redis_admit`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use relay_core::contracts::{Admission, Limiter};
use relay_core::pb::auth::v1::{Budget, BudgetPeriod, Limits, Scope, ScopeKind};
use relay_core::pb::common::v1::Money;
use relay_limits::{OnRedisError, RedisLimiter};

fn scope(kind: ScopeKind, id: &str) -> Scope {
    Scope {
        kind: kind as i32,
        id: id.into(),
        limits: Some(Limits {
            requests_per_minute: u32::MAX,
            tokens_per_minute: u64::MAX / 4,
            max_concurrent: 1_000_000,
        }),
        budget: Some(Budget {
            limit: Some(Money { micros: i64::MAX / 4, currency: "USD".into() }),
            period: BudgetPeriod::Monthly as i32,
        }),
    }
}

fn main() {
    let Ok(url) = std::env::var("REDIS_URL") else {
        println!("redis_admit: set REDIS_URL to run");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let prefix = format!("bench{}", uuid::Uuid::now_v7().simple());
        let l = Arc::new(RedisLimiter::connect(&url, &prefix, OnRedisError::FailClosed).await.unwrap());
        let scopes =
            vec![scope(ScopeKind::Key, "k"), scope(ScopeKind::Team, "t"), scope(ScopeKind::Org, "o")];
        let adm = |i: u64| Admission {
            request_id: format!("r{i}"),
            at_ms: 1_900_000_000_000,
            scopes: scopes.clone(),
            tokens: 500,
            cost_micros: 1000,
        };
        for i in 0..1000 {
            l.admit(&adm(i)).await.unwrap();
        }
        // Sequential latency of one admission (what one request waits for).
        let mut lat = Vec::new();
        for i in 0..5000 {
            let a = adm(10_000 + i);
            let t = Instant::now();
            l.admit(&a).await.unwrap();
            lat.push(t.elapsed().as_micros());
            l.settle(&a, 100, 200).await;
        }
        lat.sort_unstable();
        println!(
            "redis admission (3 scopes, all limits): p50 {} µs, p99 {} µs",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100]
        );
        // Throughput with 64 requests in flight.
        let n = 20_000u64;
        let t = Instant::now();
        let tasks: Vec<_> = (0..64u64)
            .map(|w| {
                let (l, scopes) = (l.clone(), scopes.clone());
                tokio::spawn(async move {
                    for i in (w..n).step_by(64) {
                        let a = Admission {
                            request_id: format!("c{i}"),
                            at_ms: 1_900_000_000_000,
                            scopes: scopes.clone(),
                            tokens: 500,
                            cost_micros: 1000,
                        };
                        l.admit(&a).await.unwrap();
                        l.settle(&a, 100, 200).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        println!(
            "redis admit + settle throughput: {:.0} requests/s (64 in flight)",
            n as f64 / t.elapsed().as_secs_f64()
        );
    });
}
