//! relay-billing: turns usage events into records and a double-entry ledger, and answers usage queries.
//!
//! Consumes `relay.usage.v1` events (NATS durable consumer or the in-process bus) in batches and writes,
//! in one transaction per batch, exactly one `usage_records` row and one balanced posting set per billing
//! id (redelivery is a no-op). Prices come from the versioned catalog (`pricing.rs`), postings from
//! `ledger.rs`; `reconcile.rs` proves the books. Events the database refuses (bad data, not an outage) go
//! to `usage_dead_letters` after `max_deliver` tries, so one bad event never stalls the rest. What does not
//! belong here: anything on the request path (billing is never called while a client waits).

pub mod admin;
pub mod ledger;
mod multi_row;
pub use relay_pricing as pricing;
pub mod reconcile;
pub mod reports;
mod store;

use std::sync::Arc;

use prost::Message as _;
use relay_core::contracts::{Billing, Result};
use relay_core::pb::billing::v1::{
    GetUsageRequest, SpentRequest, SpentResponse, UsageSummaryRequest, UsageSummaryResponse,
};
use relay_core::pb::common::v1::Money;
use relay_core::pb::events::v1::UsageEvent;
use relay_core::{ErrorCode, RelayError, USAGE_EVENT_SCHEMA_VERSION};
use relay_events::{Handled, UsageHandler};
use serde::Deserialize;

pub use store::{DeadLetter, RecordOutcome, UsageStore, storable};

/// `[billing]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// Markup on Relay's cost for every customer, in basis points (2500 = +25 %).
    pub default_markup_bps: i64,
    /// Per-team or per-org markups (`scope = "team:<id>"` or `"org:<id>"`); the team's wins.
    pub markups: Vec<ledger::Markup>,
    /// An operator catalog (same format as `deploy/prices/catalog.toml`) loaded after the shipped one.
    pub catalog_file: Option<String>,
    /// Tries of an event the database refuses before it is dead-lettered (outages are retried forever).
    pub max_deliver: u32,
    /// Most events recorded per database transaction (larger deliveries are split).
    pub batch_size: usize,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            default_markup_bps: 0,
            markups: Vec::new(),
            catalog_file: None,
            max_deliver: 3,
            batch_size: 1024,
        }
    }
}

impl BillingConfig {
    pub fn validate(&self, errors: &mut Vec<String>) {
        if !(0..=100_000).contains(&self.default_markup_bps) {
            errors.push("billing.default_markup_bps: must be between 0 and 100000".into());
        }
        for m in &self.markups {
            if !(m.scope.starts_with("team:") || m.scope.starts_with("org:"))
                || !(0..=100_000).contains(&m.bps)
            {
                errors.push(format!(
                    "billing.markups: `{}` needs scope team:<id> or org:<id> and bps 0..=100000",
                    m.scope
                ));
            }
        }
        if self.max_deliver == 0 || self.batch_size == 0 {
            errors.push("billing.max_deliver and billing.batch_size must be at least 1".into());
        }
        if let Some(path) = &self.catalog_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    if let Err(e) = pricing::parse_catalog(&text, path) {
                        errors.extend(e.into_iter().map(|e| format!("billing.catalog_file: {e}")));
                    }
                }
                Err(e) => errors.push(format!("billing.catalog_file: cannot read `{path}`: {e}")),
            }
        }
    }
}

/// How often a running billing re-reads the `prices` table (versions added through another replica's
/// admin API become visible within this).
const PRICE_RELOAD: std::time::Duration = std::time::Duration::from_secs(30);

/// Every price version, as last read from the database, and when.
struct Prices {
    book: std::sync::RwLock<(Arc<pricing::PriceBook>, std::time::Instant)>,
}

impl Prices {
    fn current(&self) -> Arc<pricing::PriceBook> {
        self.book.read().unwrap_or_else(std::sync::PoisonError::into_inner).0.clone()
    }

    fn stale(&self) -> bool {
        self.book.read().unwrap_or_else(std::sync::PoisonError::into_inner).1.elapsed() > PRICE_RELOAD
    }

