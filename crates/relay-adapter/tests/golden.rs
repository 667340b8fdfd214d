//! Golden tests for every inbound × upstream pair, whole and streamed.
//!
//! Each case sends a client request (tests/golden/requests/<inbound>.json: system prompts, multi-turn,
//! images, tool calls and results, sampling and limits) through the adapter to a recording upstream that
//! replays a provider answer (tests/golden/upstream/: thinking, text, a streamed tool call, cached and
//! reasoning usage). The converted upstream request and the client's answer must equal the files in
//! tests/golden/<inbound>_to_<upstream>_<mode>/. Same protocol in and out must be byte-exact instead.
//! `UPDATE_GOLDEN=1 cargo test -p relay-adapter --test golden` rewrites the files (review the diff).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use futures_util::StreamExt;
use relay_adapter::{AdapterConfig, AdapterService};
use relay_core::contracts::Adapter;
use relay_core::pb::adapter::v1::{ChatRequest, chat_event::Event};
use relay_core::pb::common::v1::{Protocol, TokenUsage};
use relay_core::pb::routing::v1::Deployment;
use serde_json::{Value, json};

const INBOUND: [(&str, Protocol); 3] = [
    ("openai", Protocol::OpenaiChat),
    ("anthropic", Protocol::AnthropicMessages),
    ("responses", Protocol::OpenaiResponses),
];
const UPSTREAMS: [&str; 3] = ["openai", "anthropic", "gemini"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[derive(Clone, Default)]
struct Upstream {
    reply: Arc<Mutex<(u16, String)>>,
    seen: Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>,
}

async fn upstream() -> (Upstream, String) {
    let up = Upstream::default();
    let state = up.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
        let state = state.clone();
        async move {
            state.seen.lock().unwrap().push((uri.to_string(), headers, body));
            let (status, text) = state.reply.lock().unwrap().clone();
            let kind = if text.starts_with('{') { "application/json" } else { "text/event-stream" };
            axum::http::Response::builder()
                .status(status)
                .header("content-type", kind)
                .header("retry-after", "7")
                // Only read when the status is a redirect (which the adapter must not follow).
                .header("location", "/redirected")
                .body(axum::body::Body::from(text))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (up, format!("http://{addr}"))
}

fn adapter(base: &str) -> AdapterService {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg: AdapterConfig = serde_json::from_value(json!({"providers": [
        {"name": "openai", "kind": "openai", "base_url": format!("{base}/v1"), "api_key": "k-openai"},
        {"name": "anthropic", "kind": "anthropic", "base_url": base, "api_key": "k-anthropic"},
        {"name": "gemini", "kind": "gemini", "base_url": format!("{base}/v1beta"), "api_key": "k-gemini"},
    ]}))
    .unwrap();
    AdapterService::new(&cfg).unwrap()
}

fn request(protocol: Protocol, upstream: &str, body: Bytes, stream: bool) -> ChatRequest {
    ChatRequest {
        request_id: "req-golden".into(),
        protocol: protocol as i32,
        body,
        deployment: Some(Deployment {
            id: format!("up-model@{upstream}"),
            provider: upstream.into(),
            upstream_model: "up-model".into(),
            weight: 1,
            ..Default::default()
        }),
        stream,
        client_wants_usage: true,
        passthrough_headers: [("anthropic-beta".to_string(), "beta-flag-1".to_string())].into(),
        client_model: "client-model".into(),
    }
}

struct Answer {
    bytes: Vec<u8>,
    usage: Option<TokenUsage>,
    finishes: Vec<i32>,
    errors: Vec<String>,
}

async fn call(a: &AdapterService, req: ChatRequest) -> Answer {
    let mut events = a.chat(req).await.unwrap();
    let mut out = Answer { bytes: vec![], usage: None, finishes: vec![], errors: vec![] };
    while let Some(ev) = events.next().await {
        match ev.event.unwrap() {
            Event::Chunk(c) => out.bytes.extend_from_slice(&c.data),
            Event::Usage(u) => out.usage = Some(u),
            Event::Finish(f) => out.finishes.push(f.reason),
            Event::Error(e) => out.errors.push(e.message),
            Event::Start(_) => {}
        }
    }
    out
}

/// Timestamps and generated ids vary per run; everything else must not.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "created" || k == "created_at" {
                    *x = json!(0);
                } else {
                    normalize(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        Value::String(s) if s.starts_with("call_") && s.len() == 37 => *s = "call_<generated>".into(),
        _ => {}
    }
}

/// The client answer as stable text: whole answers pretty-printed; streams one event per line block.
fn render(bytes: &[u8], stream: bool) -> String {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    if !stream {
        let mut v: Value = serde_json::from_str(&text).unwrap();
        normalize(&mut v);
        return serde_json::to_string_pretty(&v).unwrap() + "\n";
    }
    let mut out = String::new();
    for event in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        for line in event.lines() {
            match line.strip_prefix("data: ").map(serde_json::from_str::<Value>) {
                Some(Ok(mut v)) => {
                    normalize(&mut v);
                    out.push_str(&format!("data: {v}\n"));
                }
                _ => out.push_str(&format!("{line}\n")),
            }
        }
        out.push('\n');
    }
    out
}

