//! Property: replaying any sequence of usage events, any number of times, in any order (batched any way),
//! yields the same ledger, and the books always balance. Random cases from a fixed seed, on SQLite and
//! (with DATABASE_URL) Postgres. Also: hostile text (NUL bytes, oversized fields) is stored, not refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use relay_billing::{BillingConfig, BillingService, UsageStore};
use relay_core::pb::common::v1::TokenUsage;
use relay_core::pb::events::v1::{Outcome, UsageEvent};
use relay_db::{Col, Db, Val};
use relay_events::{Handled, UsageHandler};

use relay_test_support::Rng;

const MODELS: [&str; 4] = ["gpt-4o", "claude-sonnet-4-5-20250929", "gemini-2.5-flash", "unpriced-model"];

fn event(rng: &mut Rng, i: u64) -> UsageEvent {
    let input = rng.below(50_000);
    UsageEvent {
        schema_version: 1,
        request_id: format!("0190-req-{i}"),
        key_id: format!("key-{}", rng.below(3)),
        team_id: format!("team-{}", rng.below(2)),
        org_id: "org".into(),
        provider: ["openai", "anthropic", "gemini"][rng.below(3) as usize].into(),
        upstream_model: MODELS[rng.below(4) as usize].into(),
        model: "public".into(),
        usage: Some(TokenUsage {
            input_tokens: input,
            output_tokens: rng.below(8_000),
            cached_input_tokens: rng.below(input + 1),
            ..Default::default()
        }),
        outcome: [Outcome::Success, Outcome::Error, Outcome::Cancelled][rng.below(3) as usize] as i32,
        started_at_unix_ms: 1_764_000_000_000 + i64::try_from(i).unwrap(),
        ..Default::default()
    }
}

/// The ledger as a comparable value: every entry and every record's money.
async fn ledger_of(db: &Db) -> (Vec<Vec<Val>>, Vec<Vec<Val>>) {
    let entries = db
        .fetch(
            "SELECT txn_id, CAST(seq AS BIGINT), account_id, amount_micros FROM ledger_entries ORDER BY txn_id, seq",
            &[],
            &[Col::Text, Col::I64, Col::Text, Col::I64],
        )
        .await
        .unwrap();
    let records = db
        .fetch(
            "SELECT request_id, input_tokens, output_tokens, sell_micros, cost_micros, price_id FROM usage_records ORDER BY request_id",
            &[],
            &[Col::Text, Col::I64, Col::I64, Col::I64, Col::I64, Col::Text],
        )
        .await
        .unwrap();
    (entries, records)
}

async fn replay(db: Db, seed: u64) {
    let cfg = BillingConfig {
        default_markup_bps: 1500,
        markups: vec![relay_billing::ledger::Markup { scope: "team:team-1".into(), bps: 0 }],
        ..Default::default()
    };
    let rec = BillingService::new(UsageStore::new(db.clone()), cfg).await.unwrap().recorder();
    let mut rng = Rng::new(seed);
    let events: Vec<UsageEvent> = (0..60).map(|i| event(&mut rng, i)).collect();
    // The reference: each event once, in order.
    for e in &events {
        assert_eq!(rec.handle_batch(std::slice::from_ref(e), &[1]).await, vec![Handled::Stored]);
    }
    let reference = ledger_of(&db).await;
    let report = relay_billing::reconcile::check(&db).await.unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.records, 60);
    assert!(report.sell_micros_ledger > report.cost_micros_ledger, "the markup is booked");
    // Then 12 replays: the sequence duplicated, shuffled, cut into random batches.
    for round in 0..12 {
        let mut again: Vec<UsageEvent> =
            events.iter().chain(events.iter().take(rng.below(60) as usize)).cloned().collect();
        for i in (1..again.len()).rev() {
            again.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut at = 0;
        while at < again.len() {
            let n = (1 + rng.below(40) as usize).min(again.len() - at);
            let verdicts = rec.handle_batch(&again[at..at + n], &vec![1; n]).await;
            assert!(verdicts.iter().all(|v| *v == Handled::Stored), "round {round}: {verdicts:?}");
            at += n;
        }
        assert_eq!(ledger_of(&db).await, reference, "round {round}: the ledger changed on replay");
    }
    let report = relay_billing::reconcile::check(&db).await.unwrap();
    assert!(report.ok() && report.transactions == 60, "{report}");

    // Hostile text is stored (NUL replaced, oversized cut), never refused, never stalling the batch.
    let mut bad = event(&mut rng, 1000);
    bad.model = "mo\0del".into();
    bad.end_user = "x".repeat(5000);
    bad.upstream_model = "\0".repeat(3);
    let good = event(&mut rng, 1001);
    let verdicts = rec.handle_batch(&[bad.clone(), good.clone()], &[1, 1]).await;
    assert_eq!(verdicts, vec![Handled::Stored, Handled::Stored]);
    let rows = db
        .fetch(
            "SELECT model, end_user FROM usage_records WHERE request_id = $1",
            &[bad.request_id.clone().into()],
            &[Col::Text, Col::Text],
        )
        .await
        .unwrap();
    assert_eq!(rows[0][0].text(), "mo\u{FFFD}del");
    assert_eq!(rows[0][1].text().len(), 1024);
    assert!(relay_billing::reconcile::check(&db).await.unwrap().ok());
}

#[tokio::test]
async fn sqlite_ledger_is_the_same_however_events_are_replayed() {
    for seed in [1, 7, 42] {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        replay(db, seed).await;
    }
}

#[tokio::test]
async fn postgres_ledger_is_the_same_however_events_are_replayed() {
    let Some(url) = relay_test_support::env_service("DATABASE_URL") else {
        return;
    };
    for seed in [3, 11] {
        replay(relay_test_support::fresh_postgres(&url).await, seed).await;
    }
}
