//! tonic servers that expose any local implementation of a contract.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use relay_core::contracts::{Adapter, Authenticator, Billing, ResponseStore, Router};
use relay_core::pb::{adapter::v1 as adapter, auth::v1 as auth, billing::v1 as billing};
use relay_core::pb::{events::v1 as events, routing::v1 as routing, state::v1 as state};
use tonic::{Request, Response, Status};

use crate::generated;
use crate::status::to_status;

type GrpcResult<T> = Result<Response<T>, Status>;

fn reply<T>(r: relay_core::contracts::Result<T>) -> GrpcResult<T> {
    r.map(Response::new).map_err(|e| to_status(&e))
}

// === impl AuthServer ===

pub struct AuthServer(pub Arc<dyn Authenticator>);

#[tonic::async_trait]
impl generated::auth::auth_service_server::AuthService for AuthServer {
    async fn authenticate(
        &self,
        req: Request<auth::AuthenticateRequest>,
    ) -> GrpcResult<auth::AuthenticateResponse> {
        reply(self.0.authenticate(req.into_inner()).await)
    }
}

pub fn auth(
    svc: Arc<dyn Authenticator>,
) -> generated::auth::auth_service_server::AuthServiceServer<AuthServer> {
    generated::auth::auth_service_server::AuthServiceServer::new(AuthServer(svc))
}

// === impl RoutingServer ===

pub struct RoutingServer(pub Arc<dyn Router>);

#[tonic::async_trait]
impl generated::routing::routing_service_server::RoutingService for RoutingServer {
    async fn route(&self, req: Request<routing::RouteRequest>) -> GrpcResult<routing::RouteResponse> {
        reply(self.0.route(req.into_inner()).await)
    }
    async fn list_models(
        &self,
        _: Request<routing::ListModelsRequest>,
    ) -> GrpcResult<routing::ListModelsResponse> {
        reply(self.0.list_models().await)
    }
}

pub fn routing(
    svc: Arc<dyn Router>,
) -> generated::routing::routing_service_server::RoutingServiceServer<RoutingServer> {
    generated::routing::routing_service_server::RoutingServiceServer::new(RoutingServer(svc))
}

// === impl AdapterServer ===

pub struct AdapterServer(pub Arc<dyn Adapter>);

type EventStream = Pin<Box<dyn Stream<Item = Result<adapter::ChatEvent, Status>> + Send>>;

#[tonic::async_trait]
impl generated::adapter::adapter_service_server::AdapterService for AdapterServer {
    type ChatStream = EventStream;

    async fn chat(&self, req: Request<adapter::ChatRequest>) -> GrpcResult<Self::ChatStream> {
        let events = self.0.chat(req.into_inner()).await.map_err(|e| to_status(&e))?;
        // When the client cancels, tonic drops this stream, which drops the upstream call.
        Ok(Response::new(Box::pin(events.map(Ok)) as EventStream))
    }
    async fn forward(&self, req: Request<adapter::ForwardRequest>) -> GrpcResult<adapter::ForwardResponse> {
        reply(self.0.forward(req.into_inner()).await)
    }
    async fn embed(&self, req: Request<adapter::EmbedRequest>) -> GrpcResult<adapter::EmbedResponse> {
        reply(self.0.embed(req.into_inner()).await)
    }
    async fn count_tokens(
        &self,
        req: Request<adapter::CountTokensRequest>,
    ) -> GrpcResult<adapter::CountTokensResponse> {
        reply(self.0.count_tokens(req.into_inner()).await)
    }
}

pub fn adapter(
    svc: Arc<dyn Adapter>,
) -> generated::adapter::adapter_service_server::AdapterServiceServer<AdapterServer> {
    generated::adapter::adapter_service_server::AdapterServiceServer::new(AdapterServer(svc))
}

// === impl BillingServer ===

pub struct BillingServer(pub Arc<dyn Billing>);

#[tonic::async_trait]
impl generated::billing::billing_service_server::BillingService for BillingServer {
    async fn get_usage(&self, req: Request<billing::GetUsageRequest>) -> GrpcResult<events::UsageEvent> {
        reply(self.0.get_usage(req.into_inner()).await)
    }
    async fn usage_summary(
        &self,
        req: Request<billing::UsageSummaryRequest>,
    ) -> GrpcResult<billing::UsageSummaryResponse> {
        reply(self.0.usage_summary(req.into_inner()).await)
    }
    async fn spent(&self, req: Request<billing::SpentRequest>) -> GrpcResult<billing::SpentResponse> {
        reply(self.0.spent(req.into_inner()).await)
    }
}

pub fn billing(
    svc: Arc<dyn Billing>,
) -> generated::billing::billing_service_server::BillingServiceServer<BillingServer> {
    generated::billing::billing_service_server::BillingServiceServer::new(BillingServer(svc))
}

// === impl StateServer ===

pub struct StateServer(pub Arc<dyn ResponseStore>);

