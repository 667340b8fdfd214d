//! Billing's consumer throughput: usage events recorded with their posting sets, in batches (one
//! transaction each), as the JetStream consumer hands them over. SQLite always; Postgres with DATABASE_URL.
//! `DATABASE_URL=postgres://... cargo bench -p relay-billing --bench consumer`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::Instant;

use relay_billing::{BillingConfig, BillingService, UsageStore};
use relay_core::pb::common::v1::TokenUsage;
use relay_core::pb::events::v1::UsageEvent;
use relay_db::Db;
use relay_events::{Handled, UsageHandler};

fn event(i: u64) -> UsageEvent {
    UsageEvent {
        schema_version: 1,
        request_id: format!("0193a0e4-{i:012}-7000-8000-000000000000"),
        key_id: format!("key-{}", i % 50),
        team_id: format!("team-{}", i % 5),
        org_id: "org".into(),
        model: "gpt-4o".into(),
        deployment_id: "gpt-4o@openai".into(),
        provider: "openai".into(),
        upstream_model: "gpt-4o".into(),
        usage: Some(TokenUsage { input_tokens: 1200, output_tokens: 300, ..Default::default() }),
        outcome: 1,
        started_at_unix_ms: 1_764_000_000_000 + i as i64,
        ..Default::default()
    }
}

async fn run(name: &str, db: Db, n: u64, batch: usize) {
    let recorder =
        BillingService::new(UsageStore::new(db.clone()), BillingConfig::default()).await.unwrap().recorder();
    let events: Vec<UsageEvent> = (0..n).map(event).collect();
    let t = Instant::now();
    for chunk in events.chunks(batch) {
        let v = recorder.handle_batch(chunk, &vec![1; chunk.len()]).await;
        assert!(v.iter().all(|h| *h == Handled::Stored));
    }
    let wall = t.elapsed();
    let report = relay_billing::reconcile::check(&db).await.unwrap();
    assert!(report.ok() && report.records == n as i64, "{report}");
    println!(
        "consumer {name:<8} batch {batch:>3}: {:>7.0} events/s ({n} events, ledger reconciled)",
        n as f64 / wall.as_secs_f64()
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        for batch in [1, 16, 64, 256, 1024] {
            let path = std::env::temp_dir().join(format!("relay-bench-{}.db", uuid::Uuid::now_v7().simple()));
            let db = Db::connect(&format!("sqlite://{}", path.display())).await.unwrap();
            db.migrate().await.unwrap();
            run("sqlite", db, 20_000, batch).await;
            let _ = std::fs::remove_file(path);
        }
        if let Ok(url) = std::env::var("DATABASE_URL") {
            for batch in [1, 256] {
                run("postgres", relay_test_support::fresh_postgres(&url).await, 20_000, batch).await;
            }
        } else {
            println!("consumer postgres: set DATABASE_URL to measure");
        }
    });
}
