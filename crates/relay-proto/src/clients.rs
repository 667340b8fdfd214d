//! gRPC clients implementing the contract traits. Channels are created once, connect lazily, reconnect by
//! themselves and multiplex every call over HTTP/2, so a client is cheap to clone and share.

use std::time::Duration;

use futures_util::StreamExt;
use relay_core::RelayError;
use relay_core::contracts::{Adapter, Authenticator, Billing, ChatEventStream, Result, Router};
use relay_core::pb::{adapter::v1 as adapter, auth::v1 as auth, billing::v1 as billing};
use relay_core::pb::{events::v1 as events, routing::v1 as routing};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::credentials::Outbound;
use crate::generated;
use crate::status::from_status;

/// A channel whose calls carry the trace context and the service token.
pub type TracedChannel = InterceptedService<Channel, Outbound>;

/// A lazily connecting channel to `url` (`http://host:port`), presenting `token` on every call.
pub fn channel(url: &str, token: Option<&relay_core::Secret>) -> Result<TracedChannel> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| RelayError::internal(format!("invalid gRPC address `{url}`")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(InterceptedService::new(endpoint.connect_lazy(), Outbound::new(token)?))
}

// === impl GrpcAuth ===

#[derive(Clone)]
pub struct GrpcAuth(generated::auth::auth_service_client::AuthServiceClient<TracedChannel>);

impl GrpcAuth {
    pub fn new(ch: TracedChannel) -> Self {
        Self(generated::auth::auth_service_client::AuthServiceClient::new(ch))
    }
}

#[async_trait::async_trait]
impl Authenticator for GrpcAuth {
    async fn authenticate(&self, req: auth::AuthenticateRequest) -> Result<auth::AuthenticateResponse> {
        let r = self.0.clone().authenticate(req).await.map_err(|s| from_status(&s, "auth"))?;
        Ok(r.into_inner())
    }
}

// === impl GrpcRouter ===

#[derive(Clone)]
pub struct GrpcRouter(generated::routing::routing_service_client::RoutingServiceClient<TracedChannel>);

impl GrpcRouter {
    pub fn new(ch: TracedChannel) -> Self {
        Self(generated::routing::routing_service_client::RoutingServiceClient::new(ch))
    }
}

#[async_trait::async_trait]
impl Router for GrpcRouter {
    async fn route(&self, req: routing::RouteRequest) -> Result<routing::RouteResponse> {
        let r = self.0.clone().route(req).await.map_err(|s| from_status(&s, "routing"))?;
        Ok(r.into_inner())
    }
    async fn list_models(&self) -> Result<routing::ListModelsResponse> {
        let r = self
            .0
            .clone()
            .list_models(routing::ListModelsRequest {})
            .await
            .map_err(|s| from_status(&s, "routing"))?;
        Ok(r.into_inner())
    }
}

// === impl GrpcAdapter ===

#[derive(Clone)]
pub struct GrpcAdapter(generated::adapter::adapter_service_client::AdapterServiceClient<TracedChannel>);

impl GrpcAdapter {
    pub fn new(ch: TracedChannel) -> Self {
        Self(
            generated::adapter::adapter_service_client::AdapterServiceClient::new(ch)
                // Chat bodies carry whole conversations (images included).
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        )
    }
}

#[async_trait::async_trait]
impl Adapter for GrpcAdapter {
    async fn chat(&self, req: adapter::ChatRequest) -> Result<ChatEventStream> {
        let stream = self.0.clone().chat(req).await.map_err(|s| from_status(&s, "adapter"))?.into_inner();
        // A transport failure mid-stream becomes a typed Error event; tonic ends the stream after it.
        Ok(Box::pin(stream.map(|item| match item {
            Ok(ev) => ev,
            Err(s) => adapter::ChatEvent {
                event: Some(adapter::chat_event::Event::Error(from_status(&s, "adapter").to_pb())),
            },
        })))
    }
    async fn embed(&self, req: adapter::EmbedRequest) -> Result<adapter::EmbedResponse> {
        let r = self.0.clone().embed(req).await.map_err(|s| from_status(&s, "adapter"))?;
        Ok(r.into_inner())
    }
    async fn count_tokens(&self, req: adapter::CountTokensRequest) -> Result<adapter::CountTokensResponse> {
        let r = self.0.clone().count_tokens(req).await.map_err(|s| from_status(&s, "adapter"))?;
        Ok(r.into_inner())
    }
}

// === impl GrpcBilling ===

#[derive(Clone)]
pub struct GrpcBilling(generated::billing::billing_service_client::BillingServiceClient<TracedChannel>);

impl GrpcBilling {
    pub fn new(ch: TracedChannel) -> Self {
        Self(generated::billing::billing_service_client::BillingServiceClient::new(ch))
    }
}

#[async_trait::async_trait]
impl Billing for GrpcBilling {
    async fn get_usage(&self, req: billing::GetUsageRequest) -> Result<events::UsageEvent> {
        let r = self.0.clone().get_usage(req).await.map_err(|s| from_status(&s, "billing"))?;
        Ok(r.into_inner())
    }
    async fn usage_summary(
        &self,
        req: billing::UsageSummaryRequest,
    ) -> Result<billing::UsageSummaryResponse> {
        let r = self.0.clone().usage_summary(req).await.map_err(|s| from_status(&s, "billing"))?;
        Ok(r.into_inner())
    }
    async fn spent(&self, req: billing::SpentRequest) -> Result<billing::SpentResponse> {
        let r = self.0.clone().spent(req).await.map_err(|s| from_status(&s, "billing"))?;
        Ok(r.into_inner())
    }
}