    fn set(&self, rows: Vec<pricing::PriceRow>) {
        *self.book.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            (Arc::new(pricing::PriceBook::new(rows)), std::time::Instant::now());
    }
}

/// The local billing service (queries) and the source of the recorder.
#[derive(Clone)]
pub struct BillingService {
    store: UsageStore,
    cfg: Arc<BillingConfig>,
    prices: Arc<Prices>,
}

impl BillingService {
    /// Loads the shipped catalog (and the operator's) into the `prices` table and reads every version.
    pub async fn new(store: UsageStore, cfg: BillingConfig) -> anyhow::Result<Self> {
        let mut rows = pricing::parse_catalog(pricing::SHIPPED_CATALOG, "deploy/prices/catalog.toml")
            .map_err(|e| anyhow::anyhow!(e.join("; ")))?;
        if let Some(path) = &cfg.catalog_file {
            let text = std::fs::read_to_string(path)?;
            rows.extend(pricing::parse_catalog(&text, path).map_err(|e| anyhow::anyhow!(e.join("; ")))?);
        }
        store.save_prices(&rows).await?;
        let book = pricing::PriceBook::new(store.load_prices().await?);
        let prices =
            Arc::new(Prices { book: std::sync::RwLock::new((Arc::new(book), std::time::Instant::now())) });
        Ok(Self { store, cfg: Arc::new(cfg), prices })
    }

    /// (everything topped up or credited, all-time spend) of a scope (`key:<id>`, `team:<id>`, `org:<id>`).
    pub async fn balance(&self, scope: &str) -> anyhow::Result<(i64, i64)> {
        let (kind, id) = scope.split_once(':').ok_or_else(|| anyhow::anyhow!("scope must be kind:id"))?;
        let column = match kind {
            "key" => "key_id",
            "team" => "team_id",
            _ => "org_id",
        };
        Ok((self.store.prepaid(scope).await?, self.store.spent(column, id, 0, i64::MAX).await?))
    }

    /// Re-reads every price version (after one was added).
    pub async fn reload_prices(&self) -> anyhow::Result<()> {
        self.prices.set(self.store.load_prices().await?);
        Ok(())
    }

    /// The handler that records consumed events.
    pub fn recorder(&self) -> Recorder {
        Recorder { service: self.clone() }
    }

    pub fn store(&self) -> &UsageStore {
        &self.store
    }
}

/// How long after its request ended an event was booked: the end-to-end billing lag (outbox, bus, batch).
fn record_lag(e: &UsageEvent, now_ms: i64) {
    let ended = e.started_at_unix_ms.saturating_add(i64::try_from(e.duration_ms).unwrap_or(i64::MAX));
    let lag = now_ms.saturating_sub(ended).max(0);
    metrics::histogram!("relay_billing_lag_seconds").record(lag as f64 / 1000.0);
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

    async fn spent(&self, req: SpentRequest) -> Result<SpentResponse> {
        let bad = || RelayError::invalid_request("scope must be key:<id>, team:<id> or org:<id>");
        let (kind, id) = req.scope.split_once(':').ok_or_else(bad)?;
        let column = match kind {
            "key" => "key_id",
            "team" => "team_id",
            "org" => "org_id",
            _ => return Err(bad()),
        };
        let micros = self
            .store
            .spent(column, id, req.from_unix_ms, req.to_unix_ms)
            .await
            .map_err(|e| db_unavailable(&e))?;
        let prepaid = self.store.prepaid(&req.scope).await.map_err(|e| db_unavailable(&e))?;
        Ok(SpentResponse {
            spent: Some(Money { micros, currency: "USD".into() }),
            prepaid: Some(Money { micros: prepaid, currency: "USD".into() }),
        })
    }
}

/// Records each usage event once, with its posting set.
#[derive(Clone)]
pub struct Recorder {
    service: BillingService,
}

