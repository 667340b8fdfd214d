//! Service contracts. Each service crate implements its trait locally; `relay-proto` implements the same trait
//! as a gRPC client, so a caller cannot tell (and does not care) whether the service runs in its process.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;

use crate::RelayError;
use crate::pb::routing::v1 as routing;
use crate::pb::state::v1 as state;
use crate::pb::{adapter::v1 as adapter, auth::v1 as auth, billing::v1 as billing, events::v1 as events};

pub type Result<T> = std::result::Result<T, RelayError>;

/// The events of one upstream call. Dropping the stream cancels the upstream request.
pub type ChatEventStream = Pin<Box<dyn Stream<Item = adapter::ChatEvent> + Send>>;

#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, req: auth::AuthenticateRequest) -> Result<auth::AuthenticateResponse>;
}

#[async_trait::async_trait]
pub trait Router: Send + Sync + 'static {
    async fn route(&self, req: routing::RouteRequest) -> Result<routing::RouteResponse>;
    async fn list_models(&self) -> Result<routing::ListModelsResponse>;
}

#[async_trait::async_trait]
pub trait Adapter: Send + Sync + 'static {
    /// Errors returned here happened before any byte of the answer (the edge may fail over on them);
    /// later ones arrive as `Error` events.
    async fn chat(&self, req: adapter::ChatRequest) -> Result<ChatEventStream>;
    async fn embed(&self, req: adapter::EmbedRequest) -> Result<adapter::EmbedResponse>;
    async fn count_tokens(&self, req: adapter::CountTokensRequest) -> Result<adapter::CountTokensResponse>;
    /// Another OpenAI-shaped endpoint, forwarded as it is (only the model rewritten).
    async fn forward(&self, req: adapter::ForwardRequest) -> Result<adapter::ForwardResponse> {
        let _ = req;
        Err(RelayError::new(crate::ErrorCode::NotFound, "this adapter forwards no other endpoints"))
    }
}

#[async_trait::async_trait]
pub trait Billing: Send + Sync + 'static {
    async fn get_usage(&self, req: billing::GetUsageRequest) -> Result<events::UsageEvent>;
    async fn usage_summary(&self, req: billing::UsageSummaryRequest)
    -> Result<billing::UsageSummaryResponse>;
    /// What a scope was charged over a window, as booked (budget counters are rebuilt from it).
    async fn spent(&self, req: billing::SpentRequest) -> Result<billing::SpentResponse>;
}

/// What the Responses API keeps between calls: stored responses and their items, each owned by an org.
/// Every call names the caller's org; another org's object is `NotFound`, like one that never existed.
#[async_trait::async_trait]
pub trait ResponseStore: Send + Sync + 'static {
    async fn put_response(&self, req: state::PutResponseRequest) -> Result<()>;
    async fn get_response(&self, req: state::GetResponseRequest) -> Result<state::StoredResponse>;
    async fn delete_response(&self, req: state::GetResponseRequest) -> Result<()>;
    async fn get_items(&self, req: state::GetItemsRequest) -> Result<state::GetItemsResponse>;
    async fn put_conversation(&self, req: state::PutConversationRequest) -> Result<state::Conversation>;
    async fn get_conversation(&self, req: state::ConversationRef) -> Result<state::Conversation>;
    async fn delete_conversation(&self, req: state::ConversationRef) -> Result<()>;
    async fn append_conversation_items(&self, req: state::AppendConversationItemsRequest) -> Result<()>;
    async fn list_conversation_items(&self, req: state::ConversationRef) -> Result<state::ConversationItems>;
    async fn delete_conversation_item(&self, req: state::ConversationItemRef) -> Result<()>;
    async fn put_file(&self, req: state::PutFileRequest) -> Result<state::StoredFile>;
    async fn get_file(&self, req: state::FileRef) -> Result<state::StoredFile>;
    async fn list_files(&self, req: state::ListFilesRequest) -> Result<state::FileList>;
    async fn delete_file(&self, req: state::FileRef) -> Result<()>;
    async fn put_batch(&self, req: state::PutBatchRequest) -> Result<state::StoredBatch>;
    async fn get_batch(&self, req: state::BatchRef) -> Result<state::StoredBatch>;
    async fn list_batches(&self, req: state::BatchRef) -> Result<state::BatchList>;
    async fn claim_batch(&self, req: state::ClaimBatchRequest) -> Result<state::StoredBatch>;
    async fn put_batch_result(&self, req: state::BatchResult) -> Result<()>;
    async fn list_batch_results(&self, req: state::BatchRef) -> Result<state::BatchResults>;
}