fn check(path: &Path, actual: &str) -> Option<String> {
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        return None;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    (expected != actual)
        .then(|| format!("{} differs (UPDATE_GOLDEN=1 to regenerate):\n{actual}", path.display()))
}

const EXACT_USAGE: (u64, u64, u64) = (120, 30, 100);

#[tokio::test]
async fn every_conversion_pair_matches_its_golden_files() {
    let (up, base) = upstream().await;
    let a = adapter(&base);
    let mut failures = Vec::new();
    for (inbound, protocol) in INBOUND {
        let client = std::fs::read(dir().join(format!("requests/{inbound}.json"))).unwrap();
        for upstream_kind in UPSTREAMS {
            if (inbound, upstream_kind) == ("openai", "openai")
                || (inbound, upstream_kind) == ("anthropic", "anthropic")
            {
                continue; // byte-exact pass-through, tested below
            }
            for stream in [false, true] {
                let mode = if stream { "stream" } else { "whole" };
                let fixture = if stream {
                    format!("{upstream_kind}_stream.txt")
                } else {
                    format!("{upstream_kind}_whole.json")
                };
                *up.reply.lock().unwrap() =
                    (200, std::fs::read_to_string(dir().join("upstream").join(fixture)).unwrap());
                up.seen.lock().unwrap().clear();
                let mut body: Value = serde_json::from_slice(&client).unwrap();
                body["stream"] = json!(stream);
                let ans = call(&a, request(protocol, upstream_kind, body.to_string().into(), stream)).await;
                let case = dir().join(format!("{inbound}_to_{upstream_kind}_{mode}"));
                assert!(ans.errors.is_empty(), "{inbound}->{upstream_kind} {mode}: {:?}", ans.errors);
                let (url, headers, sent) = up.seen.lock().unwrap().pop().unwrap();
                let sent: Value = serde_json::from_slice(&sent).unwrap();
                let request_doc = json!({"url": url, "body": sent});
                failures.extend(check(
                    &case.join("upstream_request.json"),
                    &(serde_json::to_string_pretty(&request_doc).unwrap() + "\n"),
                ));
                failures.extend(check(&case.join("client_response.txt"), &render(&ans.bytes, stream)));
                // Credentials are the upstream's own, never the client's.
                let auth = ["authorization", "x-api-key", "x-goog-api-key"]
                    .iter()
                    .filter_map(|h| headers.get(*h))
                    .count();
                assert_eq!(auth, 1, "{inbound}->{upstream_kind}: one credential header");
                let u = ans.usage.unwrap();
                assert_eq!(
                    (u.input_tokens, u.output_tokens, u.cached_input_tokens),
                    EXACT_USAGE,
                    "{inbound}->{upstream_kind} {mode}"
                );
                assert_eq!(
                    ans.finishes,
                    [relay_core::pb::adapter::v1::FinishReason::ToolCalls as i32],
                    "{inbound}->{upstream_kind} {mode}"
                );
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn same_protocol_is_forwarded_byte_for_byte() {
    let (up, base) = upstream().await;
    let a = adapter(&base);
    // Odd spacing, key order, number formats, unknown fields, cache_control and signatures must survive.
    let openai = br#"{ "model" :"client-model","messages":[{"role":"user","content":"hi","x_vendor":{"b":1.50,"a":[1e3]}}],
        "logit_bias":{"50256":-100},"stream":true,"seed":7 }"#;
    let anthropic = br#"{"model":"client-model","max_tokens":64,"stream":true,"context_management":{"edits":[{"type":"clear_tool_uses_20250919"}]},
        "messages":[{"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral","ttl":"1h"}}]},
        {"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":"EqQBCkYIBxgCKkD+/=="}]}],"unknown_field":[1,2.0]}"#;
    for (protocol, provider, body, fixture) in [
        (Protocol::OpenaiChat, "openai", &openai[..], "openai_stream.txt"),
        (Protocol::AnthropicMessages, "anthropic", &anthropic[..], "anthropic_stream.txt"),
    ] {
        let reply = std::fs::read_to_string(dir().join("upstream").join(fixture)).unwrap();
        *up.reply.lock().unwrap() = (200, reply.clone());
        up.seen.lock().unwrap().clear();
        let ans = call(&a, request(protocol, provider, Bytes::copy_from_slice(body), true)).await;
        let (_, headers, sent) = up.seen.lock().unwrap().pop().unwrap();
        let mut expected =
            String::from_utf8(body.to_vec()).unwrap().replacen("\"client-model\"", "\"up-model\"", 1);
        if protocol == Protocol::OpenaiChat {
            // The one addition: ask for the usage chunk so usage is exact.
            let end = expected.rfind('}').unwrap();
            expected.insert_str(end, ",\"stream_options\":{\"include_usage\":true}");
        } else {
            assert_eq!(headers["anthropic-beta"], "beta-flag-1", "beta flags reach Anthropic");
            assert_eq!(headers["anthropic-version"], "2023-06-01");
        }
        assert_eq!(String::from_utf8(sent.to_vec()).unwrap(), expected, "{provider}: request bytes");
        let mut reply = reply;
        if protocol == Protocol::AnthropicMessages {
            // The one change: message_delta's usage gets the input tokens message_start reported (some
            // clients read usage only there); every other byte is the upstream's.
            let before = r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":30}}"#;
            let after = r#"data: {"delta":{"stop_reason":"tool_use","stop_sequence":null},"type":"message_delta","usage":{"cache_read_input_tokens":100,"input_tokens":20,"output_tokens":30}}"#;
            assert!(reply.contains(before), "fixture changed");
            reply = reply.replace(before, after);
        }
        assert_eq!(String::from_utf8(ans.bytes).unwrap(), reply, "{provider}: answer bytes");
        let u = ans.usage.unwrap();
        assert_eq!((u.input_tokens, u.output_tokens, u.cached_input_tokens), EXACT_USAGE);
    }
}

