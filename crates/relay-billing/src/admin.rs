//! Billing's part of the admin API (`/admin/v1`, `Authorization: Bearer <admin token>`), served by the
//! process that runs billing: usage and spend grouped for dashboards, the CSV export, the price catalog
//! (list, and add a price version), and the reconcile report.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use relay_core::{ErrorCode, RelayError, Secret};
use relay_runtime::admin::ApiError;
use serde::Deserialize;
use serde_json::json;

use crate::BillingService;
use crate::pricing::PriceEntry;
use crate::reports::{self, GroupBy};

#[derive(Clone)]
struct Admin {
    billing: BillingService,
    token: Secret,
}

/// The billing admin routes, or none when no admin token is configured.
pub fn router(billing: BillingService, token: Option<Secret>) -> Option<Router> {
    let token = token.filter(|t| !t.is_empty())?;
    Some(
        Router::new()
            .route("/admin/v1/usage", get(usage))
            .route("/admin/v1/usage/export", get(export))
            .route("/admin/v1/prices", get(list_prices).post(add_price))
            .route("/admin/v1/billing/reconcile", get(reconcile))
            .route("/admin/v1/billing/topups", axum::routing::post(topup))
            .route("/admin/v1/billing/credits", axum::routing::post(credit))
            .route("/admin/v1/billing/balance", get(balance))
            .with_state(Admin { billing, token }),
    )
}

fn check(a: &Admin, headers: &HeaderMap) -> Result<(), ApiError> {
    ApiError::check_bearer(headers, a.token.expose())
}

/// `from` / `to`: `YYYY-MM-DD` (UTC) or unix milliseconds; `to` is exclusive and defaults to now.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Period {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    scope: Option<String>,
    format: Option<String>,
}

fn instant(v: Option<&str>, default: i64, name: &str) -> Result<i64, ApiError> {
    match v {
        None => Ok(default),
        Some(s) => s.parse::<i64>().ok().or_else(|| reports::date_ms(s)).ok_or_else(|| {
            ApiError::bad_request(format!("`{name}` must be YYYY-MM-DD or unix milliseconds"))
        }),
    }
}

fn period(p: &Period) -> Result<(i64, i64), ApiError> {
    let from = instant(p.from.as_deref(), 0, "from")?;
    let to = instant(p.to.as_deref(), relay_core::ids::now_ms() + 1, "to")?;
    if to <= from {
        return Err(ApiError::bad_request("`to` must be after `from`"));
    }
    Ok((from, to))
}

async fn usage(State(a): State<Admin>, headers: HeaderMap, q: Query<Period>) -> Result<Response, ApiError> {
    check(&a, &headers)?;
    let (from, to) = period(&q)?;
    let group = match q.group_by.as_deref() {
        None => GroupBy::Day,
        Some(g) => GroupBy::parse(g)
            .ok_or_else(|| ApiError::bad_request("`group_by` must be day, model, key, team or org"))?,
    };
    if q.scope.as_deref().is_some_and(|s| !["key:", "team:", "org:"].iter().any(|p| s.starts_with(p))) {
        return Err(ApiError::bad_request("`scope` must be key:<id>, team:<id> or org:<id>"));
    }
    let rows = reports::usage(a.billing.store().db(), from, to, group, q.scope.as_deref()).await?;
    Ok(Json(json!({"object": "list", "from_ms": from, "to_ms": to, "data": rows})).into_response())
}

async fn export(State(a): State<Admin>, headers: HeaderMap, q: Query<Period>) -> Result<Response, ApiError> {
    check(&a, &headers)?;
    let (from, to) = period(&q)?;
    let focus = match q.format.as_deref() {
        None | Some("relay") => false,
        Some("focus") => true,
        Some(_) => return Err(ApiError::bad_request("`format` must be relay or focus")),
    };
    let csv = reports::export_csv(a.billing.store().db(), from, to, focus).await?;
    let mut resp = csv.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    Ok(resp)
}

