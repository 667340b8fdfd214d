//! `AdapterService`: dispatches each call to the provider named by the deployment.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use relay_core::contracts::{Adapter, ChatEventStream, Result};
use relay_core::pb::adapter::v1::{
    ChatRequest, CountTokensRequest, CountTokensResponse, EmbedRequest, EmbedResponse,
};
use relay_core::{ErrorCode, RelayError};
use tracing::Instrument;

use crate::config::{AdapterConfig, ProviderKind};
use crate::providers::{Provider, anthropic, demo::Demo, gemini, openai};

pub struct AdapterService {
    providers: HashMap<String, Arc<dyn Provider>>,
}

impl AdapterService {
    pub fn new(cfg: &AdapterConfig) -> anyhow::Result<Self> {
        let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        for p in &cfg.providers {
            let provider: Arc<dyn Provider> = match p.kind {
                ProviderKind::Openai | ProviderKind::Azure => Arc::new(openai::provider(p)?),
                ProviderKind::Anthropic => Arc::new(anthropic::provider(p)?),
                ProviderKind::Gemini => Arc::new(gemini::provider(p)?),
                ProviderKind::Demo => Arc::new(Demo::new(p)),
            };
            providers.insert(p.name.clone(), provider);
        }
        Ok(Self { providers })
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
    async fn chat(&self, req: ChatRequest) -> Result<ChatEventStream> {
        let dep = req.deployment.clone().unwrap_or_default();
        let provider = self.provider(&dep.provider)?;
        let span = tracing::info_span!(
            "adapter.chat",
            request_id = %req.request_id,
            gen_ai.system = %provider.system(),
            gen_ai.request.model = %dep.upstream_model,
            relay.deployment = %dep.id,
            stream = req.stream,
        );
        let events = provider.chat(req).instrument(span.clone()).await?;
        // Poll the upstream body inside the span too, so streaming work is attributed to this call.
        Ok(Box::pin(events.map(move |ev| {
            let _g = span.enter();
            ev
        })))
    }

    async fn embed(&self, req: EmbedRequest) -> Result<EmbedResponse> {
        let dep = req.deployment.clone().unwrap_or_default();
        let provider = self.provider(&dep.provider)?;
        let span =
            tracing::info_span!("adapter.embed", request_id = %req.request_id, relay.deployment = %dep.id);
        provider.embed(req).instrument(span).await
    }

    async fn count_tokens(&self, req: CountTokensRequest) -> Result<CountTokensResponse> {
        let dep = req.deployment.clone().unwrap_or_default();
        let provider = self.provider(&dep.provider)?;
        let span = tracing::info_span!("adapter.count_tokens", request_id = %req.request_id, relay.deployment = %dep.id);
        provider.count_tokens(req).instrument(span).await
    }
}