#[tokio::test]
async fn upstream_errors_keep_status_and_retry_after() {
    let (up, base) = upstream().await;
    let a = adapter(&base);
    let client = std::fs::read(dir().join("requests/anthropic.json")).unwrap();
    for (status, code) in [
        (429, "UpstreamRateLimited"),
        (400, "UpstreamClientError"),
        (529, "UpstreamServerError"),
        (500, "UpstreamServerError"),
    ] {
        *up.reply.lock().unwrap() =
            (status, r#"{"type":"error","error":{"type":"x","message":"upstream says no"}}"#.into());
        for upstream_kind in UPSTREAMS {
            let Err(e) = a
                .chat(request(Protocol::AnthropicMessages, upstream_kind, client.clone().into(), true))
                .await
            else {
                panic!("{upstream_kind} {status}: no error")
            };
            assert_eq!(format!("{:?}", e.code), code);
            assert_eq!(e.upstream_status, Some(status));
            assert_eq!(e.retry_after_secs, Some(7));
            assert_eq!(e.message.contains("upstream says no"), status < 500, "5xx bodies are not relayed");
        }
    }
    // Relay's own provider credential refused: never the caller's 401/403, never the provider's message
    // (it may quote the key), retryable so the next deployment is tried.
    for status in [401, 403] {
        *up.reply.lock().unwrap() =
            (status, r#"{"error":{"message":"Incorrect API key provided: sk-abc***xyz"}}"#.into());
        for upstream_kind in UPSTREAMS {
            let Err(e) = a
                .chat(request(Protocol::AnthropicMessages, upstream_kind, client.clone().into(), false))
                .await
            else {
                panic!("{upstream_kind} {status}: no error")
            };
            assert!(e.code.is_retryable() && e.http_status() == 503, "{upstream_kind} {status}: {e:?}");
            assert!(!e.message.contains("sk-abc"), "{}", e.message);
            assert_eq!(e.upstream_status, Some(status));
        }
    }
}

#[tokio::test]
async fn truncated_and_failing_streams_end_in_errors() {
    let (up, base) = upstream().await;
    let a = adapter(&base);
    let client: Bytes = std::fs::read(dir().join("requests/openai.json")).unwrap().into();
    for upstream_kind in UPSTREAMS {
        let full =
            std::fs::read_to_string(dir().join(format!("upstream/{upstream_kind}_stream.txt"))).unwrap();
        // Cut after the first event: no [DONE] / message_stop / finish reason.
        let sep = if upstream_kind == "gemini" { "\r\n\r\n" } else { "\n\n" };
        let first = full.split(sep).next().unwrap().to_owned() + sep;
        *up.reply.lock().unwrap() = (200, first);
        for inbound in [Protocol::OpenaiChat, Protocol::AnthropicMessages] {
            let body = if inbound == Protocol::OpenaiChat {
                client.clone()
            } else {
                std::fs::read(dir().join("requests/anthropic.json")).unwrap().into()
            };
            let ans = call(&a, request(inbound, upstream_kind, body, true)).await;
            assert_eq!(ans.errors.len(), 1, "{upstream_kind}: a truncated stream must end in an error");
            // Still billed: what the upstream produced before the cut, counted by Relay.
            let u = ans.usage.expect("a cut stream still reports usage");
            assert!(u.input_tokens > 0, "{upstream_kind}: {u:?}");
            let text = String::from_utf8_lossy(&ans.bytes);
            assert!(!text.contains("[DONE]") && !text.contains("message_stop"), "{upstream_kind}: {text}");
        }
    }
    // An in-band error event mid-stream.
    let mid = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5}}}\n\n\
               event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    *up.reply.lock().unwrap() = (200, mid.into());
    let ans = call(&a, request(Protocol::OpenaiChat, "anthropic", client.clone(), true)).await;
    assert_eq!(ans.errors.len(), 1);
}