/// The response cache's store: client-ready answers by key (the caller puts the org in every key).
/// A store that fails answers `None`: a miss, never an error.
#[async_trait::async_trait]
pub trait AnswerCache: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Option<bytes::Bytes>;
    async fn put(&self, key: &str, value: bytes::Bytes, ttl: std::time::Duration);
}

/// Where usage events go: NATS JetStream in production, an in-process channel when embedded.
#[async_trait::async_trait]
pub trait UsageSink: Send + Sync + 'static {
    /// Returns once the event is durably accepted (JetStream ack) or queued in process.
    async fn publish(&self, event: events::UsageEvent) -> Result<()>;

    /// Publishes several events at once; one verdict per event, in order (`true` = accepted as
    /// [`publish`](Self::publish) would be). The default sends them one at a time; sinks that can
    /// pipeline (JetStream) or hand over a whole batch (the embedded bus) do better.
    async fn publish_batch(&self, events: Vec<events::UsageEvent>) -> Vec<bool> {
        let mut verdicts = Vec::with_capacity(events.len());
        for event in events {
            verdicts.push(self.publish(event).await.is_ok());
        }
        verdicts
    }
}

/// What one request asks of the rate limits and budgets of its scopes (key, team, org).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Admission {
    pub request_id: String,
    /// When it was admitted (UTC unix ms): picks the minute window and budget period, at admission and at
    /// settlement alike.
    pub at_ms: i64,
    pub scopes: Vec<auth::Scope>,
    /// Tokens held against tokens-per-minute until settled: an upper bound of input plus `max_tokens`.
    pub tokens: u64,
    /// Money held against budgets until settled (integer micro-units): `tokens` at the highest price
    /// among the candidate deployments.
    pub cost_micros: i64,
}

/// `x-ratelimit-*` headers for the response (the key's own limits).
pub type RateHeaders = Vec<(&'static str, String)>;

/// A refusal, with the headers that explain it.
#[derive(Debug, Clone)]
pub struct Denial {
    pub error: RelayError,
    pub headers: RateHeaders,
}

/// Rate limits and budgets, enforced before dispatch and settled to real usage after.
#[async_trait::async_trait]
pub trait Limiter: Send + Sync + 'static {
    /// Admits the request and holds its reservation, or refuses it. Nothing is held on refusal.
    async fn admit(&self, a: &Admission) -> std::result::Result<RateHeaders, Denial>;
    /// Releases the reservation and books what was really used (zero for a failed request).
    async fn settle(&self, a: &Admission, tokens: u64, cost_micros: i64);
    /// The largest share (0..1) of a budget the admission's scopes have spent this period, for routing
    /// rules that shift traffic as budgets run down; `None` when no scope has a budget (or it is unknown).
    async fn budget_used(&self, a: &Admission) -> Option<f64> {
        let _ = a;
        None
    }
}

/// The set of services one edge talks to, however they are deployed.
#[derive(Clone)]
pub struct Services {
    pub auth: Arc<dyn Authenticator>,
    pub router: Arc<dyn Router>,
    pub adapter: Arc<dyn Adapter>,
    pub usage: Arc<dyn UsageSink>,
    pub limiter: Arc<dyn Limiter>,
    /// Stored Responses state (`store`, `previous_response_id`, `item_reference`); `None`: stateless.
    pub state: Option<Arc<dyn ResponseStore>>,
    /// The response cache's store (Redis shared by every edge, or this process's memory).
    pub cache: Option<Arc<dyn AnswerCache>>,
}
