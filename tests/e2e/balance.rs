//! Internal load balancing: an edge spreads its calls over every adapter it is given (a headless
//! Service's addresses in Kubernetes), and keeps serving when one of them goes away.

use crate::client;
use crate::harness::{RelayProc, auth_section, temp_dir};

const TOKEN: &str = "relay-test-service-token";

async fn calls(c: &reqwest::Client, adapter: &RelayProc) -> u64 {
    let admin = format!("http://{}/metrics", adapter.bound["admin"].as_str().unwrap());
    let text = c.get(admin).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("relay_adapter_calls_total") && l.contains("chat"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn an_edge_spreads_calls_over_every_adapter_and_survives_losing_one() {
    let (Some(nats), Some(pg)) =
        (relay_test_support::env_service("NATS_URL"), relay_test_support::env_service("DATABASE_URL"))
    else {
        return;
    };
    let db_url = relay_test_support::fresh_postgres_url(&pg).await;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let shared = format!(
        "[database]\nurl = \"{db_url}\"\n\
         [bus]\nnats_url = \"{nats}\"\ninvalidation_subject = \"inv.{tag}\"\n[bus.jetstream]\nstream = \"B_{tag}\"\nsubject = \"u.{tag}\"\nconsumer = \"b{tag}\"\n\
         [[adapter.providers]]\nname = \"demo\"\nkind = \"demo\"\n\
         [[routing.models]]\nname = \"demo\"\ndeployments = [{{ provider = \"demo\", model = \"relay-demo-1\" }}]\n"
    );
    let dir = temp_dir("balance");
    let server = |services: &str| {
        format!(
            "[server]\nservice_token = \"{TOKEN}\"\nservices = [{services}]\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n"
        )
    };
    let backend = RelayProc::start(
        &dir,
        "backend",
        &format!("{}{shared}{}", server("\"auth\", \"routing\", \"billing\""), auth_section()),
    )
    .await;
    let mut adapters = Vec::new();
    for i in 0..3 {
        adapters.push(
            RelayProc::start(&dir, &format!("adapter{i}"), &format!("{}{shared}", server("\"adapter\"")))
                .await,
        );
    }
    let list: Vec<String> = adapters.iter().map(RelayProc::grpc).collect();
    let edge_cfg = format!(
        "[server]\nservice_token = \"{TOKEN}\"\nservices = [\"edge\"]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [remote]\nauth = \"{g}\"\nrouting = \"{g}\"\nadapter = \"{}\"\n{shared}{}",
        list.join(","),
        auth_section(),
        g = backend.grpc(),
    );
    let edge = RelayProc::start(&dir, "edge", &edge_cfg).await;
    let c = client::http();
    for i in 0..60 {
        let a = client::chat(&c, &edge.http(), client::user("demo", &format!("spread {i}"))).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    let per: Vec<u64> = futures_util::future::join_all(adapters.iter().map(|a| calls(&c, a))).await;
    assert_eq!(per.iter().sum::<u64>(), 60, "{per:?}");
    assert!(per.iter().all(|n| *n >= 5), "every adapter takes a share: {per:?}");

    // One adapter goes away (a pod deleted): the others carry on.
    let gone = adapters.remove(0);
    gone.kill().await;
    let mut failed = 0;
    for i in 0..40 {
        let a = client::chat(&c, &edge.http(), client::user("demo", &format!("after {i}"))).await;
        if a.status != 200 {
            failed += 1;
            assert!(i < 5, "request {i} after the loss failed: {:?}", a.body);
        }
    }
    assert!(failed <= 1, "{failed} requests failed after one adapter of three went away");
}
