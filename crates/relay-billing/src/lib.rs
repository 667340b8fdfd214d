//! relay-billing: turns usage events into records, and answers usage queries.
//!
//! Consumes `relay.usage.v1` events (NATS durable consumer or the in-process bus), writes exactly one
//! `usage_records` row per request id (redelivery is a no-op), and serves [`Billing`] queries. The
//! double-entry ledger and pricing build on these records. What does not belong here: anything on the
//! request path (billing is never called while a client waits).

mod store;

use relay_core::contracts::{Billing, Result};
use relay_core::pb::billing::v1::{GetUsageRequest, UsageSummaryRequest, UsageSummaryResponse};
use relay_core::pb::events::v1::UsageEvent;
use relay_core::{ErrorCode, RelayError, USAGE_EVENT_SCHEMA_VERSION};
use relay_events::UsageHandler;

pub use store::{RecordOutcome, UsageStore};

/// The local billing service (queries).
#[derive(Clone)]
pub struct BillingService {
    store: UsageStore,
}

impl BillingService {
    pub fn new(store: UsageStore) -> Self {
        Self { store }
    }

    /// The handler that records consumed events.
    pub fn recorder(&self) -> Recorder {
        Recorder { store: self.store.clone() }
    }
}

fn db_unavailable(e: &anyhow::Error) -> RelayError {
    tracing::error!(error = %e, "billing database query failed");
    RelayError::new(ErrorCode::Unavailable, "billing storage is unavailable")
}

#[async_trait::async_trait]
impl Billing for BillingService {
    async fn get_usage(&self, req: GetUsageRequest) -> Result<UsageEvent> {
        self.store
            .get(&req.request_id)
            .await
            .map_err(|e| db_unavailable(&e))?
            .ok_or_else(|| RelayError::new(ErrorCode::NotFound, "no usage recorded for this request id"))
    }

    async fn usage_summary(&self, req: UsageSummaryRequest) -> Result<UsageSummaryResponse> {
        let to = if req.to_unix_ms == 0 { i64::MAX } else { req.to_unix_ms };
        self.store.summary(&req.key_id, req.from_unix_ms, to).await.map_err(|e| db_unavailable(&e))
    }
}

/// Records each usage event once.
#[derive(Clone)]
pub struct Recorder {
    store: UsageStore,
}

impl UsageHandler for Recorder {
    async fn handle(&self, event: UsageEvent) -> anyhow::Result<()> {
        if event.schema_version > USAGE_EVENT_SCHEMA_VERSION || event.request_id.is_empty() {
            // A newer producer: keep it in the stream (nak) until a billing that understands it runs.
            anyhow::bail!("usage event schema {} not understood", event.schema_version);
        }
        let outcome = self.store.record(&event).await?;
        metrics::counter!("relay_usage_events_total", "result" => outcome.label()).increment(1);
        tracing::debug!(request_id = %event.request_id, result = outcome.label(), "usage event recorded");
        Ok(())
    }
}
