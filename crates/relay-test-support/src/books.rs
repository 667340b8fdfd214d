//! A stand-in for billing's books, as the limiter reads them: what each scope spent (`Spent` RPC).

use std::collections::HashMap;

use relay_core::contracts::{Billing, Result};
use relay_core::pb::billing::v1::{
    GetUsageRequest, SpentRequest, SpentResponse, UsageSummaryRequest, UsageSummaryResponse,
};
use relay_core::pb::common::v1::Money;
use relay_core::pb::events::v1::UsageEvent;
use relay_core::{ErrorCode, RelayError};

/// Every scope spent `default` micros, except those named in `spent`.
pub struct Books {
    pub default: i64,
    pub spent: HashMap<String, i64>,
}

impl Books {
    pub fn new(default: i64, spent: &[(&str, i64)]) -> Self {
        Self { default, spent: spent.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect() }
    }
}

#[async_trait::async_trait]
impl Billing for Books {
    async fn get_usage(&self, _: GetUsageRequest) -> Result<UsageEvent> {
        Err(RelayError::new(ErrorCode::NotFound, "no usage in these books"))
    }
    async fn usage_summary(&self, _: UsageSummaryRequest) -> Result<UsageSummaryResponse> {
        Ok(UsageSummaryResponse::default())
    }
    async fn spent(&self, req: SpentRequest) -> Result<SpentResponse> {
        assert!(req.from_unix_ms < req.to_unix_ms, "an empty window");
        let micros = self.spent.get(&req.scope).copied().unwrap_or(self.default);
        Ok(SpentResponse { spent: Some(Money { micros, currency: "USD".into() }), prepaid: None })
    }
}
