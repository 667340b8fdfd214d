//! `AdapterService`: dispatches each call to the provider named by the deployment.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use relay_core::contracts::{Adapter, ChatEventStream, Result};
use relay_core::pb::adapter::v1::{
    ChatRequest, CountTokensRequest, CountTokensResponse, EmbedRequest, EmbedResponse, ForwardRequest,
    ForwardResponse,
};
use relay_core::pb::routing::v1::Deployment;
use relay_core::{ErrorCode, RelayError};
use tracing::Instrument;

use crate::config::{AdapterConfig, ProviderKind};
use crate::providers::{Provider, anthropic, demo::Demo, gemini, openai};

pub struct AdapterService {
    providers: HashMap<String, Arc<dyn Provider>>,
    /// The deployments this adapter serves, by id, from its own config. When set, a call names only the
    /// deployment's id: the provider, upstream model and output limit are this copy's, never the caller's.
    deployments: Option<HashMap<String, Deployment>>,
}

impl AdapterService {
    pub fn new(cfg: &AdapterConfig) -> anyhow::Result<Self> {
        let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        for p in &cfg.providers {
            let mut p = p.clone();
            p.ca_bundle = p.ca_bundle.or_else(|| cfg.ca_bundle.clone());
            let p = &p;
            let provider: Arc<dyn Provider> = match p.kind {
                ProviderKind::Openai | ProviderKind::Azure => Arc::new(openai::provider(p)?),
                ProviderKind::Anthropic => Arc::new(anthropic::provider(p)?),
                ProviderKind::Gemini => Arc::new(gemini::provider(p)?),
                ProviderKind::Demo => Arc::new(Demo::new(p)),
            };
            providers.insert(p.name.clone(), provider);
            // Present from the start, so the credentials alert sees the series before the first refusal.
            metrics::counter!("relay_upstream_auth_failures_total", "provider" => p.name.clone())
                .increment(0);
        }
        Ok(Self { providers, deployments: None })
    }

    /// Serves only `deployments` (by id), each resolved from this copy whatever the caller sends.
    pub fn restrict_to(mut self, deployments: impl IntoIterator<Item = Deployment>) -> Self {
        self.deployments = Some(deployments.into_iter().map(|d| (d.id.clone(), d)).collect());
        self
    }

    /// The deployment a call may use: the configured one with the caller's id.
    fn resolve(&self, asked: Option<Deployment>) -> Result<Deployment> {
        let asked = asked.unwrap_or_default();
        let Some(known) = &self.deployments else { return Ok(asked) };
        known.get(&asked.id).cloned().ok_or_else(|| {
            metrics::counter!("relay_adapter_unknown_deployment_total").increment(1);
            tracing::warn!(deployment = %asked.id, "call for a deployment this adapter does not serve refused");
            RelayError::new(ErrorCode::PermissionDenied, "the selected deployment is not served here")
        })
    }

    /// The deployment a call names (resolved from this copy, and written back into the call) and the
    /// provider that serves it.
    fn target(&self, asked: &mut Option<Deployment>) -> Result<(Deployment, &Arc<dyn Provider>)> {
        let dep = self.resolve(asked.take())?;
        *asked = Some(dep.clone());
        let provider = self.provider(&dep.provider)?;
        Ok((dep, provider))
    }

    fn provider(&self, name: &str) -> Result<&Arc<dyn Provider>> {
        self.providers.get(name).ok_or_else(|| {
            // A routing/adapter config mismatch: the operator's problem, reported without detail to callers.
            tracing::error!(provider = name, "deployment names a provider the adapter does not have");
            RelayError::new(ErrorCode::Internal, "the selected deployment is misconfigured")
        })
    }
}

#[async_trait::async_trait]
impl Adapter for AdapterService {
    async fn chat(&self, mut req: ChatRequest) -> Result<ChatEventStream> {
        let (dep, provider) = self.target(&mut req.deployment)?;
        metrics::counter!("relay_adapter_calls_total", "kind" => "chat").increment(1);
        // OpenTelemetry GenAI semantic conventions (client span of one model call).
        let span = tracing::info_span!(
            "adapter.chat",
            otel.name = %format!("chat {}", dep.upstream_model),
            otel.kind = "client",
            request_id = %req.request_id,
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = %provider.system(),
            gen_ai.request.model = %dep.upstream_model,
            gen_ai.response.model = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            error.type = tracing::field::Empty,
            relay.deployment = %dep.id,
            relay.stream = req.stream,
        );
        let events = provider.chat(req).instrument(span.clone()).await.inspect_err(|e| {
            span.record("error.type", e.code.as_str());
        })?;
        // Poll the upstream body inside the span too, so streaming work is attributed to this call; what
        // the answer reports (model, finish, usage) is recorded on the span as it passes.
        Ok(Box::pin(events.map(move |ev| {
            let _g = span.enter();
            gen_ai_attributes(&span, &ev);
            ev
        })))
    }

