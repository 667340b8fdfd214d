//! Breakers shared by every edge replica: three edges over one backend (auth, routing, adapter, billing),
//! NATS between them. A model's heavy-weight deployment is dead (connection refused); after one edge saw
//! it fail three times, every edge sends straight to the fallback within a second, without failing once.

use std::time::{Duration, Instant};

use crate::harness::{KEY, RelayProc, auth_section, temp_dir};

async fn ask(c: &reqwest::Client, edge: &str) -> (u16, String, String) {
    let body =
        serde_json::json!({"model": "flaky", "messages": [{"role": "user", "content": "breaker check"}]});
    let r = c.post(format!("{edge}/v1/chat/completions")).bearer_auth(KEY).json(&body).send().await.unwrap();
    let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (r.status().as_u16(), h("x-relay-deployment"), h("x-relay-attempts"))
}

#[tokio::test]
async fn a_deployment_isolated_by_one_edge_is_isolated_by_all_within_a_second() {
    let (Some(nats), Some(pg)) =
        (relay_test_support::env_service("NATS_URL"), relay_test_support::env_service("DATABASE_URL"))
    else {
        return;
    };
    let mock = relay_test_support::MockOpenAi::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let db_url = relay_test_support::fresh_postgres_url(&pg).await;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let dir = temp_dir("breakers");
    let bus = format!(
        "[bus]\nnats_url = \"{nats}\"\ninvalidation_subject = \"relay.keys.v1.invalidate.{tag}\"\n\
         [bus.jetstream]\nstream = \"RELAY_USAGE_{tag}\"\nsubject = \"relay.usage.v1.{tag}\"\nconsumer = \"billing-{tag}\"\n\
         [database]\nurl = \"{db_url}\"\n[telemetry]\nlog_filter = \"warn\"\n"
    );
    let backend = RelayProc::start(
        &dir,
        "backend",
        &format!(
            "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"auth\", \"routing\", \"adapter\", \"billing\"]\ngrpc_listen = \"127.0.0.1:0\"\n\
             admin_listen = \"127.0.0.1:0\"\n{bus}{}\
             [[adapter.providers]]\nname = \"dead\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{dead}/v1\"\nconnect_timeout_ms = 500\n\
             [[adapter.providers]]\nname = \"mock\"\nkind = \"openai\"\nbase_url = \"{}\"\n\
             [[routing.models]]\nname = \"flaky\"\ndeployments = [{{ provider = \"dead\", model = \"x\", weight = 100000 }}, \
             {{ provider = \"mock\", model = \"gpt-mock-upstream\", weight = 1 }}]\n",
            auth_section(),
            mock.base_url
        ),
    )
    .await;
    let mut edges = Vec::new();
    for i in 0..3 {
        let cfg = format!(
            "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"edge\"]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [remote]\nauth = \"{g}\"\nrouting = \"{g}\"\nadapter = \"{g}\"\n{bus}",
            g = backend.grpc()
        );
        edges.push(RelayProc::start(&dir, &format!("edge{i}"), &cfg).await);
    }
    let c = crate::client::http();

    // Edge 0 fails over (two attempts, the client never sees the dead deployment) until its breaker opens.
    let mut failed_over = 0;
    for _ in 0..20 {
        let (status, deployment, attempts) = ask(&c, &edges[0].http()).await;
        assert_eq!((status, deployment.as_str()), (200, "gpt-mock-upstream@mock"));
        if attempts == "2" {
            failed_over += 1;
        }
        if failed_over == 3 {
            break;
        }
    }
    assert_eq!(failed_over, 3);
    let opened = Instant::now();
    let (_, _, attempts) = ask(&c, &edges[0].http()).await;
    assert_eq!(attempts, "1", "edge 0 isolated the dead deployment");

    // The other edges hear of it within 1 s (watched on their metrics, without sending them anything)...
    for edge in &edges[1..] {
        let admin = format!("http://{}/metrics", edge.bound["admin"].as_str().unwrap());
        loop {
            let m = c.get(&admin).send().await.unwrap().text().await.unwrap();
            if m.lines().any(|l| l.starts_with("relay_edge_breaker_changes_total") && !l.ends_with(" 0")) {
                break;
            }
            assert!(
                opened.elapsed() < Duration::from_secs(1),
                "the breaker did not reach {admin} within 1 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // ...so although they never failed themselves, their very first requests skip the dead deployment.
    for edge in &edges[1..] {
        for _ in 0..5 {
            let (status, deployment, attempts) = ask(&c, &edge.http()).await;
            assert_eq!(
                (status, deployment.as_str(), attempts.as_str()),
                (200, "gpt-mock-upstream@mock", "1")
            );
        }
    }
    for e in edges {
        e.stop().await;
    }
    backend.stop().await;
}