impl Recorder {
    pub fn book(&self, e: &UsageEvent) -> ledger::Booking {
        let cfg = &self.service.cfg;
        ledger::book(e, &self.service.prices.current(), &cfg.markups, cfg.default_markup_bps)
    }

    /// One event alone (after its batch failed): stored, retried, or dead-lettered after `max_deliver`.
    async fn one(&self, e: &UsageEvent, attempt: u32) -> Handled {
        let booking = self.book(e);
        match self.service.store.record(e, &booking).await {
            Ok(outcome) => {
                metrics::counter!("relay_usage_events_total", "result" => outcome.label()).increment(1);
                Handled::Stored
            }
            Err(err) if relay_db::is_transient(&err) => Handled::Retry(err.to_string()),
            Err(err) if attempt < self.service.cfg.max_deliver => Handled::Retry(err.to_string()),
            Err(err) => self.dead_letter(&e.request_id, &format!("{err:#}"), e.encode_to_vec()).await,
        }
    }

    async fn dead_letter(&self, request_id: &str, reason: &str, payload: Vec<u8>) -> Handled {
        match self.service.store.dead_letter(request_id, reason, payload).await {
            Ok(()) => {
                metrics::counter!("relay_usage_events_total", "result" => "dead_letter").increment(1);
                tracing::error!(request_id, reason, "usage event dead-lettered");
                Handled::Stored
            }
            Err(e) => Handled::Retry(e.to_string()),
        }
    }
}

impl UsageHandler for Recorder {
    async fn handle_batch(&self, events: &[UsageEvent], attempts: &[u32]) -> Vec<Handled> {
        if self.service.prices.stale()
            && let Err(e) = self.service.reload_prices().await
        {
            tracing::warn!(error = %e, "price catalog not reloaded; using the one in memory");
        }
        let mut verdicts: Vec<Option<Handled>> = vec![None; events.len()];
        let mut batch = Vec::new();
        for (i, e) in events.iter().enumerate() {
            if e.schema_version > USAGE_EVENT_SCHEMA_VERSION {
                // A newer producer: keep it (redelivered) until a billing that understands it runs.
                verdicts[i] =
                    Some(Handled::Retry(format!("usage event schema {} not understood", e.schema_version)));
            } else if e.request_id.is_empty() {
                verdicts[i] =
                    Some(self.dead_letter("", "usage event without a request id", e.encode_to_vec()).await);
            } else {
                batch.push(i);
            }
        }
        // One transaction per `billing.batch_size` events.
        for batch in batch.chunks(self.service.cfg.batch_size.max(1)) {
            let bookings: Vec<_> = batch.iter().map(|&i| self.book(&events[i])).collect();
            let items: Vec<_> = batch.iter().zip(&bookings).map(|(&i, b)| (&events[i], b)).collect();
            match self.service.store.record_batch(&items).await {
                Ok(outcomes) => {
                    let now = relay_core::ids::now_ms();
                    for (&i, o) in batch.iter().zip(outcomes) {
                        metrics::counter!("relay_usage_events_total", "result" => o.label()).increment(1);
                        if o == RecordOutcome::Inserted {
                            record_lag(&events[i], now);
                        }
                        verdicts[i] = Some(Handled::Stored);
                    }
                }
                Err(err) if relay_db::is_transient(&err) => {
                    tracing::warn!(error = %err, "billing database unavailable; batch will be retried");
                    for &i in batch {
                        verdicts[i] = Some(Handled::Retry(err.to_string()));
                    }
                }
                // One bad event fails the whole transaction: find it by recording each alone.
                Err(_) => {
                    for &i in batch {
                        verdicts[i] = Some(self.one(&events[i], attempts.get(i).copied().unwrap_or(1)).await);
                    }
                }
            }
        }
        verdicts.into_iter().map(|v| v.unwrap_or(Handled::Retry("not handled".into()))).collect()
    }

    async fn reject(&self, payload: Vec<u8>, reason: String) -> bool {
        matches!(self.dead_letter("", &reason, payload).await, Handled::Stored)
    }
}
