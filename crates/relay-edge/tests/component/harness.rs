//! The component tests' harness: scripted fakes behind the contract traits, the edge router over them,
//! and request helpers.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::stream;
use relay_core::contracts::{Adapter, Authenticator, ChatEventStream, Result, Router, Services, UsageSink};
use relay_core::pb::adapter::v1::{self as adapter, ChatEvent, chat_event::Event};
use relay_core::pb::auth::v1::{AuthenticateRequest, AuthenticateResponse, Principal};
use relay_core::pb::common::v1::TokenUsage;
use relay_core::pb::events::v1::UsageEvent;
use relay_core::pb::routing::v1::{Deployment, ListModelsResponse, ModelInfo, RouteRequest, RouteResponse};
use relay_core::{ErrorCode, RelayError};
use relay_edge::{Edge, EdgeConfig};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

#[derive(Default)]
pub struct FakeAuth(pub AtomicUsize);

#[async_trait::async_trait]
impl Authenticator for FakeAuth {
    async fn authenticate(&self, req: AuthenticateRequest) -> Result<AuthenticateResponse> {
        self.0.fetch_add(1, Ordering::SeqCst);
        let mut principal =
            Principal { key_id: req.api_key.clone(), team_id: "team-1".into(), ..Default::default() };
        match req.api_key.as_str() {
            "sk-all" => {}
            "sk-limited" => principal.allowed_models = vec!["ok-*".to_owned()],
            "sk-rpm1" => {
                principal.scopes = vec![relay_core::pb::auth::v1::Scope {
                    kind: relay_core::pb::auth::v1::ScopeKind::Key as i32,
                    id: "sk-rpm1".into(),
                    limits: Some(relay_core::pb::auth::v1::Limits {
                        requests_per_minute: 1,
                        ..Default::default()
                    }),
                    budget: None,
                }]
            }
            k if k.starts_with("sk-tpm") => {
                principal.scopes = vec![relay_core::pb::auth::v1::Scope {
                    kind: relay_core::pb::auth::v1::ScopeKind::Key as i32,
                    id: k.into(),
                    limits: Some(relay_core::pb::auth::v1::Limits {
                        tokens_per_minute: 10_000_000,
                        ..Default::default()
                    }),
                    budget: None,
                }]
            }
            "sk-office" => principal.ip_allowlist = vec!["10.0.0.0/8".to_owned()],
            "sk-eu" => principal.allowed_regions = vec!["eu".to_owned()],
            _ => return Err(RelayError::new(ErrorCode::Unauthenticated, "Invalid API key.")),
        }
        Ok(AuthenticateResponse { principal: Some(principal), cache_ttl_secs: 60 })
    }
}

pub struct FakeRouter;

pub fn dep(name: &str) -> Deployment {
    dep_w(name, 1)
}

