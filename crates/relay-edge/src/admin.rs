//! The edge's part of the admin API: `GET /admin/v1/routing` (`Authorization: Bearer <admin token>`),
//! every model group as routing serves it now (runtime changes applied, drained deployments left out,
//! fallback groups after its own), with each deployment's health as this edge replica sees it: breaker
//! state (shared by every replica), recent p95 and moving average of time to answer, error rate,
//! upstream headroom; and the retry budget left. Changes are made on routing's admin API.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use relay_core::Secret;
use relay_core::pb::routing::v1::RouteRequest;
use relay_runtime::admin::ApiError;
use serde_json::{Value, json};

use crate::Edge;

#[derive(Clone)]
struct Admin {
    edge: Edge,
    token: Secret,
}

/// The edge admin routes, or none when no admin token is configured.
pub fn router(edge: Edge, token: Option<Secret>) -> Option<Router> {
    let token = token.filter(|t| !t.is_empty())?;
    Some(Router::new().route("/admin/v1/routing", get(routing)).with_state(Admin { edge, token }))
}

async fn routing(State(a): State<Admin>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    ApiError::check_bearer(&headers, a.token.expose())?;
    let services = &a.edge.inner.services;
    let selector = &a.edge.inner.selector;
    let mut groups = Vec::new();
    for m in services.router.list_models().await?.models {
        let route =
            match services.router.route(RouteRequest { model: m.id.clone(), ..Default::default() }).await {
                Ok(r) => r,
                Err(e) => {
                    groups.push(json!({"model": m.id, "error": e.message}));
                    continue;
                }
            };
        let deployments: Vec<Value> = route
            .candidates
            .iter()
            .map(|d| {
                let h = selector.health(&d.id);
                json!({
                    "id": d.id,
                    "group": d.group,
                    "provider": d.provider,
                    "upstream_model": d.upstream_model,
                    "weight": d.weight,
                    "region": d.region,
                    "price": d.price.as_ref().map(|p| json!({
                        "input_per_mtok_micros": p.input_per_mtok_micros,
                        "output_per_mtok_micros": p.output_per_mtok_micros,
                        "per_image_micros": p.per_image_micros,
                        "per_mchar_micros": p.per_mchar_micros,
                        "currency": p.currency,
                    })),
                    "free": d.free,
                    "requests_per_minute": d.requests_per_minute,
                    "tokens_per_minute": d.tokens_per_minute,
                    "health": {
                        "breaker": h.breaker,
                        "consecutive_failures": h.consecutive_failures,
                        "p95_ms": h.p95_ms,
                        "latency_ewma_ms": h.latency_ewma_ms,
                        "error_rate": h.error_rate,
                        "headroom": h.headroom,
                        "attempts": h.attempts,
                        "failures": h.failures,
                    },
                })
            })
            .collect();
        let strategy = relay_select::Strategy::parse(&route.strategy).unwrap_or_default().name();
        groups.push(json!({
            "model": m.id,
            "strategy": strategy,
            "hedge_after_ms": route.hedge_after_ms,
            "deployments": deployments,
        }));
    }
    Ok(Json(json!({"models": groups, "retry_budget_left": selector.retry_budget_left()})))
}
