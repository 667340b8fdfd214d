//! Routing and resilience across 3 edge replicas over one backend (auth, routing, adapter, billing), NATS
//! and Postgres between them, against mock upstreams whose faults change while the test runs: a failing
//! primary (no client-visible failure, every replica stops using it within 1 s, traffic returns through
//! half-open), a slowed primary (loses most traffic), a weight changed through the admin API (every
//! replica follows within 5 s), a drained deployment, a full outage (the retry budget caps upstream
//! attempts), hedging against a slow tail (lower p99, the loser's input recorded), and model-group
//! fallback when the primary group's upstream account is at its RPM.

use std::time::{Duration, Instant};

use relay_test_support::MockOpenAi;
use serde_json::{Value, json};

use crate::harness::{KEY, RelayProc, auth_section, temp_dir};

const ADMIN: &str = "e2e-routing-admin-token-0123";

struct Cluster {
    backend: RelayProc,
    edges: Vec<RelayProc>,
    c: reqwest::Client,
}

struct Asked {
    status: u16,
    deployment: String,
    attempts: String,
    request_id: String,
    took: Duration,
}

impl Cluster {
    async fn ask(&self, edge: usize, model: &str, text: &str) -> Asked {
        let body = json!({"model": model, "messages": [{"role": "user", "content": text}]});
        let t = Instant::now();
        let r = self
            .c
            .post(format!("{}/v1/chat/completions", self.edges[edge].http()))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let (deployment, attempts, request_id) =
            (h("x-relay-deployment"), h("x-relay-attempts"), h("x-relay-request-id"));
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        Asked { status, deployment, attempts, request_id, took: t.elapsed() }
    }

    fn admin(&self, proc: &RelayProc) -> String {
        format!("http://{}", proc.bound["admin"].as_str().unwrap())
    }

    /// An admin `GET` on `proc`'s admin listener, as JSON.
    async fn get(&self, proc: &RelayProc, path: &str) -> Value {
        let r = self.c.get(format!("{}{path}", self.admin(proc))).bearer_auth(ADMIN).send().await.unwrap();
        r.json().await.unwrap()
    }

    async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .c
            .patch(format!("{}/admin/v1/routing/{path}", self.admin(&self.backend)))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Share of `n` requests per edge that `deployment` served.
    async fn share(&self, model: &str, deployment: &str, n: usize) -> f64 {
        let mut hits = 0;
        for i in 0..n {
            for e in 0..self.edges.len() {
                let a = self.ask(e, model, &format!("share {i}")).await;
                assert_eq!(a.status, 200, "{model} via edge {e}");
                hits += usize::from(a.deployment == deployment);
            }
        }
        hits as f64 / (n * self.edges.len()) as f64
    }
}

fn provider(name: &str, mock: &MockOpenAi) -> String {
    format!(
        "[[adapter.providers]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{}\"\nconnect_timeout_ms = 500\n",
        mock.base_url
    )
}

async fn cluster(mocks: &[&MockOpenAi; 4]) -> Option<Cluster> {
    let (Some(nats), Some(pg), Some(redis)) = (
        relay_test_support::env_service("NATS_URL"),
        relay_test_support::env_service("DATABASE_URL"),
        relay_test_support::env_service("REDIS_URL"),
    ) else {
        return None;
    };
    let db_url = relay_test_support::fresh_postgres_url(&pg).await;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let dir = temp_dir("routing");
    let bus = format!(
        "[bus]\nnats_url = \"{nats}\"\ninvalidation_subject = \"relay.keys.v1.invalidate.{tag}\"\n\
         [bus.jetstream]\nstream = \"RELAY_USAGE_{tag}\"\nsubject = \"relay.usage.v1.{tag}\"\nconsumer = \"billing-{tag}\"\n\
         [database]\nurl = \"{db_url}\"\n[telemetry]\nlog_filter = \"warn\"\n"
    );
    let providers: String = ["a", "b", "c", "d"].iter().zip(mocks).map(|(n, m)| provider(n, m)).collect();
    let models = r#"
[routing]
cache_ttl_ms = 500
refresh_ms = 500

[[routing.models]]
name = "faulty"
deployments = [{ provider = "a", model = "m", weight = 3 }, { provider = "b", model = "m", weight = 1 }]

[[routing.models]]
name = "even"
deployments = [{ provider = "a", model = "e", weight = 1 }, { provider = "b", model = "e", weight = 1 }]

[[routing.models]]
name = "plain"
deployments = [{ provider = "c", model = "t" }, { provider = "d", model = "t" }]

[[routing.models]]
name = "hedged"
hedge_after_ms = 150
deployments = [
  { provider = "c", model = "h", price = { input_per_mtok_micros = 1000000, output_per_mtok_micros = 1000000 } },
  { provider = "d", model = "h", price = { input_per_mtok_micros = 1000000, output_per_mtok_micros = 1000000 } },
]

[[routing.models]]
name = "limited"
fallbacks = ["backup"]
deployments = [{ provider = "c", model = "small", rpm = 3 }]

[[routing.models]]
name = "stall"
timeouts = { idle_ms = 300 }
deployments = [{ provider = "c", model = "stall" }]

[[routing.models]]
name = "solo"
deployments = [{ provider = "d", model = "solo" }]

[[routing.models]]
name = "backup"
deployments = [{ provider = "d", model = "big" }]
"#;
    let backend = RelayProc::start(
        &dir,
        "backend",
        &format!(
            "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"auth\", \"routing\", \"adapter\", \"billing\"]\ngrpc_listen = \"127.0.0.1:0\"\n\
             admin_listen = \"127.0.0.1:0\"\n{bus}{}{providers}{models}",
            auth_section().replacen("[auth]\n", &format!("[auth]\nadmin_token = \"{ADMIN}\"\n"), 1),
        ),
    )
    .await;
    let mut edges = Vec::new();
    for i in 0..3 {
        let cfg = format!(
            "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"edge\"]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [remote]\nauth = \"{g}\"\nrouting = \"{g}\"\nadapter = \"{g}\"\n{bus}[auth]\nadmin_token = \"{ADMIN}\"\n\
             [limits]\nredis_url = \"{redis}\"\nkey_prefix = \"relay-{tag}\"\n",
            g = backend.grpc()
        );
        edges.push(RelayProc::start(&dir, &format!("edge{i}"), &cfg).await);
    }
    Some(Cluster { backend, edges, c: crate::client::http() })
}

