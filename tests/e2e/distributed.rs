//! Distributed mode: the five services as five processes talking gRPC, usage events on NATS JetStream,
//! records in Postgres, traces exported over OTLP. Needs NATS_URL and DATABASE_URL.

use std::collections::BTreeSet;
use std::time::Duration;

use relay_db::Db;
use sqlx::Row;

use crate::collector::Collector;
use crate::harness::{RelayProc, auth_section, temp_dir};
use crate::{client, scenario, upstream_sections};

fn common(nats: &str, db_url: &str, collector: &Collector, tag: &str) -> String {
    format!(
        "[bus]\nnats_url = \"{nats}\"\n[bus.jetstream]\nstream = \"RELAY_USAGE_{tag}\"\nsubject = \"relay.usage.v1.{tag}\"\n\
         consumer = \"billing-{tag}\"\nretry_delay_ms = 200\n\
         [database]\nurl = \"{db_url}\"\n[telemetry]\notlp_endpoint = \"{}\"\nexport_delay_ms = 100\n",
        collector.endpoint
    )
}

fn backend(service: &str, shared: &str, extra: &str) -> String {
    format!(
        "[server]\nservices = [\"{service}\"]\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{shared}{extra}"
    )
}

#[tokio::test]
async fn five_processes_over_grpc_nats_and_postgres() {
    let (Some(nats), Some(pg)) =
        (relay_test_support::env_service("NATS_URL"), relay_test_support::env_service("DATABASE_URL"))
    else {
        return;
    };
    let mock = relay_test_support::MockOpenAi::start().await;
    let collector = Collector::start().await;
    let db_url = relay_test_support::fresh_postgres_url(&pg).await;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let shared = common(&nats, &db_url, &collector, &tag);
    let upstreams = upstream_sections(&mock);
    let dir = temp_dir("distributed");

    let billing = RelayProc::start(&dir, "billing", &backend("billing", &shared, "")).await;
    let auth = RelayProc::start(&dir, "auth", &backend("auth", &shared, &auth_section())).await;
    let routing = RelayProc::start(&dir, "routing", &backend("routing", &shared, &upstreams)).await;
    let adapter = RelayProc::start(&dir, "adapter", &backend("adapter", &shared, &upstreams)).await;
    let edge_cfg = format!(
        "[server]\nservices = [\"edge\"]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [remote]\nauth = \"{}\"\nrouting = \"{}\"\nadapter = \"{}\"\n{shared}",
        auth.grpc(),
        routing.grpc(),
        adapter.grpc()
    );
    let edge = RelayProc::start(&dir, "edge", &edge_cfg).await;
    let billing_client = client::billing_client(&billing.grpc());

    let mut sent = scenario::run(&edge.http(), &billing_client, &mock).await;

    // One trace per request across every service, the billing consumer included.
    let first = &sent[0];
    let want: BTreeSet<String> =
        ["relay-edge", "relay-auth", "relay-routing", "relay-adapter", "relay-billing"]
            .map(String::from)
            .into();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = collector.trace_of(first).map(|t| collector.services_in(&t)).unwrap_or_default();
        if got == want {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "trace of {first} spans {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Billing crashes; requests keep being served; after a restart, nothing is lost.
    let billing_cfg = billing.kill().await;
    let c = client::http();
    for i in 0..5 {
        let a = client::chat(
            &c,
            &edge.http(),
            client::user(scenario::MODEL, &format!("while billing is down {i}")),
        )
        .await;
        assert_eq!(a.status, 200);
        sent.push(a.request_id);
    }
    let billing = RelayProc::restart(billing_cfg, "billing-2").await;
    let billing_client = client::billing_client(&billing.grpc());
    for id in &sent[sent.len() - 5..] {
        client::recorded_usage(&billing_client, id).await;
    }

    // Exactly one row per request id in Postgres, and nothing else.
    let db = Db::connect(&db_url).await.unwrap();
    let Db::Postgres(pool) = &db else { unreachable!() };
    let rows = sqlx::query("SELECT request_id, COUNT(*) FROM usage_records GROUP BY request_id")
        .fetch_all(pool)
        .await
        .unwrap();
    let counts: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(counts.iter().all(|(_, n)| *n == 1), "{counts:?}");
    let ids: BTreeSet<String> = counts.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, sent.iter().cloned().collect::<BTreeSet<_>>());

    // The books reconcile: every record has exactly one balanced posting set, nothing dead-lettered.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["billing", "reconcile", "--config"])
        .arg(dir.join("billing.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("books balance"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = relay_billing::reconcile::check(&db).await.unwrap();
    assert_eq!(report.records as usize, sent.len());
    assert_eq!(report.transactions, report.records);

    edge.stop().await;
    for p in [billing, auth, routing, adapter] {
        p.stop().await;
    }
}