/// Weights decide the order (relay-select): a huge weight makes a deployment the first attempt.
pub fn dep_w(name: &str, weight: u32) -> Deployment {
    Deployment {
        id: name.into(),
        provider: name.into(),
        upstream_model: name.into(),
        weight,
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl Router for FakeRouter {
    async fn route(&self, req: RouteRequest) -> Result<RouteResponse> {
        let candidates = match req.model.as_str() {
            "ok-failover" => vec![dep_w("broken", u32::MAX), dep("good")],
            "ok-rejects" => vec![dep_w("rejects", u32::MAX), dep("good")],
            "ok-weighted" => vec![dep_w("w3", 3), dep_w("w1", 1)],
            // Residency: a failing EU primary, a healthy US deployment preferred by weight, a healthy EU one.
            "ok-regions" => vec![
                Deployment { region: "eu".into(), ..dep_w("broken", u32::MAX) },
                Deployment { region: "us".into(), ..dep_w("good", u32::MAX / 2) },
                Deployment { region: "eu".into(), ..dep_w("good-eu", 1) },
            ],
            "ok-us-only" => vec![Deployment { region: "us".into(), ..dep("good") }],
            "ok-timeouts" => {
                // Slow to accept: failed over after 100 ms. Streams silent for 100 ms, or answers longer
                // than 300 ms in all, end in a timeout error.
                let candidates = vec![dep_w("slow", u32::MAX), dep("good")];
                return Ok(RouteResponse {
                    candidates,
                    cache_ttl_ms: 1000,
                    first_byte_timeout_ms: 100,
                    ..Default::default()
                });
            }
            "ok-stalls" | "ok-drags" => {
                let (idle, total) = if req.model == "ok-stalls" { (100, 0) } else { (0, 300) };
                return Ok(RouteResponse {
                    candidates: vec![dep("stalls")],
                    cache_ttl_ms: 1000,
                    idle_timeout_ms: idle,
                    total_timeout_ms: total,
                    ..Default::default()
                });
            }
            "ok-dies" => vec![dep("dies")],
            "ok-capped" => vec![Deployment { max_output_tokens: 700, ..dep("good") }],
            "ok-good" | "secret-model" => vec![dep("good")],
            _ => return Err(RelayError::new(ErrorCode::ModelNotFound, "no such model")),
        };
        Ok(RouteResponse { candidates, cache_ttl_ms: 1000, ..Default::default() })
    }
    async fn list_models(&self) -> Result<ListModelsResponse> {
        let m = |id: &str| ModelInfo { id: id.into(), ..Default::default() };
        Ok(ListModelsResponse { models: vec![m("ok-good"), m("secret-model")] })
    }
}

#[derive(Default)]
pub struct FakeAdapter(pub Mutex<Vec<String>>);

pub fn ev(e: Event) -> ChatEvent {
    ChatEvent { event: Some(e) }
}

pub fn chunk(s: &str) -> ChatEvent {
    ev(Event::Chunk(adapter::Chunk { data: s.as_bytes().to_vec().into(), output_tokens: 1 }))
}

#[async_trait::async_trait]
impl Adapter for FakeAdapter {
    async fn chat(&self, req: adapter::ChatRequest) -> Result<ChatEventStream> {
        let name = req.deployment.unwrap().provider;
        self.0.lock().unwrap().push(name.clone());
        let start = ev(Event::Start(adapter::Start::default()));
        let usage = ev(Event::Usage(TokenUsage { input_tokens: 7, output_tokens: 3, ..Default::default() }));
        if name == "slow" {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
        if name == "stalls" {
            // One chunk, then 150 ms of silence between chunks (a stall for a 100 ms idle limit; a drag past
            // a 300 ms total).
            let tail = futures_util::StreamExt::then(stream::iter(0..5), |_| async {
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                chunk("data: {\"late\":1}\n\n")
            });
            let head = stream::iter(vec![start, chunk("data: {\"x\":1}\n\n")]);
            return Ok(Box::pin(futures_util::StreamExt::chain(head, tail)));
        }
        let events = match name.as_str() {
            "broken" => return Err(RelayError::from_upstream_status(500, "upstream failed")),
            "rejects" => return Err(RelayError::from_upstream_status(422, "bad schema")),
            "dies" => vec![
                start,
                chunk("data: {\"a\":1}\n\n"),
                ev(Event::Error(RelayError::new(ErrorCode::UpstreamServerError, "cut").to_pb())),
            ],
            _ if req.stream => vec![start, chunk("data: {\"x\":1}\n\n"), chunk("data: [DONE]\n\n"), usage],
            _ => vec![start, chunk("{\"ok\":true}"), usage],
        };
        Ok(Box::pin(stream::iter(events)))
    }
    async fn embed(&self, _: adapter::EmbedRequest) -> Result<adapter::EmbedResponse> {
        Err(RelayError::internal("not used"))
    }
    async fn count_tokens(&self, req: adapter::CountTokensRequest) -> Result<adapter::CountTokensResponse> {
        self.0.lock().unwrap().push(format!("count:{}", req.deployment.unwrap().provider));
        Ok(adapter::CountTokensResponse {
            input_tokens: req.body.len() as u64,
            exact: true,
            ..Default::default()
        })
    }
}

#[derive(Default)]
pub struct Sink(pub Mutex<Vec<UsageEvent>>);

#[async_trait::async_trait]
impl UsageSink for Sink {
    async fn publish(&self, event: UsageEvent) -> Result<()> {
        self.0.lock().unwrap().push(event);
        Ok(())
    }
}

pub struct Harness {
    pub edge: Edge,
    pub auth: Arc<FakeAuth>,
    pub adapter: Arc<FakeAdapter>,
    pub sink: Arc<Sink>,
}

pub fn harness(max_body: usize) -> Harness {
    let auth = Arc::new(FakeAuth::default());
    let adapter = Arc::new(FakeAdapter::default());
    let sink = Arc::new(Sink::default());
    let services = Services {
        auth: auth.clone(),
        router: Arc::new(FakeRouter),
        adapter: adapter.clone(),
        usage: sink.clone(),
        limiter: Arc::new(relay_limits::MemoryLimiter::new()),
        state: None,
        cache: None,
    };
    let cfg = EdgeConfig {
        max_body_bytes: max_body,
        max_buffered_body_bytes: max_body.max(1 << 20),
        trusted_proxies: vec!["127.0.0.0/8".into()],
        ..Default::default()
    };
    Harness { edge: Edge::new(cfg, services), auth, adapter, sink }
}

pub async fn send(
    h: &Harness,
    key: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, HashMap<String, String>, String) {
    send_with(h, key, path, body, &[]).await
}

pub async fn send_with(
    h: &Harness,
    key: &str,
    path: &str,
    body: Option<Value>,
    extra: &[(&str, &str)],
) -> (StatusCode, HashMap<String, String>, String) {
    let mut req = Request::builder().uri(path).header("authorization", format!("Bearer {key}"));
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(b) => {
            req = req.method("POST").header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let resp = relay_edge::router(h.edge.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let headers =
        resp.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned())).collect();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

pub async fn events(h: &Harness) -> Vec<UsageEvent> {
    h.edge.flush().await;
    h.sink.0.lock().unwrap().clone()
}

pub fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}
