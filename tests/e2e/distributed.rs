//! Distributed mode: the five services as five processes talking gRPC, usage events on NATS JetStream,
//! records in Postgres, traces exported over OTLP. Needs NATS_URL and DATABASE_URL.

use std::collections::BTreeSet;
use std::time::Duration;

use relay_db::Db;
use sqlx::Row;

use crate::collector::Collector;
use crate::harness::{RelayProc, auth_section, temp_dir};
use crate::{client, scenario, upstream_sections};

const ADMIN_TOKEN: &str = "e2e-billing-admin-token-0123";

/// Any pod that can reach a service port is not thereby trusted: without the service token (or with a
/// wrong one) the adapter will not call a provider and billing will not answer.
async fn services_refuse_callers_without_the_token(adapter: &RelayProc, billing: &RelayProc) {
    use relay_core::contracts::{Adapter as _, Billing as _};
    use relay_proto::clients::{GrpcAdapter, GrpcBilling, channel};
    let wrong = relay_core::Secret::new("not-the-service-token");
    for token in [None, Some(&wrong)] {
        let rogue = GrpcAdapter::new(channel(&adapter.grpc(), token).unwrap());
        let req = relay_core::pb::adapter::v1::ChatRequest {
            request_id: "rogue".into(),
            protocol: relay_core::pb::common::v1::Protocol::OpenaiChat as i32,
            body: bytes::Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
            deployment: Some(relay_core::pb::routing::v1::Deployment {
                id: "rogue".into(),
                provider: "mock".into(),
                upstream_model: "gpt-mock-upstream".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = rogue.chat(req).await.err().expect("the adapter served a caller without the token");
        assert_eq!(e.code, relay_core::ErrorCode::Unauthenticated, "{e:?}");
        let rogue = GrpcBilling::new(channel(&billing.grpc(), token).unwrap());
        let e =
            rogue.spent(Default::default()).await.expect_err("billing answered a caller without the token");
        assert_eq!(e.code, relay_core::ErrorCode::Unauthenticated, "{e:?}");
    }
}

/// Billing's admin API on the billing process: usage grouped, the CSV export, a price version added and
/// used by the next request, the reconcile report; nothing without the admin token.
async fn billing_admin(billing: &RelayProc, edge: &RelayProc, db: &Db, requests: usize) {
    let c = client::http();
    let admin = format!("http://{}", billing.bound["admin"].as_str().unwrap());
    let get = |path: &str| c.get(format!("{admin}{path}")).bearer_auth(ADMIN_TOKEN).send();
    assert_eq!(c.get(format!("{admin}/admin/v1/usage")).send().await.unwrap().status(), 401);
    let usage: serde_json::Value = get("/admin/v1/usage?group_by=key").await.unwrap().json().await.unwrap();
    let rows = usage["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{usage}");
    assert_eq!(
        (rows[0]["group"].as_str(), rows[0]["requests"].as_u64()),
        (Some("e2e"), Some(requests as u64))
    );
    assert_eq!(get("/admin/v1/usage?group_by=color").await.unwrap().status(), 400);
    let csv = get("/admin/v1/usage/export?from=2020-01-01&format=focus").await.unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("BillingPeriodStart,") && csv.lines().count() > 1, "{csv}");

    let price = serde_json::json!({"model": "gpt-mock-upstream", "provider": "mock", "input": 2_000_000, "output": 8_000_000});
    let add_price = |body: serde_json::Value| {
        c.post(format!("{admin}/admin/v1/prices")).bearer_auth(ADMIN_TOKEN).json(&body).send()
    };
    assert_eq!(add_price(price.clone()).await.unwrap().status(), 201);
    assert_eq!(add_price(price).await.unwrap().status(), 400, "a price version is immutable");
    let absurd = serde_json::json!({"model": "x", "input": -5, "output": 1});
    assert_eq!(add_price(absurd).await.unwrap().status(), 400);
    let a = client::chat(&c, &edge.http(), client::user(scenario::MODEL, "priced now")).await;
    let ev = client::recorded_usage(&client::billing_client(&billing.grpc()), &a.request_id).await;
    let u = ev.usage.unwrap();
    let want = (u.input_tokens * 2 + u.output_tokens * 8) as i64; // micros: tokens × price / 1M
    let rows = db
        .fetch(
            "SELECT price_id, sell_micros FROM usage_records WHERE request_id = $1",
            &[a.request_id.clone().into()],
            &[relay_db::Col::Text, relay_db::Col::I64],
        )
        .await
        .unwrap();
    assert_eq!((rows[0][0].text(), rows[0][1].i64()), ("mock/gpt-mock-upstream@0", want));
    let rec: serde_json::Value = get("/admin/v1/billing/reconcile").await.unwrap().json().await.unwrap();
    assert_eq!(rec["ok"], true, "{rec}");
    assert_eq!(rec["sell_micros"]["ledger"].as_i64(), Some(want));
}

pub(crate) fn common(nats: &str, db_url: &str, collector: &Collector, tag: &str) -> String {
    format!(
        "[bus]\nnats_url = \"{nats}\"\n[bus.jetstream]\nstream = \"RELAY_USAGE_{tag}\"\nsubject = \"relay.usage.v1.{tag}\"\n\
         consumer = \"billing-{tag}\"\nretry_delay_ms = 200\n\
         [database]\nurl = \"{db_url}\"\n[telemetry]\notlp_endpoint = \"{}\"\nexport_delay_ms = 100\n",
        collector.endpoint
    )
}

pub(crate) fn backend(service: &str, shared: &str, extra: &str) -> String {
    format!(
        "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"{service}\"]\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{shared}{extra}"
    )
}

/// One request through five processes (edge → auth, routing, adapter over gRPC → mock) takes a few
/// milliseconds. A hop that waits on Nagle's algorithm and a delayed ACK adds ~40 ms to nearly every one
/// of them, so even the fastest quarter of sequential requests (whole answers and streams) would be far
/// above this bound; a loaded machine's jitter only stretches the slow end.
async fn no_hop_stalls(base: &str) -> Vec<String> {
    let c = client::http();
    let mut ids = Vec::new();
    let (mut whole, mut streams) = (Vec::new(), Vec::new());
    for i in 0..15 {
        let t = std::time::Instant::now();
        let a = client::chat(&c, base, client::user(scenario::MODEL, &format!("timed {i}"))).await;
        whole.push(t.elapsed());
        assert_eq!(a.status, 200);
        ids.push(a.request_id);
        let t = std::time::Instant::now();
        let s =
            client::chat_stream(&c, base, client::user(scenario::MODEL, &format!("timed stream {i}"))).await;
        streams.push(t.elapsed());
        assert!(s.done, "{s:?}");
        ids.push(s.request_id);
    }
    for (what, mut v) in [("whole answers", whole), ("streams", streams)] {
        v.sort();
        let (quartile, median) = (v[v.len() / 4], v[v.len() / 2]);
        eprintln!("five processes, {what}: first quartile {quartile:?}, median {median:?}, all {v:?}");
        assert!(
            quartile < Duration::from_millis(25),
            "{what}: first quartile {quartile:?} (a hop stalls): {v:?}"
        );
    }
    ids
}

/// The five services as five processes on NATS JetStream and a fresh Postgres database, exporting traces
/// to `collector`; routing and the adapter get `upstreams`, billing `billing_extra`.
pub(crate) struct Stack {
    pub edge: RelayProc,
    pub auth: RelayProc,
    pub routing: RelayProc,
    pub adapter: RelayProc,
    pub billing: RelayProc,
    pub db_url: String,
    pub dir: std::path::PathBuf,
}

pub(crate) async fn five_processes(
    name: &str,
    (nats, pg): (&str, &str),
    collector: &Collector,
    upstreams: &str,
    billing_extra: &str,
) -> Stack {
    let db_url = relay_test_support::fresh_postgres_url(pg).await;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let shared = common(nats, &db_url, collector, &tag);
    let dir = temp_dir(name);
    let billing = RelayProc::start(&dir, "billing", &backend("billing", &shared, billing_extra)).await;
    let auth = RelayProc::start(&dir, "auth", &backend("auth", &shared, &auth_section())).await;
    let routing = RelayProc::start(&dir, "routing", &backend("routing", &shared, upstreams)).await;
    let adapter = RelayProc::start(&dir, "adapter", &backend("adapter", &shared, upstreams)).await;
    let edge_cfg = format!(
        "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"edge\"]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [remote]\nauth = \"{}\"\nrouting = \"{}\"\nadapter = \"{}\"\nbilling = \"{}\"\n{shared}",
        auth.grpc(),
        routing.grpc(),
        adapter.grpc(),
        billing.grpc()
    );
    let edge = RelayProc::start(&dir, "edge", &edge_cfg).await;
    Stack { edge, auth, routing, adapter, billing, db_url, dir }
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
    let billing_extra = format!("[auth]\nadmin_token = \"{ADMIN_TOKEN}\"\n");
    let Stack { edge, auth, routing, adapter, billing, db_url, dir } =
        five_processes("distributed", (&nats, &pg), &collector, &upstream_sections(&mock), &billing_extra)
            .await;
    let billing_client = client::billing_client(&billing.grpc());
    services_refuse_callers_without_the_token(&adapter, &billing).await;

    let mut sent = scenario::run(&edge.http(), &billing_client, &mock).await;
    sent.extend(no_hop_stalls(&edge.http()).await);

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

    // The adapter's model call carries the OpenTelemetry GenAI attributes, usage included.
    let trace = collector.trace_of(first).unwrap();
    let call = collector
        .spans()
        .into_iter()
        .find(|s| {
            s.trace_id == trace
                && s.service == "relay-adapter"
                && s.attrs.contains_key("gen_ai.operation.name")
        })
        .expect("no GenAI span from the adapter");
    for (k, v) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "openai"),
        ("gen_ai.request.model", "gpt-mock-upstream"),
    ] {
        assert_eq!(call.attrs.get(k).map(String::as_str), Some(v), "{k} on {:?}", call.attrs);
    }
    for k in [
        "gen_ai.response.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.response.finish_reasons",
    ] {
        assert!(call.attrs.get(k).is_some_and(|v| !v.is_empty()), "{k} missing on {:?}", call.attrs);
    }

    // Responses state kept by the billing process, over gRPC.
    sent.extend(crate::responses_state::chain(&edge.http(), &mock, scenario::MODEL).await);

    // Billing crashes; requests keep being served; after a restart, nothing is lost.
    for id in &sent {
        client::recorded_usage(&billing_client, id).await;
    }
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["billing", "export", "--from", "2020-01-01", "--config"])
        .arg(dir.join("billing.toml"))
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && csv.starts_with("date,key_id,team_id,org_id,model,"), "{csv}");
    let report = relay_billing::reconcile::check(&db).await.unwrap();
    assert_eq!(report.records as usize, sent.len());
    assert_eq!(report.transactions, report.records);
    billing_admin(&billing, &edge, &db, sent.len()).await;

    edge.stop().await;
    for p in [billing, auth, routing, adapter] {
        p.stop().await;
    }
}
