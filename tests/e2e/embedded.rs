//! Embedded mode: one process runs all five services on SQLite and the in-process bus.

use relay_db::Db;
use sqlx::Row;

use crate::harness::{RelayProc, auth_section, temp_dir};
use crate::{client, scenario, upstream_sections};

#[tokio::test]
async fn embedded_single_process_serves_and_records_every_request_once() {
    let mock = relay_test_support::MockOpenAi::start().await;
    let dir = temp_dir("embedded");
    let db_path = dir.join("relay.db");
    let config = format!(
        "[server]\nservice_token = \"relay-test-service-token\"\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n{}{}",
        db_path.display(),
        auth_section(),
        upstream_sections(&mock)
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    // Transparent huge pages are off for the relay (they doubled its resident memory under mimalloc).
    if let Some(status) = relay.pid().and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
    {
        let thp = status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(str::trim);
        assert!(matches!(thp, None | Some("0")), "THP_enabled: {thp:?}");
    }
    let billing = client::billing_client(&relay.grpc());
    let sent = scenario::run(&relay.http(), &billing, &mock).await;

    // The demo route needs no upstream at all.
    let c = client::http();
    let a = client::chat(&c, &relay.http(), client::user("demo", "hi there")).await;
    assert_eq!(a.body["choices"][0]["message"]["content"], "You said: hi there");
    // SDK-native prefixes reach the same endpoints (with the protocol's own error shape).
    let a = client::chat(&c, &format!("{}/openai", relay.http()), client::user("demo", "prefixed")).await;
    assert_eq!(a.body["choices"][0]["message"]["content"], "You said: prefixed");
    let r = c
        .post(format!("{}/anthropic/v1/messages", relay.http()))
        .header("x-api-key", crate::harness::KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&serde_json::json!({"model": "demo", "max_tokens": 16, "messages": [{"role": "user", "content": "hey"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["content"][0]["text"], "You said: hey");
    let r = c
        .post(format!("{}/anthropic/v1/messages", relay.http()))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["type"], "error", "Anthropic error shape");

    // Health and metrics on the admin listener.
    let admin = format!("http://{}", relay.bound["admin"].as_str().unwrap());
    assert_eq!(c.get(format!("{admin}/readyz")).send().await.unwrap().status(), 200);
    let metrics = c.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("relay_edge_requests_total"), "{metrics}");
    for name in [
        "relay_outbox_pending_events",
        "relay_outbox_oldest_pending_age_seconds",
        "relay_billing_lag_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }

    // Graceful stop flushes the bus; then SQLite holds exactly one row per request id.
    relay.stop().await;
    let db = Db::connect(&format!("sqlite://{}", db_path.display())).await.unwrap();
    let Db::Sqlite(pool) = &db else { unreachable!() };
    for id in &sent {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM usage_records WHERE request_id = ?")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "request {id}");
    }
    let total: i64 = sqlx::query("SELECT COUNT(*) FROM usage_records").fetch_one(pool).await.unwrap().get(0);
    assert_eq!(total as usize, sent.len() + 3, "one row per authenticated request (scenario + 3 demo)");
}

#[tokio::test]
async fn bad_config_reports_every_error_and_exits_64() {
    let dir = temp_dir("badcfg");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nservices = [\"edge\", \"bogus\"]\nhttp_listen = \"nowhere\"\n[edg]\nx = 1\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "edg: unknown section",
        "unknown service `bogus`",
        "`nowhere` is not a socket address",
        "remote.auth",
        "bus.nats_url",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
}

/// Runs the `relay` CLI against the database at `url`: (exit code, stdout + stderr).
fn relay_cli(url: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(args)
        .env("RELAY__DATABASE__URL", url)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `relay billing ...` against a database, with no serving settings at all (no pepper, no listeners).
#[tokio::test]
async fn billing_cli_manages_prices_balances_and_checks_the_books() {
    let dir = temp_dir("billing-cli");
    let url = format!("sqlite://{}", dir.join("b.db").display());
    let relay = |args: &[&str]| relay_cli(&url, args);
    assert_eq!(relay(&["migrate"]).0, Some(0));
    let add = [
        "billing",
        "price-add",
        "--model",
        "m1",
        "--provider",
        "p",
        "--input",
        "1000000",
        "--output",
        "2000000",
    ];
    assert_eq!(relay(&add).0, Some(0));
    let (code, out) = relay(&add);
    assert!(code != Some(0) && out.contains("exists"), "{out}");
    let (code, out) = relay(&["billing", "price-add", "--model", "m2", "--input", "-1", "--output", "1"]);
    assert!(code != Some(0) && out.contains("input must be"), "{out}");
    let (_, out) = relay(&["billing", "prices"]);
    assert!(
        out.contains("p/m1@0") && out.contains("*/gpt-4o@0"),
        "shipped catalog and the new version: {out}"
    );
    let (code, out) = relay(&["billing", "topup", "--scope", "team:t", "--amount-micros", "2500000"]);
    assert!(code == Some(0) && out.contains("balance 2.500000"), "{out}");
    let (code, out) =
        relay(&["billing", "credit", "--scope", "team:t", "--amount-micros", "500000", "--memo", "sorry"]);
    assert!(code == Some(0) && out.contains("balance 3.000000"), "{out}");
    assert!(relay(&["billing", "topup", "--scope", "nope", "--amount-micros", "1"]).0 != Some(0));
    let (code, out) = relay(&["billing", "reconcile"]);
    assert!(code == Some(0) && out.contains("books balance"), "top-ups balance too: {out}");
    let (code, out) = relay(&["billing", "dlq", "list"]);
    assert!(code == Some(0) && out.contains("0 dead letter(s)"), "{out}");
    assert!(relay(&["billing", "frobnicate"]).0 != Some(0));
}

/// `relay routing`: runtime changes written to the database, checked against the config and the rules,
/// and what a running relay then serves: a drained group's only deployment answers 503.
#[tokio::test]
async fn routing_cli_changes_what_the_relay_serves() {
    let dir = temp_dir("routing-cli");
    let url = format!("sqlite://{}", dir.join("r.db").display());
    let routes = "[[adapter.providers]]\nname = \"demo\"\nkind = \"demo\"\n\
                  [[routing.models]]\nname = \"demo\"\ndeployments = [{ provider = \"demo\", model = \"relay-demo-1\" }]\n";
    let routes_file = dir.join("routes.toml");
    std::fs::write(&routes_file, routes).unwrap();
    let file = routes_file.display().to_string();
    let relay = |args: &[&str]| relay_cli(&url, &[args, &["--config", &file]].concat());
    assert_eq!(relay(&["migrate"]).0, Some(0));
    let (code, out) = relay(&["routing", "weight", "relay-demo-1@demo", "7"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"weight\": 7"), "{out}");
    let (code, out) = relay(&["routing", "weight", "nope@x", "7"]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("no deployment `nope@x`"), "{out}");
    let (code, out) = relay(&["routing", "strategy", "demo", "fastest"]);
    assert!(code == Some(64) && out.contains("strategy must be one of"), "{out}");
    assert_eq!(relay(&["routing", "drain", "relay-demo-1@demo"]).0, Some(0));

    let cfg = format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[database]\nurl = \"{url}\"\n{}{routes}",
        auth_section()
    );
    let p = RelayProc::start(&dir, "relay", &cfg).await;
    let c = crate::client::http();
    let body = serde_json::json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]});
    let ask = || {
        c.post(format!("{}/v1/chat/completions", p.http()))
            .bearer_auth(crate::harness::KEY)
            .json(&body)
            .send()
    };
    let r = ask().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("drained"), "{v}");
    // Enabled again: the running relay picks it up within its refresh and route cache TTL.
    assert_eq!(relay(&["routing", "reset", "deployment", "relay-demo-1@demo"]).0, Some(0));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while ask().await.unwrap().status() != 200 {
        assert!(std::time::Instant::now() < deadline, "the reset never reached the relay");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    p.stop().await;
}
