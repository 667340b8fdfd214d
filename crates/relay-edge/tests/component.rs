//! Component tests: the edge router in process, with scripted fakes behind the contract traits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "component/harness.rs"]
mod harness;

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::http::Request;
use relay_core::pb::events::v1::Outcome;
use serde_json::{Value, json};
use tower::ServiceExt;

use harness::*;

#[tokio::test]
async fn fails_over_on_retryable_errors_before_the_first_byte() {
    let h = harness(1 << 20);
    let (status, headers, body) =
        send(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-failover", false))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "{\"ok\":true}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(*h.adapter.0.lock().unwrap(), ["broken", "good"]);
    assert_eq!(
        (&headers["x-relay-deployment"], &headers["x-relay-attempts"]),
        (&"good".to_string(), &"2".to_string())
    );
    let evs = events(&h).await;
    assert_eq!(evs.len(), 1);
    let log: Vec<_> = evs[0].attempt_log.iter().map(|a| (a.deployment_id.as_str(), a.answered)).collect();
    assert_eq!(log, [("broken", false), ("good", true)], "every attempt is in the usage event");
    assert_ne!(evs[0].attempt_log[0].error_code, 0);
    assert_eq!(
        (evs[0].attempts, evs[0].deployment_id.as_str(), evs[0].outcome()),
        (2, "good", Outcome::Success)
    );
    assert_eq!(evs[0].usage.unwrap().input_tokens, 7);
}

#[tokio::test]
async fn weights_share_traffic_and_a_failing_deployment_is_isolated() {
    let h = harness(1 << 20);
    for _ in 0..400 {
        let (status, headers, _) =
            send(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-weighted", false))).await;
        assert_eq!(status, 200);
        assert!(["w3", "w1"].contains(&headers["x-relay-deployment"].as_str()));
    }
    let calls = h.adapter.0.lock().unwrap().clone();
    let share = calls.iter().filter(|c| *c == "w3").count() as f64 / calls.len() as f64;
    assert!((share - 0.75).abs() < 0.08, "weight 3 of 4 served {share} of 400");

    // `broken` is first by weight but fails every time: after three failures it is isolated, so the next
    // requests go straight to `good` (no failed round trip first).
    h.adapter.0.lock().unwrap().clear();
    for _ in 0..10 {
        let (status, headers, _) =
            send(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-failover", false))).await;
        assert_eq!((status.as_u16(), headers["x-relay-deployment"].as_str()), (200, "good"));
    }
    let calls = h.adapter.0.lock().unwrap().clone();
    assert_eq!(calls.iter().filter(|c| *c == "broken").count(), 3, "{calls:?}");
}

#[tokio::test]
async fn a_request_can_pick_its_strategy() {
    let h = harness(1 << 20);
    let priority = [("x-relay-strategy", "priority")];
    for _ in 0..50 {
        let (status, headers, _) =
            send_with(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-weighted", false)), &priority)
                .await;
        assert_eq!(
            (status.as_u16(), headers["x-relay-deployment"].as_str()),
            (200, "w3"),
            "given order, not weights"
        );
    }
    // Cache affinity: one session, one deployment, across 100 requests.
    let session = [("x-relay-session", "conversation-42")];
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let (_, headers, _) =
            send_with(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-weighted", false)), &session).await;
        seen.insert(headers["x-relay-deployment"].clone());
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    let bad = [("x-relay-strategy", "fastest-please")];
    let (status, _, body) =
        send_with(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-weighted", false)), &bad).await;
    assert_eq!(status.as_u16(), 400, "{body}");
    assert!(body.contains("x-relay-strategy"), "{body}");
}

#[tokio::test]
async fn a_key_pinned_to_a_region_never_leaves_it_even_on_failover() {
    let h = harness(1 << 20);
    for _ in 0..20 {
        let (status, headers, _) =
            send(&h, "sk-eu", "/v1/chat/completions", Some(chat("ok-regions", false))).await;
        assert_eq!((status.as_u16(), headers["x-relay-deployment"].as_str()), (200, "good-eu"));
    }
    // In every strategy, forced per request: never the US deployment, whatever it scores.
    for strategy in ["weighted", "priority", "cost", "latency", "balanced", "headroom"] {
        for _ in 0..5 {
            let (status, headers, _) = send_with(
                &h,
                "sk-eu",
                "/v1/chat/completions",
                Some(chat("ok-regions", false)),
                &[("x-relay-strategy", strategy)],
            )
            .await;
            assert_eq!(
                (status.as_u16(), headers["x-relay-deployment"].as_str()),
                (200, "good-eu"),
                "{strategy}"
            );
        }
    }
    let calls = h.adapter.0.lock().unwrap().clone();
    assert!(!calls.contains(&"good".to_string()), "a US deployment was tried: {calls:?}");
    let (status, _, body) = send(&h, "sk-eu", "/v1/chat/completions", Some(chat("ok-us-only", false))).await;
    assert_eq!(status.as_u16(), 403);
    assert!(body.contains("regions this key may use (eu)"), "{body}");
    let (status, _, _) = send(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-us-only", false))).await;
    assert_eq!(status.as_u16(), 200, "unpinned keys go anywhere");
}

#[tokio::test]
async fn group_timeouts_fail_over_slow_deployments_and_end_stalled_streams() {
    let h = harness(1 << 20);
    let t = std::time::Instant::now();
    let (status, headers, _) =
        send(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-timeouts", false))).await;
    assert_eq!(
        (status.as_u16(), headers["x-relay-deployment"].as_str(), headers["x-relay-attempts"].as_str()),
        (200, "good", "2")
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "the slow deployment was given up after 100 ms");
    for model in ["ok-stalls", "ok-drags"] {
        let (status, _, body) = send(&h, "sk-all", "/v1/chat/completions", Some(chat(model, true))).await;
        assert_eq!(status.as_u16(), 200);
        assert!(body.starts_with("data: {\"x\":1}"), "{model}: {body}");
        assert!(body.contains("took too long") && !body.contains("[DONE]"), "{model}: {body}");
    }
    let evs = events(&h).await;
    assert!(evs.iter().filter(|e| e.outcome() == Outcome::Error).count() >= 2);
}

#[tokio::test]
async fn non_retryable_upstream_errors_keep_their_status_and_do_not_fail_over() {
    let h = harness(1 << 20);
    let (status, _, body) = send(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-rejects", false))).await;
    assert_eq!(status, 422);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["message"], "bad schema");
    assert_eq!(*h.adapter.0.lock().unwrap(), ["rejects"]);
    let ev = &events(&h).await[0];
    assert_eq!(ev.outcome(), Outcome::Error);
    // The upstream refused before accepting: providers bill nothing, and neither does Relay.
    assert_eq!(ev.usage.unwrap_or_default().input_tokens, 0);
}

#[tokio::test]
async fn streams_forward_bytes_and_mid_stream_errors_end_without_done() {
    let h = harness(1 << 20);
    let (status, headers, body) =
        send(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-good", true))).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(body, "data: {\"x\":1}\n\ndata: [DONE]\n\n");

    let (status, _, body) = send(&h, "sk-all", "/v1/chat/completions", Some(chat("ok-dies", true))).await;
    assert_eq!(status, 200);
    let (first, rest) = body.split_once("\n\n").unwrap();
    assert_eq!(first, "data: {\"a\":1}");
    let err: Value = serde_json::from_str(rest.trim().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["type"], "api_error");
    assert!(!body.contains("[DONE]"));
    let evs = events(&h).await;
    assert_eq!(evs.iter().map(|e| e.outcome()).collect::<Vec<_>>(), [Outcome::Success, Outcome::Error]);
}

#[tokio::test]
async fn client_errors_are_openai_shaped_and_never_reach_the_adapter() {
    let h = harness(256);
    let big = json!({"model": "ok-good", "messages": [{"role": "user", "content": "x".repeat(1000)}]});
    let cases = [
        ("sk-all", Some(big), 413, "request_too_large"),
        ("sk-all", Some(json!({"model": "ok-good"})), 400, "invalid_request"),
        ("sk-all", Some(json!({"messages": [{"role": "user", "content": "x"}]})), 400, "invalid_request"),
        ("sk-all", Some(chat("nope", false)), 404, "model_not_found"),
        ("sk-limited", Some(chat("secret-model", false)), 403, "permission_denied"),
        ("sk-bad", Some(chat("ok-good", false)), 401, "invalid_api_key"),
    ];
    for (key, body, want, code) in cases {
        let (status, headers, text) = send(&h, key, "/v1/chat/completions", body).await;
        assert_eq!(status.as_u16(), want, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], code, "{text}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!text.contains(key) || key == "sk-all", "key echoed: {text}");
        assert!(headers.contains_key("x-request-id"));
    }
    assert!(h.adapter.0.lock().unwrap().is_empty());
    // Authenticated failures are accounted; the unauthenticated one is not.
    assert_eq!(events(&h).await.len(), 5);
}

#[tokio::test]
async fn keys_are_cached_and_models_are_filtered_per_key() {
    let h = harness(1 << 20);
    let (status, _, body) = send(&h, "sk-limited", "/v1/models", None).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect::<Vec<_>>(),
        ["ok-good"]
    );
    let (status, _, _) = send(&h, "sk-limited", "/v1/models/secret-model", None).await;
    assert_eq!(status, 404);
    let (status, _, body) = send(&h, "sk-all", "/v1/models/secret-model", None).await;
    assert_eq!(
        (status.as_u16(), serde_json::from_str::<Value>(&body).unwrap()["object"].as_str()),
        (200, Some("model"))
    );
    // Three requests with sk-limited and sk-all: auth was asked once per key.
    assert_eq!(h.auth.0.load(Ordering::SeqCst), 2);
    let (status, _, body) = send(&h, "sk-all", "/v2/whatever", None).await;
    assert_eq!(status, 404);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["type"], "not_found_error");
}

fn anthropic(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn anthropic_routes_answer_in_anthropic_shape() {
    let h = harness(1 << 20);
    // Errors on /v1/messages are Anthropic-shaped, whatever went wrong.
    for (key, body, want, kind) in [
        ("sk-bad", anthropic("ok-good", false), 401, "authentication_error"),
        (
            "sk-all",
            json!({"model": "ok-good", "messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_request_error",
        ),
        ("sk-all", anthropic("nope", false), 404, "not_found_error"),
        ("sk-all", anthropic("ok-rejects", false), 422, "invalid_request_error"),
    ] {
        let (status, _, text) = send(&h, key, "/v1/messages", Some(body)).await;
        assert_eq!(status.as_u16(), want, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!((v["type"].as_str(), v["error"]["type"].as_str()), (Some("error"), Some(kind)), "{text}");
    }
    // A stream that dies mid-way ends with an Anthropic `event: error`.
    let (status, _, body) =
        send(&h, "sk-all", "/v1/messages?beta=true", Some(anthropic("ok-dies", true))).await;
    assert_eq!(status, 200);
    assert!(body.ends_with("\n\n") && body.contains("event: error\ndata: {"), "{body}");
    let v: Value = serde_json::from_str(body.rsplit("data: ").next().unwrap().trim()).unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    // Token counting goes to the routed deployment.
    let (status, _, text) = send(
        &h,
        "sk-all",
        "/v1/messages/count_tokens",
        Some(json!({"model": "ok-good", "messages": [{"role": "user", "content": "count"}]})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(serde_json::from_str::<Value>(&text).unwrap()["input_tokens"].as_u64().unwrap() > 0);
    assert!(h.adapter.0.lock().unwrap().contains(&"count:good".to_string()));
}

#[tokio::test]
async fn responses_route_checks_input_and_streams_errors_in_its_shape() {
    let h = harness(1 << 20);
    let (status, _, text) = send(&h, "sk-all", "/v1/responses", Some(json!({"model": "ok-good"}))).await;
    assert_eq!(status, 400);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["param"], "input");
    let (status, _, body) =
        send(&h, "sk-all", "/v1/responses", Some(json!({"model": "ok-dies", "input": "x", "stream": true})))
            .await;
    assert_eq!(status, 200);
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{body}");
}

#[tokio::test]
async fn limits_refuse_with_openai_headers_and_addresses_are_checked() {
    let h = harness(1 << 20);
    let (status, headers, _) =
        send(&h, "sk-rpm1", "/v1/chat/completions", Some(chat("ok-good", false))).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-ratelimit-limit-requests"], "1");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    let (status, headers, body) =
        send(&h, "sk-rpm1", "/v1/chat/completions", Some(chat("ok-good", false))).await;
    assert_eq!(status, 429, "{body}");
    assert!(headers.contains_key("retry-after") && headers.contains_key("x-ratelimit-reset-requests"));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["type"], "rate_limit_error");
    let evs = events(&h).await;
    assert_eq!(evs.last().unwrap().error_code, relay_core::pb::common::v1::ErrorCode::RateLimited as i32);

    // No client address known (in process): an allowlisted key is refused. Behind a trusted proxy
    // (127.0.0.0/8 here), the hop the proxy appended is the client; what the client wrote left of it is not.
    let (status, _, body) = send(&h, "sk-office", "/v1/models", None).await;
    assert_eq!(status, 403, "{body}");
    let via = |peer: &str, xff: &str| {
        let mut req = Request::builder()
            .uri("/v1/models")
            .header("authorization", "Bearer sk-office")
            .header("x-forwarded-for", xff)
            .body(Body::empty())
            .unwrap();
        let peer: std::net::SocketAddr = format!("{peer}:4000").parse().unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let edge = h.edge.clone();
        async move { relay_edge::router(edge).oneshot(req).await.unwrap().status() }
    };
    assert_eq!(via("127.0.0.1", "203.0.113.9, 10.1.2.3").await, 200, "the proxy saw 10.1.2.3");
    assert_eq!(via("127.0.0.1", "10.1.2.3, 203.0.113.9").await, 403, "a forged first entry is not believed");
    assert_eq!(via("127.0.0.1", "10.1.2.3, 127.0.0.5").await, 200, "trusted hops are skipped");
    assert_eq!(via("198.51.100.7", "10.1.2.3").await, 403, "an untrusted peer's header is ignored");
    assert_eq!(via("127.0.0.1", "10.1.2.3, bogus").await, 403, "garbage makes the client unknown");
}

#[tokio::test]
async fn invalidation_drops_cached_keys_at_once() {
    let h = harness(1 << 20);
    for _ in 0..3 {
        assert_eq!(send(&h, "sk-all", "/v1/models", None).await.0, 200);
    }
    assert_eq!(h.auth.0.load(Ordering::SeqCst), 1, "cached after the first request");
    h.edge.invalidate("team:team-1");
    assert_eq!(send(&h, "sk-all", "/v1/models", None).await.0, 200);
    assert_eq!(h.auth.0.load(Ordering::SeqCst), 2, "asked auth again after the invalidation");
}

#[tokio::test]
async fn reservations_read_the_limit_the_upstream_obeys_and_absurd_limits_are_refused() {
    let h = harness(1 << 20);
    let reserved = |key: &'static str, path: &'static str, body: Value| {
        let h = &h;
        async move {
            let len = body.to_string().len() as u64;
            let (status, headers, text) = send(h, key, path, Some(body)).await;
            assert_eq!(status, 200, "{text}");
            let left: u64 = headers["x-ratelimit-remaining-tokens"].parse().unwrap();
            10_000_000 - left - len
        }
    };
    let input = json!([{"role": "user", "content": "hi"}]);
    // Responses obeys only `max_output_tokens`: a stray `max_tokens: 1` must not shrink the reservation
    // while the upstream is uncapped; unset, the deployment's limit is reserved (and sent upstream).
    let stray = json!({"model": "ok-capped", "input": input, "max_tokens": 1});
    assert_eq!(reserved("sk-tpm-1", "/v1/responses", stray).await, 700);
    let set = json!({"model": "ok-capped", "input": input, "max_output_tokens": 50});
    assert_eq!(reserved("sk-tpm-2", "/v1/responses", set).await, 50);
    // OpenAI chat: `max_completion_tokens` wins over `max_tokens`, times `n` answers.
    let chat = json!({"model": "ok-capped", "messages": input, "max_completion_tokens": 10, "max_tokens": 999, "n": 3});
    assert_eq!(reserved("sk-tpm-3", "/v1/chat/completions", chat).await, 30);
    let unset = json!({"model": "ok-capped", "messages": input, "n": 2});
    assert_eq!(reserved("sk-tpm-4", "/v1/chat/completions", unset).await, 1400);

    for (path, field, value) in [
        ("/v1/chat/completions", "max_tokens", json!(u64::MAX)),
        ("/v1/chat/completions", "max_completion_tokens", json!(-1)),
        ("/v1/chat/completions", "max_tokens", json!("100")),
        ("/v1/chat/completions", "n", json!(1000)),
        ("/v1/responses", "max_output_tokens", json!(1e300)),
        ("/v1/messages", "max_tokens", json!(u64::MAX)),
    ] {
        let mut body = if path == "/v1/responses" {
            json!({"model": "ok-capped", "input": "hi"})
        } else {
            json!({"model": "ok-capped", "messages": input, "max_tokens": 10})
        };
        body[field] = value.clone();
        let (status, _, text) = send(&h, "sk-tpm-5", path, Some(body)).await;
        assert_eq!(status, 400, "{path} {field}={value}: {text}");
        let err: Value = serde_json::from_str(&text).unwrap();
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{path} {field}: {text}");
    }
}