#[tokio::test]
async fn upstream_redirects_are_not_followed() {
    // Following would send the provider's key (`x-api-key`, `api-key`, `x-goog-api-key` survive a
    // cross-host redirect) wherever the Location points, and turn the POST into a GET.
    let (up, base) = upstream().await;
    let a = adapter(&base);
    let client = std::fs::read(dir().join("requests/openai.json")).unwrap();
    for status in [301, 302, 307, 308] {
        *up.reply.lock().unwrap() = (status, "{}".into());
        for upstream_kind in UPSTREAMS {
            up.seen.lock().unwrap().clear();
            let Err(e) =
                a.chat(request(Protocol::OpenaiChat, upstream_kind, client.clone().into(), false)).await
            else {
                panic!("{upstream_kind} {status}: no error")
            };
            assert_eq!(format!("{:?}", e.code), "UpstreamServerError", "{upstream_kind} {status}");
            assert_eq!((e.upstream_status, e.http_status()), (Some(status), 502));
            assert!(e.code.is_retryable(), "another deployment may answer");
            let seen = up.seen.lock().unwrap();
            assert_eq!(seen.len(), 1, "{upstream_kind} {status}: the redirect was followed");
            assert!(!seen[0].0.starts_with("/redirected"));
        }
    }
}

#[tokio::test]
async fn azure_uses_deployment_urls_and_api_key() {
    let (up, base) = upstream().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg: AdapterConfig = serde_json::from_value(json!({"providers": [{"name": "az", "kind": "azure",
        "base_url": format!("{base}/openai"), "api_key": "k-azure", "api_version": "2024-10-21"}]}))
    .unwrap();
    let a = AdapterService::new(&cfg).unwrap();
    *up.reply.lock().unwrap() =
        (200, std::fs::read_to_string(dir().join("upstream/openai_whole.json")).unwrap());
    let body = Bytes::from_static(br#"{"model":"client-model","messages":[{"role":"user","content":"hi"}]}"#);
    let ans = call(&a, request(Protocol::OpenaiChat, "az", body, false)).await;
    assert!(ans.errors.is_empty());
    let (url, headers, _) = up.seen.lock().unwrap().pop().unwrap();
    assert_eq!(url, "/openai/deployments/up-model/chat/completions?api-version=2024-10-21");
    assert_eq!(headers["api-key"], "k-azure");
    assert!(headers.get("authorization").is_none());
}

#[tokio::test]
async fn gemini_embeddings_come_back_openai_shaped() {
    let (up, base) = upstream().await;
    let a = adapter(&base);
    *up.reply.lock().unwrap() =
        (200, r#"{"embeddings":[{"values":[0.5,-1.0]},{"values":[0.25,2.0]}]}"#.into());
    for (format, expect) in [("float", json!([0.5, -1.0])), ("base64", json!("AAAAPwAAgL8="))] {
        let req = relay_core::pb::adapter::v1::EmbedRequest {
            request_id: "r".into(),
            body: json!({"model": "m", "input": ["a", "b"], "encoding_format": format}).to_string().into(),
            deployment: Some(Deployment {
                id: "e@gemini".into(),
                provider: "gemini".into(),
                upstream_model: "text-embedding-004".into(),
                weight: 1,
                ..Default::default()
            }),
        };
        let resp = a.embed(req).await.unwrap();
        let v: Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["embedding"], expect, "{format}");
        assert_eq!(v["data"][1]["index"], 1);
        let (url, headers, sent) = up.seen.lock().unwrap().pop().unwrap();
        assert_eq!(url, "/v1beta/models/text-embedding-004:batchEmbedContents");
        assert_eq!(headers["x-goog-api-key"], "k-gemini");
        let sent: Value = serde_json::from_slice(&sent).unwrap();
        assert_eq!(sent["requests"][1]["content"]["parts"][0]["text"], "b");
    }
}

#[tokio::test]
async fn n_above_one_is_refused_where_the_upstream_has_one_choice() {
    let (_up, base) = upstream().await;
    let a = adapter(&base);
    let body = Bytes::from_static(br#"{"model":"m","n":2,"messages":[{"role":"user","content":"hi"}]}"#);
    let Err(e) = a.chat(request(Protocol::OpenaiChat, "anthropic", body, false)).await else {
        panic!("accepted n=2")
    };
    assert_eq!(e.param.as_deref(), Some("n"));
}

/// A request without an output limit gets the deployment's, in the field each upstream obeys, so the
/// edge's reservation (which assumed it) is a real bound. A Responses body's stray `max_tokens` is not
/// a limit there and changes nothing.
#[tokio::test]
async fn requests_without_a_limit_carry_the_deployments_upstream() {
    let (up, base) = upstream().await;
    let a = adapter(&base);
    let openai = br#"{"model":"client-model","messages":[{"role":"user","content":"hi"}]}"#;
    let responses = br#"{"model":"client-model","input":"hi","max_tokens":1}"#;
    for (protocol, body) in [(Protocol::OpenaiChat, &openai[..]), (Protocol::OpenaiResponses, &responses[..])]
    {
        for provider in UPSTREAMS {
            let fixture = dir().join("upstream").join(format!("{provider}_whole.json"));
            *up.reply.lock().unwrap() = (200, std::fs::read_to_string(fixture).unwrap());
            up.seen.lock().unwrap().clear();
            let mut req = request(protocol, provider, Bytes::copy_from_slice(body), false);
            req.deployment.as_mut().unwrap().max_output_tokens = 321;
            call(&a, req).await;
            let (_, _, sent) = up.seen.lock().unwrap().pop().unwrap();
            let sent: Value = serde_json::from_slice(&sent).unwrap();
            let limit = match provider {
                "openai" => sent.get("max_completion_tokens").or_else(|| sent.get("max_tokens")),
                "anthropic" => sent.get("max_tokens"),
                _ => sent.pointer("/generationConfig/maxOutputTokens"),
            };
            assert_eq!(limit, Some(&json!(321)), "{protocol:?} → {provider}: {sent}");
        }
    }
}

/// A provider that never ends its event (or sends one absurdly long line) is cut off with a clear
/// error instead of growing the relay's memory without bound.
#[tokio::test]
async fn an_endless_event_is_cut_off() {
    let (up, base) = upstream().await;
    let a = adapter(&base);
    let endless = format!("data: {{\"x\":\"{}", "a".repeat(relay_adapter::MAX_EVENT_BYTES + 1024));
    *up.reply.lock().unwrap() = (200, endless);
    let body = Bytes::from_static(br#"{"model":"client-model","messages":[{"role":"user","content":"hi"}]}"#);
    let ans = call(&a, request(Protocol::OpenaiChat, "openai", body, true)).await;
    assert!(ans.errors.iter().any(|e| e.contains("larger than 16 MiB")), "{:?}", ans.errors);
}

/// A provider's 4xx message reaches the caller (it says what to fix) without what it reveals about
/// Relay's own account: key fragments, organisation and project ids.
#[tokio::test]
async fn relayed_provider_errors_are_scrubbed() {
    let (up, base) = upstream().await;
    let a = adapter(&base);
    let reply = r#"{"error":{"message":"Invalid value for 'temperature' (key sk-proj-Zx81kQ0aa9Wq, organization org-Q1w2E3r4T5, contact ops@provider.example)."}}"#;
    *up.reply.lock().unwrap() = (400, reply.into());
    let body = Bytes::from_static(br#"{"model":"client-model","messages":[{"role":"user","content":"hi"}]}"#);
    let e = a.chat(request(Protocol::OpenaiChat, "openai", body, false)).await.err().unwrap();
    assert_eq!(e.http_status(), 400);
    assert!(e.message.starts_with("Invalid value for 'temperature'"), "{}", e.message);
    for gone in ["Zx81kQ0aa9Wq", "Q1w2E3r4T5", "ops@provider"] {
        assert!(!e.message.contains(gone), "{gone} in {}", e.message);
    }
}
