//! Routing rules and per-key strategies, embedded (SQLite, in-memory limits): a key's traffic moves to
//! the cheaper deployment once it has spent the share of its budget a rule names (the response says
//! which rule chose), and a key created with its own strategy uses it from its first request.

use serde_json::{Value, json};

use crate::harness::{RelayProc, temp_dir};

const ADMIN_TOKEN: &str = "e2e-rules-admin-token-0123";

async fn post(c: &reqwest::Client, base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = c.post(format!("{base}{path}")).bearer_auth(ADMIN_TOKEN).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// (status, deployment, routing rule) of one chat request.
async fn chat(c: &reqwest::Client, edge: &str, key: &str) -> (u16, String, String) {
    let body =
        json!({"model": "ruled", "max_tokens": 8, "messages": [{"role": "user", "content": "w1 w2 w3 w4"}]});
    let r = c.post(format!("{edge}/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap();
    let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (r.status().as_u16(), h("x-relay-deployment"), h("x-relay-routing-rule"))
}

#[tokio::test]
async fn a_budget_rule_moves_a_key_to_the_cheaper_deployment_and_keys_carry_strategies() {
    let dir = temp_dir("rules");
    let price = |micros: u32| {
        format!("price = {{ input_per_mtok_micros = {micros}, output_per_mtok_micros = {micros} }}")
    };
    let config = format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n\
         [auth]\npepper = \"{}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\
         [[adapter.providers]]\nname = \"demo\"\nkind = \"demo\"\n\
         [[routing.models]]\nname = \"ruled\"\n\
         rules = [{{ name = \"save-budget\", when_budget_used_pct = 50, strategy = \"cost\" }}]\n\
         deployments = [{{ provider = \"demo\", model = \"dear\", weight = 100000, max_output_tokens = 64, {} }}, \
         {{ provider = \"demo\", model = \"cheap\", weight = 1, max_output_tokens = 64, {} }}]\n",
        dir.join("relay.db").display(),
        crate::harness::PEPPER,
        price(1_000_000),
        price(100_000),
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let (edge, admin) = (relay.http(), format!("http://{}", relay.bound["admin"].as_str().unwrap()));
    let c = crate::client::http();
    post(&c, &admin, "/admin/v1/orgs", json!({"id": "org", "name": "org"})).await;
    post(&c, &admin, "/admin/v1/orgs/org/teams", json!({"id": "team", "name": "team"})).await;
    let (status, k) = post(
        &c,
        &admin,
        "/admin/v1/keys",
        json!({"team_id": "team", "budget_micros": 2000, "budget_period": "total"}),
    )
    .await;
    assert_eq!(status, 201, "{k}");
    let key = k["key"].as_str().unwrap().to_owned();

    let mut served = Vec::new();
    for _ in 0..200 {
        let (status, deployment, rule) = chat(&c, &edge, &key).await;
        if status == 429 {
            break;
        }
        assert_eq!(status, 200);
        served.push((deployment, rule));
        // Spend is booked after each answer; give it a moment so the next request sees it.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let switch =
        served.iter().position(|(d, _)| d == "cheap@demo").expect("never moved to the cheaper deployment");
    assert!(switch >= 3, "moved before spending half the budget: {served:?}");
    assert!(served[..switch].iter().all(|(d, r)| d == "dear@demo" && r.is_empty()), "{served:?}");
    assert!(served[switch..].iter().all(|(d, r)| d == "cheap@demo" && r == "save-budget"), "{served:?}");

    // A key with its own strategy: cheapest first from the start, no rule involved.
    let (status, k) =
        post(&c, &admin, "/admin/v1/keys", json!({"team_id": "team", "routing_strategy": "cost"})).await;
    assert_eq!(status, 201, "{k}");
    let frugal = k["key"].as_str().unwrap().to_owned();
    for _ in 0..5 {
        let (status, deployment, rule) = chat(&c, &edge, &frugal).await;
        assert_eq!((status, deployment.as_str(), rule.as_str()), (200, "cheap@demo", ""));
    }
    let (status, body) =
        post(&c, &admin, "/admin/v1/keys", json!({"team_id": "team", "routing_strategy": "fastest"})).await;
    assert_eq!(status, 400, "{body}");
    // The per-key response cache switch is part of a key; out of range it is a 400.
    let (status, k) =
        post(&c, &admin, "/admin/v1/keys", json!({"team_id": "team", "response_cache_ttl_secs": 30})).await;
    assert_eq!(status, 201, "{k}");
    let (status, body) = post(
        &c,
        &admin,
        "/admin/v1/keys",
        json!({"team_id": "team", "response_cache_ttl_secs": 999_999_999}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    relay.stop().await;
}
