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
        "[server]\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n{}{}",
        db_path.display(),
        auth_section(),
        upstream_sections(&mock)
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let billing = client::billing_client(&relay.grpc());
    let sent = scenario::run(&relay.http(), &billing, &mock).await;

    // The demo route needs no upstream at all.
    let c = client::http();
    let a = client::chat(&c, &relay.http(), client::user("demo", "hi there")).await;
    assert_eq!(a.body["choices"][0]["message"]["content"], "You said: hi there");

    // Health and metrics on the admin listener.
    let admin = format!("http://{}", relay.bound["admin"].as_str().unwrap());
    assert_eq!(c.get(format!("{admin}/readyz")).send().await.unwrap().status(), 200);
    let metrics = c.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("relay_edge_requests_total"), "{metrics}");

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
    assert_eq!(total as usize, sent.len() + 1, "one row per authenticated request (scenario + demo)");
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