#[tonic::async_trait]
impl generated::state::state_service_server::StateService for StateServer {
    async fn put_response(
        &self,
        req: Request<state::PutResponseRequest>,
    ) -> GrpcResult<state::PutResponseResponse> {
        reply(self.0.put_response(req.into_inner()).await.map(|()| state::PutResponseResponse {}))
    }
    async fn get_response(
        &self,
        req: Request<state::GetResponseRequest>,
    ) -> GrpcResult<state::StoredResponse> {
        reply(self.0.get_response(req.into_inner()).await)
    }
    async fn delete_response(
        &self,
        req: Request<state::GetResponseRequest>,
    ) -> GrpcResult<state::DeleteResponseResponse> {
        reply(self.0.delete_response(req.into_inner()).await.map(|()| state::DeleteResponseResponse {}))
    }
    async fn get_items(&self, req: Request<state::GetItemsRequest>) -> GrpcResult<state::GetItemsResponse> {
        reply(self.0.get_items(req.into_inner()).await)
    }
    async fn put_conversation(
        &self,
        req: Request<state::PutConversationRequest>,
    ) -> GrpcResult<state::Conversation> {
        reply(self.0.put_conversation(req.into_inner()).await)
    }
    async fn get_conversation(
        &self,
        req: Request<state::ConversationRef>,
    ) -> GrpcResult<state::Conversation> {
        reply(self.0.get_conversation(req.into_inner()).await)
    }
    async fn delete_conversation(
        &self,
        req: Request<state::ConversationRef>,
    ) -> GrpcResult<state::DeleteConversationResponse> {
        reply(
            self.0.delete_conversation(req.into_inner()).await.map(|()| state::DeleteConversationResponse {}),
        )
    }
    async fn append_conversation_items(
        &self,
        req: Request<state::AppendConversationItemsRequest>,
    ) -> GrpcResult<state::AppendConversationItemsResponse> {
        reply(
            self.0
                .append_conversation_items(req.into_inner())
                .await
                .map(|()| state::AppendConversationItemsResponse {}),
        )
    }
    async fn list_conversation_items(
        &self,
        req: Request<state::ConversationRef>,
    ) -> GrpcResult<state::ConversationItems> {
        reply(self.0.list_conversation_items(req.into_inner()).await)
    }
    async fn delete_conversation_item(
        &self,
        req: Request<state::ConversationItemRef>,
    ) -> GrpcResult<state::DeleteConversationResponse> {
        reply(
            self.0
                .delete_conversation_item(req.into_inner())
                .await
                .map(|()| state::DeleteConversationResponse {}),
        )
    }
    async fn put_file(&self, req: Request<state::PutFileRequest>) -> GrpcResult<state::StoredFile> {
        reply(self.0.put_file(req.into_inner()).await)
    }
    async fn get_file(&self, req: Request<state::FileRef>) -> GrpcResult<state::StoredFile> {
        reply(self.0.get_file(req.into_inner()).await)
    }
    async fn list_files(&self, req: Request<state::ListFilesRequest>) -> GrpcResult<state::FileList> {
        reply(self.0.list_files(req.into_inner()).await)
    }
    async fn delete_file(&self, req: Request<state::FileRef>) -> GrpcResult<state::DeleteFileResponse> {
        reply(self.0.delete_file(req.into_inner()).await.map(|()| state::DeleteFileResponse {}))
    }
    async fn put_batch(&self, req: Request<state::PutBatchRequest>) -> GrpcResult<state::StoredBatch> {
        reply(self.0.put_batch(req.into_inner()).await)
    }
    async fn get_batch(&self, req: Request<state::BatchRef>) -> GrpcResult<state::StoredBatch> {
        reply(self.0.get_batch(req.into_inner()).await)
    }
    async fn list_batches(&self, req: Request<state::BatchRef>) -> GrpcResult<state::BatchList> {
        reply(self.0.list_batches(req.into_inner()).await)
    }
    async fn claim_batch(&self, req: Request<state::ClaimBatchRequest>) -> GrpcResult<state::StoredBatch> {
        reply(self.0.claim_batch(req.into_inner()).await)
    }
    async fn put_batch_result(
        &self,
        req: Request<state::BatchResult>,
    ) -> GrpcResult<state::PutBatchResultResponse> {
        reply(self.0.put_batch_result(req.into_inner()).await.map(|()| state::PutBatchResultResponse {}))
    }
    async fn list_batch_results(&self, req: Request<state::BatchRef>) -> GrpcResult<state::BatchResults> {
        reply(self.0.list_batch_results(req.into_inner()).await)
    }
}

pub fn state(
    svc: Arc<dyn ResponseStore>,
) -> generated::state::state_service_server::StateServiceServer<StateServer> {
    generated::state::state_service_server::StateServiceServer::new(StateServer(svc))
        .max_decoding_message_size(crate::clients::MAX_STATE_MESSAGE)
        .max_encoding_message_size(crate::clients::MAX_STATE_MESSAGE)
}
