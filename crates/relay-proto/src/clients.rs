//! gRPC clients implementing the contract traits, over [`GrpcChannel`]: created once, connecting lazily,
//! reconnecting by themselves and multiplexing every call over HTTP/2, so a client is cheap to clone and share.

use futures_util::StreamExt;
use relay_core::contracts::{Adapter, Authenticator, Billing, ChatEventStream, Result, Router};
use relay_core::pb::{adapter::v1 as adapter, auth::v1 as auth, billing::v1 as billing};
use relay_core::pb::{events::v1 as events, routing::v1 as routing};
use tonic::service::interceptor::InterceptedService;

use crate::channel::GrpcChannel;

use crate::credentials::Outbound;
use crate::generated;
use crate::status::from_status;

/// A channel whose calls carry the trace context and the service token.
pub type TracedChannel = InterceptedService<GrpcChannel, Outbound>;

/// A channel to `url` (see [`GrpcChannel::new`]), presenting `token` on every call.
pub fn channel(url: &str, token: Option<&relay_core::Secret>) -> Result<TracedChannel> {
    Ok(InterceptedService::new(GrpcChannel::new(url)?, Outbound::new(token)?))
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
    async fn forward(&self, req: adapter::ForwardRequest) -> Result<adapter::ForwardResponse> {
        let r = self.0.clone().forward(req).await.map_err(|s| from_status(&s, "adapter"))?;
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

// === impl GrpcState ===

use relay_core::pb::state::v1 as state_pb;

#[derive(Clone)]
pub struct GrpcState(generated::state::state_service_client::StateServiceClient<TracedChannel>);

/// Largest state message either way: a file with its content (the edge bounds uploads below this).
pub const MAX_STATE_MESSAGE: usize = 128 << 20;

impl GrpcState {
    pub fn new(ch: TracedChannel) -> Self {
        Self(
            generated::state::state_service_client::StateServiceClient::new(ch)
                .max_decoding_message_size(MAX_STATE_MESSAGE)
                .max_encoding_message_size(MAX_STATE_MESSAGE),
        )
    }
}

#[async_trait::async_trait]
impl relay_core::contracts::ResponseStore for GrpcState {
    async fn put_response(&self, req: relay_core::pb::state::v1::PutResponseRequest) -> Result<()> {
        self.0.clone().put_response(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(())
    }
    async fn get_response(
        &self,
        req: relay_core::pb::state::v1::GetResponseRequest,
    ) -> Result<relay_core::pb::state::v1::StoredResponse> {
        let r = self.0.clone().get_response(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn delete_response(&self, req: relay_core::pb::state::v1::GetResponseRequest) -> Result<()> {
        self.0.clone().delete_response(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(())
    }
    async fn get_items(
        &self,
        req: relay_core::pb::state::v1::GetItemsRequest,
    ) -> Result<relay_core::pb::state::v1::GetItemsResponse> {
        let r = self.0.clone().get_items(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn put_conversation(
        &self,
        req: state_pb::PutConversationRequest,
    ) -> Result<state_pb::Conversation> {
        let r = self.0.clone().put_conversation(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn get_conversation(&self, req: state_pb::ConversationRef) -> Result<state_pb::Conversation> {
        let r = self.0.clone().get_conversation(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn delete_conversation(&self, req: state_pb::ConversationRef) -> Result<()> {
        self.0.clone().delete_conversation(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(())
    }
    async fn append_conversation_items(&self, req: state_pb::AppendConversationItemsRequest) -> Result<()> {
        self.0.clone().append_conversation_items(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(())
    }
    async fn list_conversation_items(
        &self,
        req: state_pb::ConversationRef,
    ) -> Result<state_pb::ConversationItems> {
        let r = self.0.clone().list_conversation_items(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn delete_conversation_item(&self, req: state_pb::ConversationItemRef) -> Result<()> {
        self.0.clone().delete_conversation_item(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(())
    }
    async fn put_file(&self, req: state_pb::PutFileRequest) -> Result<state_pb::StoredFile> {
        let r = self.0.clone().put_file(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn get_file(&self, req: state_pb::FileRef) -> Result<state_pb::StoredFile> {
        let r = self.0.clone().get_file(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn list_files(&self, req: state_pb::ListFilesRequest) -> Result<state_pb::FileList> {
        let r = self.0.clone().list_files(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn delete_file(&self, req: state_pb::FileRef) -> Result<()> {
        self.0.clone().delete_file(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(())
    }
    async fn put_batch(&self, req: state_pb::PutBatchRequest) -> Result<state_pb::StoredBatch> {
        let r = self.0.clone().put_batch(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn get_batch(&self, req: state_pb::BatchRef) -> Result<state_pb::StoredBatch> {
        let r = self.0.clone().get_batch(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn list_batches(&self, req: state_pb::BatchRef) -> Result<state_pb::BatchList> {
        let r = self.0.clone().list_batches(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn claim_batch(&self, req: state_pb::ClaimBatchRequest) -> Result<state_pb::StoredBatch> {
        let r = self.0.clone().claim_batch(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
    async fn put_batch_result(&self, req: state_pb::BatchResult) -> Result<()> {
        self.0.clone().put_batch_result(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(())
    }
    async fn list_batch_results(&self, req: state_pb::BatchRef) -> Result<state_pb::BatchResults> {
        let r = self.0.clone().list_batch_results(req).await.map_err(|s| from_status(&s, "state"))?;
        Ok(r.into_inner())
    }
}
