//! The request scenario both deployment modes must pass, byte for byte and token for token.

use relay_core::pb::events::v1::Outcome;
use relay_proto::clients::GrpcBilling;
use relay_test_support::{MockOpenAi, echo};
use serde_json::json;

use crate::client::{chat, chat_stream, mock_usage, recorded_usage, user};

/// Model names the scenario expects the relay to route: `mock` → the mock OpenAI upstream.
pub const MODEL: &str = "mock";

/// Request ids of every authenticated request the scenario sent (each must yield one usage record).
pub async fn run(base: &str, billing: &GrpcBilling, mock: &MockOpenAi) -> Vec<String> {
    let c = crate::client::http();
    let mut sent = Vec::new();

    // Non-stream: exact text, exact usage, and the upstream got its own key and the upstream model name.
    let text = format!("hello relay {} world", uuid::Uuid::now_v7().simple());
    let a = chat(&c, base, user(MODEL, &text)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["choices"][0]["message"]["content"], echo(&text));
    let (p, cmp) = mock_usage(&text);
    assert_eq!(a.body["usage"]["prompt_tokens"], p);
    assert_eq!(a.body["usage"]["completion_tokens"], cmp);
    let up = mock.requests_containing(&text);
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].headers["authorization"], "Bearer mock-upstream-key");
    assert_eq!(up[0].body["model"], "gpt-mock-upstream");
    assert!(!format!("{:?}", up[0].headers).contains(crate::harness::KEY), "client key leaked upstream");
    let ev = recorded_usage(billing, &a.request_id).await;
    assert_eq!(
        (ev.outcome(), ev.key_id.as_str(), ev.team_id.as_str()),
        (Outcome::Success, "e2e", "team-e2e")
    );
    let u = ev.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (p, cmp));
    assert_eq!(ev.deployment_id, "gpt-mock-upstream@mock");
    sent.push(a.request_id);

    // Stream with a usage chunk requested: exact text in several chunks, exact usage, [DONE].
    let text = format!("stream me {} with several words", uuid::Uuid::now_v7().simple());
    let mut body = user(MODEL, &text);
    body["stream_options"] = json!({"include_usage": true});
    let s = chat_stream(&c, base, body).await;
    assert_eq!(s.text, echo(&text));
    assert!(s.content_chunks >= 3 && s.done && s.error.is_none(), "{s:?}");
    assert_eq!(s.finish.as_deref(), Some("stop"));
    let (p, cmp) = mock_usage(&text);
    let usage = s.usage.clone().expect("usage chunk");
    assert_eq!((usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()), (Some(p), Some(cmp)));
    let ev = recorded_usage(billing, &s.request_id).await;
    assert!(ev.stream && ev.time_to_first_byte_ms > 0);
    assert_eq!(ev.usage.unwrap().output_tokens, cmp);
    sent.push(s.request_id);

    // Stream without a usage chunk: the relay still asks upstream for usage (and records it) but the
    // client gets no chunk it did not ask for.
    let text = format!("quiet usage {}", uuid::Uuid::now_v7().simple());
    let s = chat_stream(&c, base, user(MODEL, &text)).await;
    assert_eq!(s.text, echo(&text));
    assert!(s.usage.is_none(), "usage chunk sent although not requested");
    assert_eq!(mock.requests_containing(&text)[0].body["stream_options"]["include_usage"], true);
    let ev = recorded_usage(billing, &s.request_id).await;
    assert_eq!(ev.usage.unwrap().input_tokens, mock_usage(&text).0);
    sent.push(s.request_id);

    // Upstream failures keep their meaning and shape.
    let a = chat(&c, base, user(MODEL, "boom [[mock status=500]]")).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.body["error"]["type"], "api_error");
    let ev = recorded_usage(billing, &a.request_id).await;
    assert_eq!((ev.outcome(), ev.http_status), (Outcome::Error, 502));
    sent.push(a.request_id);
    let a = chat(&c, base, user(MODEL, "slow down [[mock status=429]]")).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.body["error"]["type"], "rate_limit_error");
    sent.push(a.request_id);

    // A stream that dies after it started ends with an error event, never a clean finish or [DONE].
    let s = chat_stream(&c, base, user(MODEL, "die early please [[mock die_after=3]]")).await;
    assert!(s.error.is_some() && !s.done && s.finish.is_none(), "{s:?}");
    let ev = recorded_usage(billing, &s.request_id).await;
    assert_eq!(ev.outcome(), Outcome::Error);
    sent.push(s.request_id);

    // Client errors: answered by the relay, never forwarded, still accounted.
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(crate::harness::KEY)
        .header("content-type", "application/json")
        .body("{\"model\": \"x\", \"messa")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    sent.push(r.headers()["x-relay-request-id"].to_str().unwrap().to_owned());
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["type"], "invalid_request_error");
    let a = chat(&c, base, user("no-such-model", "hi")).await;
    assert_eq!((a.status, a.body["error"]["code"].as_str()), (404, Some("model_not_found")));
    sent.push(a.request_id);
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-wrong")
        .json(&user(MODEL, "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["type"], "authentication_error");

    // The client's x-request-id is echoed and kept for correlation, but never the billing key: three
    // calls with one client id are three billed requests, each with its own Relay id.
    let rid = format!("client-{}", uuid::Uuid::now_v7().simple());
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..3 {
        let r = c
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(crate::harness::KEY)
            .header("x-request-id", &rid)
            .json(&user(MODEL, &format!("named request {i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-request-id"], rid.as_str());
        let relay_id = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
        assert_eq!(uuid::Uuid::parse_str(&relay_id).unwrap().get_version_num(), 7);
        let ev = recorded_usage(billing, &relay_id).await;
        assert_eq!(ev.client_request_id, rid);
        assert!(ev.usage.unwrap().input_tokens > 0);
        ids.insert(relay_id.clone());
        sent.push(relay_id);
    }
    assert_eq!(ids.len(), 3);

    // A client that leaves mid-stream cancels the upstream call and is recorded as cancelled.
    let mut body = user(MODEL, "w1 w2 w3 w4 w5 w6 w7 w8 w9 [[mock chunk_delay_ms=200]]");
    body["stream"] = json!(true);
    let mut r = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(crate::harness::KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let rid = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    r.chunk().await.unwrap();
    drop(r);
    let ev = recorded_usage(billing, &rid).await;
    assert_eq!(ev.outcome(), Outcome::Cancelled);
    // Billed all the same: the input the adapter counted, and what was delivered before the client left.
    let u = ev.usage.unwrap();
    assert!(u.input_tokens > 0, "{u:?}");
    sent.push(rid);

    sent.extend(disconnects(base, billing, mock).await);
    sent.extend(hostile_fields(base, billing).await);

    sent
}

/// Clients that leave early are billed what the provider bills: a stream abandoned after four content
/// chunks is billed its input and the delivered output; a whole answer the client gave up on is drained
/// and billed the upstream's own usage; with `on_disconnect = "cancel"` it is billed its input.
async fn disconnects(base: &str, billing: &GrpcBilling, mock: &MockOpenAi) -> Vec<String> {
    let c = crate::client::http();
    let mut sent = Vec::new();

    let mut body = user(MODEL, "a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 [[mock chunk_delay_ms=100]]");
    body["stream"] = json!(true);
    let mut r = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(crate::harness::KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let rid = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    let mut content = 0;
    let mut buf = String::new();
    while content < 4 {
        buf.push_str(std::str::from_utf8(&r.chunk().await.unwrap().unwrap()).unwrap());
        content = buf
            .matches("\"content\":\"")
            .count()
            .saturating_sub(usize::from(buf.contains("\"content\":\"\"")));
    }
    drop(r);
    let ev = recorded_usage(billing, &rid).await;
    assert_eq!(ev.outcome(), Outcome::Cancelled);
    let u = ev.usage.unwrap();
    assert!(u.input_tokens > 0 && u.output_tokens >= 4, "input and delivered output billed: {u:?}");
    // Each word chunk is at most 3 tokens; one more chunk may have been in flight.
    assert!(u.output_tokens <= 3 * (content as u64 + 2), "only what was delivered: {u:?}");
    assert_eq!(u.output_source(), relay_core::pb::common::v1::UsageSource::Counted);
    sent.push(rid);

    // A whole answer the client stops waiting for: drained, billed the provider's usage.
    let text = format!("slow whole answer {} [[mock delay_ms=1200]]", uuid::Uuid::now_v7().simple());
    let quick = reqwest::Client::builder().timeout(std::time::Duration::from_millis(400)).build().unwrap();
    let err = quick
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(crate::harness::KEY)
        .json(&user(MODEL, &text))
        .send()
        .await;
    assert!(err.is_err(), "the client gave up");
    let rid = wait_for_record_of(billing, mock, &text).await;
    let ev = recorded_usage(billing, &rid).await;
    assert_eq!(ev.outcome(), Outcome::Cancelled);
    let (p, cmp) = mock_usage(&text);
    let u = ev.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (p, cmp), "the upstream's own usage");
    assert_eq!(u.input_source(), relay_core::pb::common::v1::UsageSource::Provider);
    sent.push(rid);

    // The same with the model group's `cancel` policy: the upstream is stopped, the input billed.
    let text = format!("cancelled whole answer {} [[mock delay_ms=1200]]", uuid::Uuid::now_v7().simple());
    let err = quick
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(crate::harness::KEY)
        .json(&user("mock-cancel", &text))
        .send()
        .await;
    assert!(err.is_err());
    let rid = wait_for_record_of(billing, mock, &text).await;
    let ev = recorded_usage(billing, &rid).await;
    let u = ev.usage.unwrap();
    assert_eq!(ev.outcome(), Outcome::Cancelled);
    assert!(u.input_tokens > 0 && u.output_tokens == 0, "{u:?}");
    sent.push(rid);
    sent
}

/// The billing id of the request whose upstream call carried `text` (the client never saw its headers).
async fn wait_for_record_of(billing: &GrpcBilling, mock: &MockOpenAi, text: &str) -> String {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let seen = mock.requests_containing(text);
        if let Some(id) =
            seen.first().and_then(|r| r.headers.get("x-request-id")?.to_str().ok().map(str::to_owned))
        {
            let req = relay_core::pb::billing::v1::GetUsageRequest { request_id: id.clone() };
            if relay_core::contracts::Billing::get_usage(billing, req).await.is_ok() {
                return id;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no usage record for `{text}`");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Fields a client controls that billing must store or refuse, without ever stalling the consumer.
async fn hostile_fields(base: &str, billing: &GrpcBilling) -> Vec<String> {
    let c = crate::client::http();
    let mut sent = Vec::new();
    for user_field in ["u".repeat(257), "nul\u{0}byte".to_owned(), "line\nbreak".to_owned()] {
        let mut body = user(MODEL, "hostile");
        body["user"] = json!(user_field);
        let a = chat(&c, base, body).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert_eq!(a.body["error"]["param"], "user");
        sent.push(a.request_id);
    }
    let a = chat(&c, base, user(&"m".repeat(300), "hi")).await;
    assert_eq!((a.status, a.body["error"]["param"].as_str()), (400, Some("model")), "{}", a.body);
    sent.push(a.request_id);
    // A NUL in a field billing stores (the model name) is stored, replaced, and the next event still flows.
    let a = chat(&c, base, user("mo\u{0}del", "hi")).await;
    assert_eq!(a.status, 404);
    recorded_usage(billing, &a.request_id).await;
    sent.push(a.request_id);
    let a = chat(&c, base, user(MODEL, "after the hostile ones")).await;
    assert_eq!(a.status, 200);
    recorded_usage(billing, &a.request_id).await;
    sent.push(a.request_id);
    sent
}
