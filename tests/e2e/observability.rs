//! What operators see: `/metrics` of all five processes after streamed and whole answers (histograms with
//! buckets, bounded labels, tokens and cost equal to the mock's usage), the dashboards and alert rules
//! naming only metrics that exist, and the access log (one masked JSON line per request).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::client::{self, mock_usage, user};
use crate::collector::Collector;
use crate::harness::{KEY, PEPPER, RelayProc, auth_section, temp_dir};

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Samples and `# TYPE` lines of a `/metrics` page.
pub fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let (mut samples, mut types) = (Vec::new(), BTreeMap::new());
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let mut labels = BTreeMap::new();
                for pair in rest.trim_end_matches('}').split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap();
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (n.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        samples.push(Sample { name, labels, value: value.parse().unwrap() });
    }
    (samples, types)
}

/// Sum of the samples named `name` whose labels include every pair of `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(p: &RelayProc) -> String {
    let admin = format!("http://{}/metrics", p.bound["admin"].as_str().unwrap());
    client::http().get(admin).send().await.unwrap().text().await.unwrap()
}

/// Metric names (without histogram suffixes) a dashboard or rules file mentions.
fn named_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("relay_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        out.insert(base.to_owned());
        i = end;
    }
    out
}

const PRICED: &str = r#"
[[routing.models]]
name = "priced"
deployments = [{ provider = "mock", model = "gpt-mock-upstream", price = { input_per_mtok_micros = 2000000, output_per_mtok_micros = 8000000 } }]
"#;

