//! Prepaid keys, embedded (SQLite, in-memory limits): refused with nothing topped up, served after a
//! top-up until the balance runs out, and still exhausted after a restart (the spend counter comes back
//! from the ledger, not from zero). Top-ups and credits are ledger entries; the books still reconcile.

use serde_json::{Value, json};

use crate::harness::{RelayProc, temp_dir};

const ADMIN_TOKEN: &str = "e2e-prepaid-admin-token-0123";
const BODY: &str =
    r#"{"model":"priced","max_tokens":8,"messages":[{"role":"user","content":"w1 w2 w3 w4"}]}"#;

async fn post(c: &reqwest::Client, base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = c.post(format!("{base}{path}")).bearer_auth(ADMIN_TOKEN).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn chat(c: &reqwest::Client, edge: &str, key: &str) -> (u16, Value) {
    let r = c
        .post(format!("{edge}/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Sends until refused; returns how many were served.
async fn spend_all(c: &reqwest::Client, edge: &str, key: &str) -> usize {
    for served in 0..500 {
        let (status, body) = chat(c, edge, key).await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
            return served;
        }
        assert_eq!(status, 200, "{body}");
    }
    panic!("the prepaid balance never ran out");
}

#[tokio::test]
async fn prepaid_keys_spend_their_top_ups_and_stay_spent_across_a_restart() {
    let dir = temp_dir("prepaid");
    let config = format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n\
         [auth]\npepper = \"{}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\
         [[adapter.providers]]\nname = \"demo\"\nkind = \"demo\"\n\
         [[routing.models]]\nname = \"priced\"\ndeployments = [{{ provider = \"demo\", model = \"demo-1\", max_output_tokens = 64, \
         price = {{ input_per_mtok_micros = 1000000, output_per_mtok_micros = 1000000 }} }}]\n",
        dir.join("relay.db").display(),
        crate::harness::PEPPER
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let (edge, admin) = (relay.http(), format!("http://{}", relay.bound["admin"].as_str().unwrap()));
    let c = crate::client::http();
    post(&c, &admin, "/admin/v1/orgs", json!({"id": "org", "name": "org"})).await;
    post(&c, &admin, "/admin/v1/orgs/org/teams", json!({"id": "team", "name": "team"})).await;
    let (status, key) = post(
        &c,
        &admin,
        "/admin/v1/keys",
        json!({"team_id": "team", "name": "pp", "budget_period": "prepaid"}),
    )
    .await;
    assert_eq!(status, 201, "{key}");
    let (id, key) = (key["id"].as_str().unwrap().to_owned(), key["key"].as_str().unwrap().to_owned());
    let scope = format!("key:{id}");

    // Nothing topped up: refused before any upstream call.
    let (status, body) = chat(&c, &edge, &key).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("insufficient_quota")), "{body}");

    // A top-up of 500 micros; each request reserves 64 output + its bytes at 1 micro a token.
    let (status, t) =
        post(&c, &admin, "/admin/v1/billing/topups", json!({"scope": scope, "amount_micros": 500})).await;
    assert_eq!((status, t["balance"]["balance_micros"].as_i64()), (201, Some(500)), "{t}");
    let (status, _) =
        post(&c, &admin, "/admin/v1/billing/topups", json!({"scope": scope, "amount_micros": -5})).await;
    assert_eq!(status, 400);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await; // the refusal's balance read ages out
    let served = spend_all(&c, &edge, &key).await;
    assert!(served > 0, "the top-up was not applied");

    // A credit (a correction as a new entry) buys a little more.
    let (status, _) = post(
        &c,
        &admin,
        "/admin/v1/billing/credits",
        json!({"scope": scope, "amount_micros": 300, "memo": "outage"}),
    )
    .await;
    assert_eq!(status, 201);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let more = spend_all(&c, &edge, &key).await;
    assert!(more > 0, "the credit was not applied");

    // Spend never passes the prepaid total by more than one request's reservation.
    let balance = |c: reqwest::Client, admin: String, scope: String| async move {
        let r = c
            .get(format!("{admin}/admin/v1/billing/balance?scope={scope}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let b = loop {
        let b = balance(c.clone(), admin.clone(), scope.clone()).await;
        let rec: Value = c
            .get(format!("{admin}/admin/v1/billing/reconcile"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        // Every request is a record, refusals included: one before the top-up, one ending each spend.
        if rec["records"].as_u64() == Some((served + more + 3) as u64) {
            assert_eq!(rec["ok"], true, "{rec}");
            break b;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all booked: {rec}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(b["prepaid_micros"], 800, "{b}");
    let spent = b["spent_micros"].as_i64().unwrap();
    assert!(spent > 0 && spent <= 800 + 100, "{b}");

    // A restart forgets nothing: the counter is rebuilt from the ledger, so the key stays spent.
    relay.stop().await;
    let relay = RelayProc::restart(dir.join("relay.toml"), "relay-2").await;
    let again = spend_all(&c, &relay.http(), &key).await;
    assert!(again <= 1, "a restart reset the spend: {again} more requests served");
    relay.stop().await;
}