async fn list_prices(State(a): State<Admin>, headers: HeaderMap) -> Result<Response, ApiError> {
    check(&a, &headers)?;
    let rows = a.billing.store().load_prices().await?;
    Ok(Json(json!({"object": "list", "data": rows})).into_response())
}

/// Adds a price version. Versions are immutable: the same provider, model and `valid_from_ms` is a 409.
async fn add_price(
    State(a): State<Admin>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check(&a, &headers)?;
    let entry: PriceEntry =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid price: {e}")))?;
    let row = entry.into_row("USD", "admin API").map_err(ApiError::bad_request)?;
    if a.billing.store().load_prices().await?.iter().any(|r| r.id == row.id) {
        return Err(ApiError(RelayError::new(
            ErrorCode::InvalidRequest,
            format!("price version `{}` exists; add a version with a later valid_from_ms", row.id),
        )));
    }
    a.billing.store().save_prices(std::slice::from_ref(&row)).await?;
    a.billing.reload_prices().await?;
    Ok((StatusCode::CREATED, Json(row)).into_response())
}

async fn reconcile(State(a): State<Admin>, headers: HeaderMap) -> Result<Response, ApiError> {
    check(&a, &headers)?;
    let r = crate::reconcile::check(a.billing.store().db()).await?;
    Ok(Json(json!({
        "ok": r.ok(),
        "records": r.records,
        "posting_sets": r.transactions,
        "unbalanced_posting_sets": r.unbalanced_transactions,
        "records_without_postings": r.records_without_postings,
        "postings_without_record": r.postings_without_record,
        "dead_letters": r.dead_letters,
        "sell_micros": {"records": r.sell_micros_records, "ledger": r.sell_micros_ledger},
        "cost_micros": {"records": r.cost_micros_records, "ledger": r.cost_micros_ledger},
        "hedge_overhead_micros": r.overhead_micros_ledger,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credit {
    scope: String,
    amount_micros: i64,
    #[serde(default)]
    memo: String,
}

/// Money received for a prepaid scope.
async fn topup(
    State(a): State<Admin>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    post_credit(a, headers, body, "topup").await
}

/// Money given to a prepaid scope (a goodwill credit, a correction): a new entry, never an edit.
async fn credit(
    State(a): State<Admin>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    post_credit(a, headers, body, "adjustment").await
}

async fn post_credit(
    a: Admin,
    headers: HeaderMap,
    body: axum::body::Bytes,
    kind: &'static str,
) -> Result<Response, ApiError> {
    check(&a, &headers)?;
    let c: Credit =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    if !["key:", "team:", "org:"].iter().any(|p| c.scope.starts_with(p)) || c.scope.len() > 300 {
        return Err(ApiError::bad_request("`scope` must be key:<id>, team:<id> or org:<id>"));
    }
    if c.amount_micros <= 0 || c.amount_micros > i64::MAX / 4 {
        return Err(ApiError::bad_request("`amount_micros` must be a positive number of micro-units"));
    }
    let id = a.billing.store().credit(&c.scope, c.amount_micros, kind, &c.memo).await?;
    let b = scope_balance(&a, &c.scope).await?;
    Ok((StatusCode::CREATED, Json(json!({"id": id, "kind": kind, "scope": c.scope, "balance": b})))
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeQuery {
    scope: String,
}

async fn balance(
    State(a): State<Admin>,
    headers: HeaderMap,
    q: Query<ScopeQuery>,
) -> Result<Response, ApiError> {
    check(&a, &headers)?;
    if !["key:", "team:", "org:"].iter().any(|p| q.scope.starts_with(p)) {
        return Err(ApiError::bad_request("`scope` must be key:<id>, team:<id> or org:<id>"));
    }
    Ok(Json(scope_balance(&a, &q.scope).await?).into_response())
}

/// Prepaid, all-time spend and what is left, for one scope.
async fn scope_balance(a: &Admin, scope: &str) -> Result<serde_json::Value, ApiError> {
    let (prepaid, spent) = a.billing.balance(scope).await?;
    Ok(
        json!({"scope": scope, "prepaid_micros": prepaid, "spent_micros": spent, "balance_micros": prepaid - spent}),
    )
}