#[tokio::test]
async fn every_service_exports_histograms_labels_tokens_and_cost() {
    let (Some(nats), Some(pg)) =
        (relay_test_support::env_service("NATS_URL"), relay_test_support::env_service("DATABASE_URL"))
    else {
        return;
    };
    let mock = relay_test_support::MockOpenAi::start().await;
    let collector = Collector::start().await;
    let upstreams = format!("{}{PRICED}", crate::upstream_sections(&mock));
    let crate::distributed::Stack { edge, auth, routing, adapter, billing, .. } =
        crate::distributed::five_processes("observability", (&nats, &pg), &collector, &upstreams, "").await;
    let billing_client = client::billing_client(&billing.grpc());

    // Whole answers and streams on the priced group; what the mock reported is what must be counted.
    let c = client::http();
    let (mut input, mut output, mut ids) = (0u64, 0u64, Vec::new());
    for i in 0..4 {
        let text = format!("metrics whole {i} with a few words");
        let a = client::chat(&c, &edge.http(), user("priced", &text)).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let (p, o) = mock_usage(&text);
        (input, output) = (input + p, output + o);
        ids.push(a.request_id);
    }
    for i in 0..3 {
        let text = format!("metrics stream {i} with several more words to stream");
        let mut body = user("priced", &text);
        body["stream_options"] = serde_json::json!({"include_usage": true});
        let s = client::chat_stream(&c, &edge.http(), body).await;
        assert!(s.done && s.content_chunks > 1, "{s:?}");
        let (p, o) = mock_usage(&text);
        (input, output) = (input + p, output + o);
        ids.push(s.request_id);
    }
    // An unknown model: an error by code, labelled `unrouted`, never with the name the client made up.
    let bad = client::chat(&c, &edge.http(), user("made-up-model-name", "x")).await;
    assert_eq!(bad.status, 404, "{}", bad.body);
    let mut cost = 0i64;
    for id in &ids {
        cost += client::recorded_usage(&billing_client, id).await.cost.unwrap().micros;
    }
    assert_eq!(cost, (input * 2 + output * 8) as i64, "tokens × price");

    // The edge books metrics when each request's usage is final (just after its last byte).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (samples, types) = loop {
        let (samples, types) = parse(&scrape(&edge).await);
        if sum(&samples, "relay_llm_requests_total", &[("model", "priced")]) >= 7.0
            || tokio::time::Instant::now() > deadline
        {
            break (samples, types);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let dep = [("model", "priced"), ("provider", "mock"), ("deployment", "gpt-mock-upstream@mock")];
    let route = ("route", "/v1/chat/completions");
    let ok = [dep[0], dep[1], dep[2], route, ("status", "200")];
    assert_eq!(sum(&samples, "relay_llm_requests_total", &ok), 7.0);
    assert_eq!(
        sum(&samples, "relay_llm_tokens_total", &[dep[0], dep[1], dep[2], ("kind", "input")]),
        input as f64
    );
    assert_eq!(
        sum(&samples, "relay_llm_tokens_total", &[dep[0], dep[1], dep[2], ("kind", "output")]),
        output as f64
    );
    assert_eq!(sum(&samples, "relay_llm_cost_micros_total", &[dep[0], ("currency", "USD")]), cost as f64);
    for (h, n) in [
        ("relay_llm_request_duration_seconds", 7.0),
        ("relay_llm_time_to_first_token_seconds", 3.0),
        ("relay_edge_upstream_answer_seconds", 7.0),
    ] {
        assert_eq!(types.get(h).map(String::as_str), Some("histogram"), "{h} is a histogram");
        assert_eq!(sum(&samples, &format!("{h}_count"), &dep[1..]), n, "{h}");
        let inf = sum(&samples, &format!("{h}_bucket"), &[dep[1], dep[2], ("le", "+Inf")]);
        assert_eq!(inf, n, "{h}: the +Inf bucket holds every observation");
        let buckets = samples.iter().filter(|s| s.name == format!("{h}_bucket")).count();
        assert!(buckets >= 10, "{h} has real buckets ({buckets})");
    }
    let gaps = sum(&samples, "relay_llm_inter_token_seconds_count", &dep);
    assert!(gaps >= 3.0, "inter-token gaps of the streams: {gaps}");
    assert_eq!(sum(&samples, "relay_llm_requests_total", &[("model", "unrouted"), ("status", "404")]), 1.0);
    assert_eq!(sum(&samples, "relay_edge_errors_total", &[route, ("code", "model_not_found")]), 1.0);
    assert_eq!(sum(&samples, "relay_edge_streams_in_flight", &[]), 0.0, "every stream ended");
    assert_eq!(sum(&samples, "relay_edge_breaker_open", &[dep[2]]), 0.0);
    // Bounded labels only: no key, user, address or client-chosen model name anywhere.
    let page = scrape(&edge).await;
    assert!(!page.contains("made-up-model-name") && !page.contains("key_id") && !page.contains("end_user"));
    for s in &samples {
        for k in s.labels.keys() {
            assert!(
                [
                    "route",
                    "model",
                    "provider",
                    "deployment",
                    "status",
                    "outcome",
                    "kind",
                    "currency",
                    "code",
                    "le",
                    "result",
                    "limit",
                    "stream",
                    "rule",
                    "method"
                ]
                .contains(&k.as_str()),
                "unexpected label {k} on {}",
                s.name
            );
        }
    }

    // Every service: gRPC RED metrics; the adapter's upstream calls; billing's ledger side.
    let (auth_m, _) = parse(&scrape(&auth).await);
    assert!(
        sum(
            &auth_m,
            "relay_grpc_server_requests_total",
            &[("method", "/relay.auth.v1.AuthService/Authenticate"), ("code", "0")]
        ) >= 1.0
    );
    let (routing_m, _) = parse(&scrape(&routing).await);
    assert!(
        sum(&routing_m, "relay_grpc_server_requests_total", &[("code", "0")]) >= 1.0,
        "routing is asked (the edge caches its answers)"
    );
    let (adapter_m, _) = parse(&scrape(&adapter).await);
    assert_eq!(
        sum(&adapter_m, "relay_adapter_upstream_requests_total", &[("provider", "mock"), ("status", "200")]),
        7.0
    );
    assert_eq!(
        sum(&adapter_m, "relay_adapter_upstream_duration_seconds_count", &[("provider", "mock")]),
        7.0
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let billing_m = loop {
        let (m, _) = parse(&scrape(&billing).await);
        if sum(&m, "relay_bus_consumer_pending_events", &[]) == 0.0
            && !m.iter().all(|s| s.name != "relay_bus_consumer_pending_events")
            || tokio::time::Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(sum(&billing_m, "relay_usage_events_total", &[("result", "inserted")]) >= 7.0);
    assert!(sum(&billing_m, "relay_billing_lag_seconds_count", &[]) >= 7.0);
    assert!(billing_m.iter().any(|s| s.name == "relay_bus_consumer_pending_events"), "consumer lag exported");

    // Dashboards and alert rules name only metrics some service exports.
    let exported: BTreeSet<String> = [&samples, &auth_m, &routing_m, &adapter_m, &billing_m]
        .iter()
        .flat_map(|m| {
            m.iter().map(|s| {
                let n = s.name.as_str();
                ["_bucket", "_count", "_sum"].iter().find_map(|x| n.strip_suffix(x)).unwrap_or(n).to_owned()
            })
        })
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for file in ["deploy/grafana/relay-overview.json", "deploy/prometheus/relay-alerts.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let named = named_metrics(&text);
        assert!(named.len() >= 8, "{file} names {named:?}");
        let missing: Vec<_> = named.difference(&exported).collect();
        assert!(missing.is_empty(), "{file} names metrics no service exports: {missing:?}");
    }
}

/// The second key of the access-log test: no content logging.
const QUIET_KEY: &str = "sk-e2e-quiet-key";

#[tokio::test]
async fn access_log_has_one_masked_line_per_request() {
    let mock = relay_test_support::MockOpenAi::start().await;
    let dir = temp_dir("access-log");
    let log = dir.join("access.jsonl");
    let quiet = relay_auth::hash_key(&relay_core::Secret::new(PEPPER), QUIET_KEY);
    let config = format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n[telemetry.access_log]\ntarget = \"{}\"\ncontent_keys = [\"e2e\"]\n{}\
         [[auth.keys]]\nid = \"quiet\"\nteam = \"team-e2e\"\norg = \"org-e2e\"\nhash = \"{quiet}\"\n{}",
        dir.join("relay.db").display(),
        log.display(),
        auth_section(),
        crate::upstream_sections(&mock)
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let c = client::http();
    let secret_text = "mail alice.smith@example.com card 4111 1111 1111 1111 token sk-live-abcdefghijklmnop";
    let send = |key: &'static str, body: Value| {
        c.post(format!("{}/v1/chat/completions", relay.http())).bearer_auth(key).json(&body)
    };
    // The opted-in key: its prompt and answer are logged, masked; the caller's trace id is kept.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = send(KEY, user("mock", secret_text))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let logged_id = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    // Another key: no content at all.
    let r = send(QUIET_KEY, user("mock", secret_text)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let quiet_id = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    // A refused key still gets its line, without the key.
    let r = send("sk-wrong-key-0123456789abcdef", user("mock", "x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let refused_id = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    relay.stop().await;

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let find = |id: &str| {
        let found: Vec<&Value> = lines.iter().filter(|l| l["request_id"] == id).collect();
        assert_eq!(found.len(), 1, "one line for {id}: {text}");
        found[0].clone()
    };
    for leaked in [
        KEY,
        "sk-wrong-key-0123456789abcdef",
        "alice.smith@example.com",
        "4111 1111 1111 1111",
        "sk-live-abcdefghijklmnop",
        "Bearer",
    ] {
        assert!(!text.contains(leaked), "the access log leaks {leaked}: {text}");
    }
    let line = find(&logged_id);
    let (p, o) = mock_usage(secret_text);
    assert_eq!((line["key_id"].as_str(), line["model"].as_str()), (Some("e2e"), Some("mock")));
    assert_eq!((line["input_tokens"].as_u64(), line["output_tokens"].as_u64()), (Some(p), Some(o)));
    assert_eq!(
        (line["status"].as_u64(), line["deployment"].as_str()),
        (Some(200), Some("gpt-mock-upstream@mock"))
    );
    assert_eq!(line["trace_id"], trace, "{line}");
    assert!(
        line["duration_ms"].as_u64().is_some()
            && line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z'))
    );
    let prompt = line["prompt"].as_str().unwrap();
    assert!(prompt.contains("[email]") && prompt.contains("[card]") && prompt.contains("mail"), "{prompt}");
    assert!(line["answer"].as_str().is_some_and(|a| a.contains("[email]")), "{line}");
    let quiet = find(&quiet_id);
    assert_eq!(quiet["key_id"], "quiet");
    assert!(quiet.get("prompt").is_none() && quiet.get("answer").is_none(), "{quiet}");
    let refused = find(&refused_id);
    assert_eq!(
        (refused["status"].as_u64(), refused["error_code"].as_str()),
        (Some(401), Some("invalid_api_key"))
    );
}