#[tokio::test]
async fn three_replicas_route_around_faults_and_follow_runtime_changes() {
    let (a, b, c, d) = (
        MockOpenAi::start().await,
        MockOpenAi::start().await,
        MockOpenAi::start().await,
        MockOpenAi::start().await,
    );
    let Some(cl) = cluster(&[&a, &b, &c, &d]).await else { return };

    // Weighted by default: 3:1.
    let share = cl.share("faulty", "m@a", 100).await;
    assert!((share - 0.75).abs() < 0.1, "weight 3 of 4 served {share}");

    // The primary fails: no client sees it, and within 1 s every replica stops sending to it.
    a.fail_with(500);
    let started = Instant::now();
    let mut last_primary_attempt = Duration::ZERO;
    for i in 0..90 {
        let e = i % 3;
        let r = cl.ask(e, "faulty", &format!("outage {i}")).await;
        assert_eq!((r.status, r.deployment.as_str()), (200, "m@b"), "request {i} via edge {e}");
        if r.attempts != "1" {
            last_primary_attempt = started.elapsed();
        }
    }
    assert!(
        last_primary_attempt < Duration::from_secs(1),
        "the failed primary was tried at {last_primary_attempt:?}"
    );
    // Recovery: after the cool-down one probe finds it healthy and its traffic returns.
    a.fail_with(0);
    let back = Instant::now();
    loop {
        let r = cl.ask(0, "faulty", "recovered?").await;
        if r.deployment == "m@a" {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(10), "traffic never returned through half-open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A slowed primary loses most of its traffic within 10 s.
    a.delay(400);
    let slowed = Instant::now();
    let warm = |e: usize| {
        let cl = &cl;
        async move {
            while slowed.elapsed() < Duration::from_secs(5) {
                assert_eq!(cl.ask(e, "even", "warm").await.status, 200);
            }
        }
    };
    tokio::join!(warm(0), warm(1), warm(2));
    let share = cl.share("even", "e@a", 40).await;
    assert!(share < 0.2, "the slow deployment still served {share}");
    assert!(slowed.elapsed() < Duration::from_secs(10) || share < 0.2);
    a.delay(0);

    // A weight changed through the admin API moves every replica's traffic within 5 s, no restart.
    let (status, body) = cl.patch("deployments/e@b", json!({"weight": 1000})).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let share = cl.share("even", "e@b", 30).await;
    assert!(share > 0.97, "after the weight change e@b served {share}");
    // Drained: no new request goes there.
    let (status, _) = cl.patch("deployments/e@b", json!({"enabled": false})).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cl.share("even", "e@b", 10).await, 0.0);
    let (status, body) = cl.patch("deployments/e@b", json!({"weight": 0})).await;
    assert_eq!((status, body["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{body}");
    let (status, _) = cl.patch("deployments/nope@x", json!({"weight": 2})).await;
    assert_eq!(status, 404);

    // Each edge shows each group's deployments with their health as it sees it; between them, the
    // failures that opened the primary's breaker.
    let mut failures = 0;
    for edge in &cl.edges {
        let view = cl.get(edge, "/admin/v1/routing").await;
        let faulty = view["models"].as_array().unwrap().iter().find(|m| m["model"] == "faulty").unwrap();
        let primary = &faulty["deployments"][0];
        assert_eq!(
            (primary["id"].as_str(), primary["health"]["breaker"].as_str()),
            (Some("m@a"), Some("closed"))
        );
        assert!(primary["health"]["p95_ms"].is_number(), "{primary}");
        failures += primary["health"]["failures"].as_u64().unwrap();
    }
    assert!(failures >= 3, "{failures} failures seen by the edges");

    // A full outage: the retry budget keeps upstream attempts near the request count.
    a.fail_with(503);
    b.fail_with(503);
    let before = a.chat_requests() + b.chat_requests();
    let n = 150;
    for i in 0..n {
        let r = cl.ask(i % 3, "faulty", &format!("down {i}")).await;
        assert_eq!(r.status, 503);
    }
    let attempts = a.chat_requests() + b.chat_requests() - before;
    assert!(attempts as usize <= n + n / 5 + 3 * 20, "{attempts} upstream attempts for {n} requests");
    a.fail_with(0);
    b.fail_with(0);

    // A provider refusing Relay's credential (401): isolated at once on every replica, failed over, and
    // never shown to the client as its own 401.
    let (status, _) = cl.patch("deployments/e@b", json!({"enabled": null, "weight": null})).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.fail_with(401);
    let before = a.chat_requests();
    for i in 0..30 {
        let r = cl.ask(i % 3, "even", &format!("dead key {i}")).await;
        assert_eq!((r.status, r.deployment.as_str()), (200, "e@b"), "request {i}");
    }
    assert!(
        a.chat_requests() - before <= 3,
        "{} requests reached the refusing provider",
        a.chat_requests() - before
    );
    a.fail_with(0);

    // One deployment, one transient failure: a second round after a short backoff answers.
    d.fail_next(1, 502, None);
    let r = cl.ask(0, "solo", "transient").await;
    assert_eq!((r.status, r.attempts.as_str()), (200, "2"));
    // A 429 with a short Retry-After is waited out; a long one goes back to the client.
    d.fail_next(1, 429, Some(1));
    let r = cl.ask(1, "solo", "throttled briefly").await;
    assert_eq!((r.status, r.attempts.as_str()), (200, "2"));
    assert!(r.took >= Duration::from_secs(1), "Retry-After honoured: {:?}", r.took);
    d.fail_next(1, 429, Some(30));
    let r = cl.ask(2, "solo", "throttled long").await;
    assert_eq!((r.status, r.attempts.as_str()), (429, "1"));

    // Streams past their first byte cannot fail over: an upstream dying mid-stream, or going silent
    // longer than the group's idle timeout, ends the client's stream with an error event, never a
    // clean end that looks complete.
    for (e, model, knob) in
        [(0, "faulty", "[[mock die_after=3]]"), (1, "stall", "[[mock chunk_delay_ms=1000]]")]
    {
        let body =
            json!({"model": model, "messages": [{"role": "user", "content": format!("{knob} a b c d e f")}]});
        let s = crate::client::chat_stream(&cl.c, &cl.edges[e].http(), body).await;
        assert!(s.error.is_some(), "{model}: a truncated stream must end in an error event: {s:?}");
        assert_ne!(s.finish.as_deref(), Some("stop"), "{s:?}");
    }

    // Model-group fallback: the primary group's upstream account allows 3 requests a minute.
    let mut served = Vec::new();
    for i in 0..6 {
        let r = cl.ask(i % 3, "limited", &format!("limited {i}")).await;
        assert_eq!(r.status, 200);
        served.push(r.deployment);
    }
    assert_eq!(served.iter().filter(|d| *d == "small@c").count(), 3, "{served:?}");
    assert_eq!(served.iter().filter(|d| *d == "big@d").count(), 3, "{served:?}");

    // Hedging against a slow tail: one request in 5 answers 1.5 s late.
    c.slow_tail(5, 1500);
    let p99 = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() * 99 / 100 - 1]
    };
    let (mut plain, mut hedged, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..40 {
        plain.push(cl.ask(i % 3, "plain", &format!("tail {i}")).await.took);
        let r = cl.ask(i % 3, "hedged", &format!("tail {i}")).await;
        assert_eq!(r.status, 200);
        hedged.push(r.took);
        if r.attempts == "2" {
            ids.push(r.request_id);
        }
    }
    let (plain, hedged) = (p99(plain), p99(hedged));
    assert!(plain > Duration::from_millis(1400), "the tail is there without hedging: {plain:?}");
    assert!(hedged < Duration::from_millis(800), "hedged p99 {hedged:?} (plain {plain:?})");
    assert!(!ids.is_empty(), "some requests were hedged");
    let billing = crate::client::billing_client(&cl.backend.grpc());
    let event = crate::client::recorded_usage(&billing, &ids[0]).await;
    let lost: Vec<_> = event.attempt_log.iter().filter(|a| a.hedge_lost).collect();
    assert_eq!(lost.len(), 1, "{:?}", event.attempt_log);
    assert!(lost[0].input_tokens > 0, "the loser's input is recorded as overhead");
    assert!(event.attempt_log.iter().any(|a| a.answered && a.hedge), "{:?}", event.attempt_log);
    assert!(lost[0].overhead_cost.as_ref().is_some_and(|m| m.micros > 0), "{:?}", lost[0]);
    // Booked as hedge overhead owed to the provider, not charged to the caller; the books still balance.
    let books = cl.get(&cl.backend, "/admin/v1/billing/reconcile").await;
    assert!(books["hedge_overhead_micros"].as_i64().unwrap() > 0, "{books}");
    assert_eq!(books["ok"], true, "{books}");

    for e in cl.edges {
        e.stop().await;
    }
    cl.backend.stop().await;
}
