//! Limits that hold across replicas: three edge processes share Redis counters and one auth service
//! (virtual keys in Postgres). 3 × 50 clients hammer one TPM limit and 3 × 50 one budget; every admitted
//! token and every micro-unit is then counted from billing's records. Also: revocation reaches every edge
//! within a second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use relay_db::Db;
use serde_json::{Value, json};
use sqlx::Row;

use crate::harness::{RelayProc, temp_dir};

const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";
const TPM: i64 = 400;
const BUDGET: i64 = 1000;
const MODEL: &str = "priced";
const BODY: &str =
    r#"{"model":"priced","max_tokens":8,"messages":[{"role":"user","content":"w1 w2 w3 w4"}]}"#;

async fn admin(c: &reqwest::Client, base: &str, path: &str, body: Value) -> Value {
    let r = c.post(format!("{base}{path}")).bearer_auth(ADMIN_TOKEN).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    quota: AtomicUsize,
    rate: AtomicUsize,
    other: AtomicUsize,
    /// The first few unexpected answers, for the failure message.
    unexpected: std::sync::Mutex<Vec<String>>,
}

/// 50 clients per edge send requests with `key` until `until`, counting answers.
async fn hammer(c: &reqwest::Client, edges: &[String], key: &str, until: Instant) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for edge in edges {
        for _ in 0..50 {
            let (c, url, key, tally) =
                (c.clone(), format!("{edge}/v1/chat/completions"), key.to_owned(), tally.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let r = c
                        .post(&url)
                        .bearer_auth(&key)
                        .header("content-type", "application/json")
                        .body(BODY)
                        .send()
                        .await;
                    let Ok(r) = r else { continue };
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    let counter = match (status, body["error"]["type"].as_str()) {
                        (200, _) => &tally.ok,
                        (429, Some("insufficient_quota")) => &tally.quota,
                        (429, _) => &tally.rate,
                        _ => {
                            let mut seen = tally.unexpected.lock().unwrap();
                            if seen.len() < 5 {
                                seen.push(format!("{status} {body}"));
                            }
                            &tally.other
                        }
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    if status == 429 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    tally
}

#[tokio::test]
async fn limits_hold_across_three_edges_and_revocation_is_fast() {
    let (Some(nats), Some(pg), Some(redis)) = (
        relay_test_support::env_service("NATS_URL"),
        relay_test_support::env_service("DATABASE_URL"),
        relay_test_support::env_service("REDIS_URL"),
    ) else {
        return;
    };
    let db_url = relay_test_support::fresh_postgres_url(&pg).await;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let bus = format!(
        "[bus]\nnats_url = \"{nats}\"\ninvalidation_subject = \"inv.{tag}\"\n[bus.jetstream]\nstream = \"L_{tag}\"\nsubject = \"u.{tag}\"\nconsumer = \"b{tag}\"\n"
    );
    let dir = temp_dir("limits");
    let backend = RelayProc::start(
        &dir,
        "backend",
        &format!(
            "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"auth\", \"routing\", \"adapter\", \"billing\"]\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [database]\nurl = \"{db_url}\"\n{bus}\
             [auth]\npepper = \"{}\"\nadmin_token = \"{ADMIN_TOKEN}\"\ncache_ttl_secs = 300\n\
             [[adapter.providers]]\nname = \"demo\"\nkind = \"demo\"\nchunk_delay_ms = 15\n\
             [[routing.models]]\nname = \"{MODEL}\"\ndeployments = [{{ provider = \"demo\", model = \"demo-1\", max_output_tokens = 64, \
             price = {{ input_per_mtok_micros = 1000000, output_per_mtok_micros = 1000000 }} }}]\n",
            crate::harness::PEPPER
        ),
    )
    .await;
    let mut edges = Vec::new();
    for i in 0..3 {
        let cfg = format!(
            "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"edge\"]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [remote]\nauth = \"{g}\"\nrouting = \"{g}\"\nadapter = \"{g}\"\n{bus}\
             [limits]\nredis_url = \"{redis}\"\nkey_prefix = \"l{tag}\"\non_redis_error = \"fail_closed\"\n\
             # 300 clients on 2 debug-built cores: Redis answers late, not never; the bound is what is tested.\n\
             redis_timeout_ms = 2000\n",
            g = backend.grpc()
        );
        edges.push(RelayProc::start(&dir, &format!("edge{i}"), &cfg).await);
    }
    let urls: Vec<String> = edges.iter().map(RelayProc::http).collect();
    let admin_url = format!("http://{}", backend.bound["admin"].as_str().unwrap());
    let c = crate::client::http();
    admin(&c, &admin_url, "/admin/v1/orgs", json!({"id": "org", "name": "org"})).await;
    admin(&c, &admin_url, "/admin/v1/orgs/org/teams", json!({"id": "team", "name": "team"})).await;
    let tpm_key =
        admin(&c, &admin_url, "/admin/v1/keys", json!({"team_id": "team", "name": "tpm", "tpm": TPM})).await;
    let budget_key = admin(
        &c,
        &admin_url,
        "/admin/v1/keys",
        json!({"team_id": "team", "name": "budget", "budget_micros": BUDGET, "budget_period": "total"}),
    )
    .await;
    let (tpm_key, tpm_id) =
        (tpm_key["key"].as_str().unwrap().to_owned(), tpm_key["id"].as_str().unwrap().to_owned());
    let budget_id = budget_key["id"].as_str().unwrap().to_owned();
    let budget_key = budget_key["key"].as_str().unwrap().to_owned();

    // 300 concurrent clients for three seconds: 150 on the TPM key, 150 on the budget key.
    let until = Instant::now() + Duration::from_secs(3);
    let (tpm, budget) =
        tokio::join!(hammer(&c, &urls, &tpm_key, until), hammer(&c, &urls, &budget_key, until));
    assert_eq!(
        tpm.other.load(Ordering::SeqCst) + budget.other.load(Ordering::SeqCst),
        0,
        "only 200s and 429s: {:?} {:?}",
        tpm.unexpected.lock().unwrap(),
        budget.unexpected.lock().unwrap()
    );
    assert!(
        tpm.ok.load(Ordering::SeqCst) > 0 && tpm.rate.load(Ordering::SeqCst) > 0,
        "the TPM limit was reached"
    );
    assert!(
        budget.ok.load(Ordering::SeqCst) > 0 && budget.quota.load(Ordering::SeqCst) > 0,
        "the budget ran out"
    );

    // Count what was admitted from billing's records (every authenticated request has one).
    let sent = tpm.ok.load(Ordering::SeqCst)
        + tpm.rate.load(Ordering::SeqCst)
        + budget.ok.load(Ordering::SeqCst)
        + budget.quota.load(Ordering::SeqCst);
    let db = Db::connect(&db_url).await.unwrap();
    let Db::Postgres(pool) = &db else { unreachable!() };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM usage_records").fetch_one(pool).await.unwrap().get(0);
        if n as usize >= sent {
            break;
        }
        assert!(Instant::now() < deadline, "{n} of {sent} usage events recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Tokens per minute window, for the TPM key: never more than the limit, whatever the replica count.
    let rows = sqlx::query("SELECT started_at_ms, input_tokens + output_tokens FROM usage_records WHERE key_id = $1 AND outcome = 'success'")
        .bind(&tpm_id)
        .fetch_all(pool)
        .await
        .unwrap();
    let mut per_minute: BTreeMap<i64, i64> = BTreeMap::new();
    for r in &rows {
        *per_minute.entry(r.get::<i64, _>(0) / 60_000).or_default() += r.get::<i64, _>(1);
    }
    assert!(per_minute.values().all(|t| *t <= TPM), "tokens per minute {per_minute:?} > {TPM}");
    // Money for the budget key: spend ≤ budget + one request's largest reservation.
    let spent: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) FROM usage_records WHERE key_id = $1",
    )
    .bind(&budget_id)
    .fetch_one(pool)
    .await
    .unwrap()
    .get(0);
    let one_request_max = i64::try_from(BODY.len()).unwrap() + 8;
    assert!(spent > 0 && spent <= BUDGET + one_request_max, "spent {spent} of {BUDGET}");
    eprintln!(
        "limits: tpm key {} ok / {} limited, tokens per minute {per_minute:?} (limit {TPM}); budget key {} ok / {} refused, spent {spent} of {BUDGET} micros",
        tpm.ok.load(Ordering::SeqCst),
        tpm.rate.load(Ordering::SeqCst),
        budget.ok.load(Ordering::SeqCst),
        budget.quota.load(Ordering::SeqCst)
    );

    // Revocation: every edge (each with the key cached for 300 s) refuses it within a second.
    let models = |url: &String| c.get(format!("{url}/v1/models")).bearer_auth(&tpm_key).send();
    for url in &urls {
        assert_eq!(models(url).await.unwrap().status(), 200);
    }
    let started = Instant::now();
    admin(&c, &admin_url, &format!("/admin/v1/keys/{tpm_id}/revoke"), json!({})).await;
    for url in &urls {
        while models(url).await.unwrap().status() != 401 {
            assert!(started.elapsed() < Duration::from_secs(1), "revocation took over 1 s on {url}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!("limits: revocation reached all 3 edges in {:?}", started.elapsed());

    for e in edges {
        e.stop().await;
    }
    backend.stop().await;
}
