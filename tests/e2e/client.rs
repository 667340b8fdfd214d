//! A plain HTTP client for the OpenAI API as a test sees it: responses, SSE streams, usage lookups.

use std::time::Duration;

use relay_core::contracts::Billing as _;
use relay_core::pb::billing::v1::GetUsageRequest;
use relay_core::pb::events::v1::UsageEvent;
use serde_json::{Value, json};

use crate::harness::KEY;

pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

pub struct Answer {
    pub status: u16,
    pub request_id: String,
    pub body: Value,
}

pub async fn chat(c: &reqwest::Client, base: &str, body: Value) -> Answer {
    let r = c.post(format!("{base}/v1/chat/completions")).bearer_auth(KEY).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let request_id = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    let body = r.json().await.unwrap_or(Value::Null);
    Answer { status, request_id, body }
}

pub fn user(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

#[derive(Debug, Default)]
pub struct Streamed {
    pub request_id: String,
    pub text: String,
    pub finish: Option<String>,
    pub usage: Option<Value>,
    pub error: Option<Value>,
    pub content_chunks: usize,
    pub done: bool,
}

/// Sends a streaming request and assembles the answer from the SSE events.
pub async fn chat_stream(c: &reqwest::Client, base: &str, mut body: Value) -> Streamed {
    body["stream"] = json!(true);
    let mut r =
        c.post(format!("{base}/v1/chat/completions")).bearer_auth(KEY).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "stream refused");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut out = Streamed {
        request_id: r.headers()["x-relay-request-id"].to_str().unwrap().to_owned(),
        ..Default::default()
    };
    let mut buf = String::new();
    while let Some(bytes) = r.chunk().await.unwrap() {
        buf.push_str(std::str::from_utf8(&bytes).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event
                .trim()
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"));
            if data == "[DONE]" {
                out.done = true;
                continue;
            }
            assert!(!out.done, "event after [DONE]");
            let v: Value = serde_json::from_str(data).unwrap();
            if v.get("error").is_some() {
                out.error = Some(v["error"].clone());
                continue;
            }
            if !v["usage"].is_null() {
                out.usage = Some(v["usage"].clone());
            }
            for ch in v["choices"].as_array().unwrap() {
                if let Some(t) = ch["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
                    out.text.push_str(t);
                    out.content_chunks += 1;
                }
                if let Some(f) = ch["finish_reason"].as_str() {
                    out.finish = Some(f.to_owned());
                }
            }
        }
    }
    out
}

/// Polls billing until the usage event of `request_id` is recorded.
pub async fn recorded_usage(billing: &relay_proto::clients::GrpcBilling, request_id: &str) -> UsageEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match billing.get_usage(GetUsageRequest { request_id: request_id.to_owned() }).await {
            Ok(ev) => return ev,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert!(
                    matches!(e.code, relay_core::ErrorCode::NotFound | relay_core::ErrorCode::Unavailable),
                    "{e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("usage of {request_id} never recorded: {e:?}"),
        }
    }
}

/// The `server.service_token` of every split-process test config.
pub const SERVICE_TOKEN: &str = "relay-test-service-token";

pub fn billing_client(grpc: &str) -> relay_proto::clients::GrpcBilling {
    let token = relay_core::Secret::new(SERVICE_TOKEN);
    relay_proto::clients::GrpcBilling::new(relay_proto::clients::channel(grpc, Some(&token)).unwrap())
}

/// The mock's usage for a single user message `text`: prompt = 1000 + words, completion = reply words.
pub fn mock_usage(text: &str) -> (u64, u64) {
    let reply = relay_test_support::echo(text);
    (1000 + text.split_whitespace().count() as u64, reply.split(' ').count() as u64)
}

/// A call with a bearer key and an optional JSON body: status and body text.
pub async fn send(
    method: reqwest::Method,
    base: &str,
    key: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let mut req = http().request(method, format!("{base}{path}")).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// As [`send`], the body read as JSON (`null` when it is not).
pub async fn send_json(
    method: reqwest::Method,
    base: &str,
    key: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (status, text) = send(method, base, key, path, body).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