    async fn embed(&self, mut req: EmbedRequest) -> Result<EmbedResponse> {
        let (dep, provider) = self.target(&mut req.deployment)?;
        let span = tracing::info_span!(
            "adapter.embed",
            otel.name = %format!("embeddings {}", dep.upstream_model),
            otel.kind = "client",
            request_id = %req.request_id,
            gen_ai.operation.name = "embeddings",
            gen_ai.provider.name = %provider.system(),
            gen_ai.request.model = %dep.upstream_model,
            relay.deployment = %dep.id,
        );
        provider.embed(req).instrument(span).await
    }

    async fn forward(&self, mut req: ForwardRequest) -> Result<ForwardResponse> {
        let (dep, provider) = self.target(&mut req.deployment)?;
        metrics::counter!("relay_adapter_calls_total", "kind" => "forward").increment(1);
        let span = tracing::info_span!(
            "adapter.forward",
            otel.name = %format!("{} {}", req.operation, dep.upstream_model),
            otel.kind = "client",
            request_id = %req.request_id,
            gen_ai.provider.name = %provider.system(),
            gen_ai.request.model = %dep.upstream_model,
            relay.deployment = %dep.id,
        );
        provider.forward(req).instrument(span).await
    }

    async fn count_tokens(&self, mut req: CountTokensRequest) -> Result<CountTokensResponse> {
        let (dep, provider) = self.target(&mut req.deployment)?;
        let span = tracing::info_span!("adapter.count_tokens", request_id = %req.request_id, relay.deployment = %dep.id);
        provider.count_tokens(req).instrument(span).await
    }
}

/// GenAI attributes carried by one event of an answer.
fn gen_ai_attributes(span: &tracing::Span, ev: &relay_core::pb::adapter::v1::ChatEvent) {
    use relay_core::pb::adapter::v1::chat_event::Event;
    match &ev.event {
        Some(Event::Start(s)) if !s.upstream_model.is_empty() => {
            span.record("gen_ai.response.model", s.upstream_model.as_str());
        }
        Some(Event::Finish(f)) => {
            span.record("gen_ai.response.finish_reasons", f.reason().as_str_name());
        }
        Some(Event::Usage(u)) => {
            span.record("gen_ai.usage.input_tokens", u.input_tokens);
            span.record("gen_ai.usage.output_tokens", u.output_tokens);
        }
        Some(Event::Error(e)) => {
            span.record("error.type", ErrorCode::from_pb(e.code).as_str());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt as _;
    use relay_core::pb::adapter::v1::chat_event::Event;

    use super::*;
    use crate::config::ProviderConfig;

    fn demo(name: &str) -> ProviderConfig {
        toml::from_str(&format!("name = \"{name}\"\nkind = \"demo\"\n")).unwrap()
    }

    async fn upstream_model_of(a: &AdapterService, dep: Deployment) -> Result<String> {
        let req = ChatRequest {
            request_id: "r".into(),
            body: bytes::Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
            deployment: Some(dep),
            protocol: relay_core::pb::common::v1::Protocol::OpenaiChat as i32,
            ..Default::default()
        };
        let mut events = a.chat(req).await?;
        while let Some(ev) = events.next().await {
            if let Some(Event::Start(s)) = ev.event {
                return Ok(s.upstream_model);
            }
        }
        Err(RelayError::internal("no start event"))
    }

    #[tokio::test]
    async fn a_call_names_a_deployment_and_the_adapter_supplies_the_rest() {
        let cfg = AdapterConfig { providers: vec![demo("demo-a"), demo("demo-b")], ..Default::default() };
        let configured = Deployment {
            id: "m@demo-a".into(),
            provider: "demo-a".into(),
            upstream_model: "real".into(),
            ..Default::default()
        };
        let a = AdapterService::new(&cfg).unwrap().restrict_to([configured]);
        // The caller claims another provider and model for a known id: the configured ones are used.
        let forged = Deployment {
            id: "m@demo-a".into(),
            provider: "demo-b".into(),
            upstream_model: "forged".into(),
            ..Default::default()
        };
        assert_eq!(upstream_model_of(&a, forged).await.unwrap(), "real");
        // An id the config does not have is refused, whatever else it says.
        let unknown = Deployment {
            id: "x@demo-b".into(),
            provider: "demo-b".into(),
            upstream_model: "x".into(),
            ..Default::default()
        };
        let e = upstream_model_of(&a, unknown).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        let e = upstream_model_of(&a, Deployment::default()).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
    }
}
