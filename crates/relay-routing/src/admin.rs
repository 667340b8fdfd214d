//! Routing's part of the admin API (`/admin/v1/routing/...`, `Authorization: Bearer <admin token>`),
//! served by the process that runs routing with a database: runtime changes to deployments (weight,
//! `enabled` to drain) and model groups (strategy, hedging delay). A `PATCH` merges its fields (`null`
//! returns a field to the config), `DELETE` drops every change of the target. Changes are stored, so
//! every routing replica applies them within `refresh_ms`, and every edge within its route cache TTL after
//! that. The edge serves `GET /admin/v1/routing` (each group with its health as that edge sees it).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use relay_core::{ErrorCode, RelayError, Secret};
use relay_runtime::admin::ApiError;
use serde_json::{Value, json};

use crate::RoutingService;
use crate::overrides::{DeploymentOverride, ModelOverride, Target};

#[derive(Clone)]
struct Admin {
    routing: Arc<RoutingService>,
    token: Secret,
}

/// The routing admin routes, or none without an admin token or a database.
pub fn router(routing: Arc<RoutingService>, token: Option<Secret>) -> Option<Router> {
    let token = token.filter(|t| !t.is_empty())?;
    routing.store()?;
    Some(
        Router::new()
            .route("/admin/v1/routing/overrides", get(list))
            .route(
                "/admin/v1/routing/deployments/{*id}",
                axum::routing::patch(patch_deployment).delete(reset_deployment),
            )
            .route("/admin/v1/routing/models/{*name}", axum::routing::patch(patch_model).delete(reset_model))
            .with_state(Admin { routing, token }),
    )
}

type Answer = Result<Json<Value>, ApiError>;

fn check<'a>(a: &'a Admin, headers: &HeaderMap) -> Result<&'a crate::overrides::OverrideStore, ApiError> {
    ApiError::check_bearer(headers, a.token.expose())?;
    a.routing.store().ok_or_else(|| ApiError(RelayError::new(ErrorCode::Unavailable, "no routing store")))
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError(RelayError::new(ErrorCode::NotFound, format!("No {what} `{id}` is configured.")))
}

async fn list(State(a): State<Admin>, headers: HeaderMap) -> Answer {
    let store = check(&a, &headers)?;
    let all = store.load().await.map_err(|e| ApiError::storage("routing storage", &e))?;
    Ok(Json(json!(all)))
}

/// Stored, then applied here at once (other replicas within `refresh_ms`).
async fn applied(a: &Admin, v: Value) -> Answer {
    if let Err(e) = a.routing.refresh().await {
        tracing::warn!(error = %e, "routing override stored but not reloaded yet");
    }
    Ok(Json(v))
}

fn patch_error(e: Result<String, anyhow::Error>) -> ApiError {
    match e {
        Ok(msg) => ApiError::bad_request(msg),
        Err(e) => ApiError::storage("routing storage", &e),
    }
}

async fn patch_deployment(
    State(a): State<Admin>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(patch): Json<Value>,
) -> Answer {
    let store = check(&a, &headers)?;
    if !a.routing.has_deployment(&id) {
        return Err(not_found("deployment", &id));
    }
    let o = store.patch::<DeploymentOverride>(&id, &patch).await.map_err(patch_error)?;
    tracing::info!(deployment = %id, change = ?o, "routing change");
    applied(&a, json!({"deployment": id, "override": o})).await
}

async fn patch_model(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(patch): Json<Value>,
) -> Answer {
    let store = check(&a, &headers)?;
    if !a.routing.has_model(&name) {
        return Err(not_found("model group", &name));
    }
    let o = store.patch::<ModelOverride>(&name, &patch).await.map_err(patch_error)?;
    tracing::info!(model = %name, change = ?o, "routing change");
    applied(&a, json!({"model": name, "override": o})).await
}

async fn reset(a: &Admin, headers: &HeaderMap, kind: Target, id: &str) -> Answer {
    let store = check(a, headers)?;
    let existed = store.reset(kind, id).await.map_err(|e| ApiError::storage("routing storage", &e))?;
    applied(a, json!({"target": id, "reset": existed})).await
}

async fn reset_deployment(State(a): State<Admin>, Path(id): Path<String>, headers: HeaderMap) -> Answer {
    reset(&a, &headers, Target::Deployment, &id).await
}

async fn reset_model(State(a): State<Admin>, Path(name): Path<String>, headers: HeaderMap) -> Answer {
    reset(&a, &headers, Target::Model, &name).await
}
