//! The admin API (`/admin/v1`): orgs, teams and virtual keys. JSON in and out, `Authorization: Bearer
//! <admin token>`, described by `GET /admin/v1/openapi.json`. A key's secret appears once, in the answer
//! that creates it. Every change that can narrow access is announced so edges drop cached keys at once.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use relay_core::{ErrorCode, RelayError, Secret};
use relay_runtime::admin::ApiError;
use serde::Deserialize;
use serde_json::json;

use crate::keys;
use crate::store::{KeyStore, Level, NewKey, NewScope};

/// Told whenever access must shrink everywhere now (revocation, disabling).
pub trait Invalidate: Send + Sync + 'static {
    fn invalidate(&self, level: Level, id: &str);
}

#[derive(Clone)]
struct Admin {
    store: KeyStore,
    token: Secret,
    pepper: Secret,
    invalidate: Arc<dyn Invalidate>,
}

/// The admin routes, or none when no admin token is configured.
pub fn router(
    store: KeyStore,
    token: Option<Secret>,
    pepper: Secret,
    invalidate: Arc<dyn Invalidate>,
) -> Option<Router> {
    let token = token.filter(|t| !t.is_empty())?;
    let state = Admin { store, token, pepper, invalidate };
    Some(
        Router::new()
            .route("/admin/v1/openapi.json", get(|| async { Json(openapi()) }))
            .route("/admin/v1/orgs", post(create_org).get(list_orgs))
            .route("/admin/v1/orgs/{id}", get(get_org))
            .route("/admin/v1/orgs/{id}/teams", post(create_team).get(list_teams))
            .route("/admin/v1/orgs/{id}/{action}", post(set_org))
            .route("/admin/v1/teams/{id}", get(get_team))
            .route("/admin/v1/teams/{id}/{action}", post(set_team))
            .route("/admin/v1/keys", post(create_key).get(list_keys))
            .route("/admin/v1/keys/{id}", get(get_key))
            .route("/admin/v1/keys/{id}/{action}", post(set_key))
            .with_state(state),
    )
}

type Answer = Result<Response, ApiError>;

fn check(a: &Admin, headers: &HeaderMap) -> Result<(), ApiError> {
    ApiError::check_bearer(headers, a.token.expose())
}

fn not_found(what: &str) -> ApiError {
    ApiError(RelayError::new(ErrorCode::NotFound, format!("no such {what}")))
}

fn ok(status: StatusCode, v: impl serde::Serialize) -> Answer {
    Ok((status, Json(v)).into_response())
}

fn check_policy(p: &crate::store::Policy) -> Result<(), ApiError> {
    if [p.rpm, p.tpm, p.max_concurrent, p.budget_micros].iter().any(|v| *v < 0) {
        return Err(ApiError::bad_request("limits and budgets cannot be negative"));
    }
    if !["", "daily", "monthly", "total", "prepaid"].contains(&p.budget_period.as_str()) {
        return Err(ApiError::bad_request("budget_period must be daily, monthly, total or prepaid"));
    }
    if p.budget_period == "prepaid" && p.budget_micros != 0 {
        return Err(ApiError::bad_request(
            "a prepaid scope's limit is its top-ups (POST /admin/v1/billing/topups): leave budget_micros 0",
        ));
    }
    Ok(())
}

fn body<T>(b: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

async fn create_org(
    State(a): State<Admin>,
    h: HeaderMap,
    b: Result<Json<NewScope>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    check(&a, &h)?;
    let new = body(b)?;
    check_policy(&new.policy)?;
    if let Some(id) = &new.id
        && a.store.org(id).await?.is_some()
    {
        return Err(ApiError::bad_request("an org with this id exists"));
    }
    ok(StatusCode::CREATED, a.store.create_org(&new).await?)
}

async fn list_orgs(State(a): State<Admin>, h: HeaderMap) -> Answer {
    check(&a, &h)?;
    ok(StatusCode::OK, json!({"data": a.store.orgs().await?}))
}

async fn get_org(State(a): State<Admin>, h: HeaderMap, Path(id): Path<String>) -> Answer {
    check(&a, &h)?;
    ok(StatusCode::OK, a.store.org(&id).await?.ok_or_else(|| not_found("org"))?)
}

async fn create_team(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(org): Path<String>,
    b: Result<Json<NewScope>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    check(&a, &h)?;
    let new = body(b)?;
    check_policy(&new.policy)?;
    ok(StatusCode::CREATED, a.store.create_team(&org, &new).await?.ok_or_else(|| not_found("org"))?)
}

async fn list_teams(State(a): State<Admin>, h: HeaderMap, Path(org): Path<String>) -> Answer {
    check(&a, &h)?;
    ok(StatusCode::OK, json!({"data": a.store.teams(&org).await?}))
}

async fn get_team(State(a): State<Admin>, h: HeaderMap, Path(id): Path<String>) -> Answer {
    check(&a, &h)?;
    ok(StatusCode::OK, a.store.team(&id).await?.ok_or_else(|| not_found("team"))?)
}

async fn create_key(
    State(a): State<Admin>,
    h: HeaderMap,
    b: Result<Json<NewKey>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    check(&a, &h)?;
    let new = body(b)?;
    check_policy(&new.policy)?;
    if new.allowed_regions.len() > 50 || !new.allowed_regions.iter().all(|r| relay_core::is_region_tag(r)) {
        return Err(ApiError::bad_request(
            "allowed_regions entries must be region tags: 1-32 of a-z, 0-9 and '-'",
        ));
    }
    if !new.routing_strategy.is_empty() && relay_select::Strategy::parse(&new.routing_strategy).is_none() {
        return Err(ApiError::bad_request(format!(
            "routing_strategy must be one of {}",
            relay_select::Strategy::NAMES
        )));
    }
    if !new.ip_allowlist.iter().all(|e| relay_core::is_ip_or_cidr(e)) {
        return Err(ApiError::bad_request("ip_allowlist entries must be IP addresses or CIDRs"));
    }
    if !(0..=604_800).contains(&new.response_cache_ttl_secs) {
        return Err(ApiError::bad_request("response_cache_ttl_secs must be 0 to 604800 (a week)"));
    }
    let (id, secret, full) = keys::generate()?;
    let key = a
        .store
        .create_key(&id, &keys::digest(&a.pepper, &secret), &new)
        .await?
        .ok_or_else(|| not_found("team"))?;
    let mut v = serde_json::to_value(&key).map_err(|e| ApiError(RelayError::internal(e.to_string())))?;
    // The only time the secret is ever shown.
    v["key"] = json!(full);
    ok(StatusCode::CREATED, v)
}

#[derive(Deserialize)]
struct KeyFilter {
    team_id: Option<String>,
    org_id: Option<String>,
}

async fn list_keys(State(a): State<Admin>, h: HeaderMap, Query(f): Query<KeyFilter>) -> Answer {
    check(&a, &h)?;
    ok(StatusCode::OK, json!({"data": a.store.keys(f.team_id.as_deref(), f.org_id.as_deref()).await?}))
}

async fn get_key(State(a): State<Admin>, h: HeaderMap, Path(id): Path<String>) -> Answer {
    check(&a, &h)?;
    ok(StatusCode::OK, a.store.key(&id).await?.ok_or_else(|| not_found("key"))?)
}

async fn set(a: &Admin, level: Level, id: &str, action: &str) -> Answer {
    let done = match (level, action) {
        (Level::Key, "revoke") => a.store.revoke_key(id).await?,
        (_, "disable") => a.store.set_enabled(level, id, false).await?,
        (_, "enable") => a.store.set_enabled(level, id, true).await?,
        _ => return Err(not_found("action")),
    };
    if !done {
        return Err(not_found(match level {
            Level::Org => "org",
            Level::Team => "team",
            Level::Key => "key",
        }));
    }
    if action != "enable" {
        a.invalidate.invalidate(level, id);
    }
    let status = match action {
        "revoke" => "revoked",
        "disable" => "disabled",
        _ => "enabled",
    };
    ok(StatusCode::OK, json!({"id": id, "status": status}))
}

async fn set_org(State(a): State<Admin>, h: HeaderMap, Path((id, action)): Path<(String, String)>) -> Answer {
    check(&a, &h)?;
    set(&a, Level::Org, &id, &action).await
}

async fn set_team(
    State(a): State<Admin>,
    h: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Answer {
    check(&a, &h)?;
    set(&a, Level::Team, &id, &action).await
}

async fn set_key(State(a): State<Admin>, h: HeaderMap, Path((id, action)): Path<(String, String)>) -> Answer {
    check(&a, &h)?;
    set(&a, Level::Key, &id, &action).await
}

/// The OpenAPI 3.1 description of this API.
fn openapi() -> serde_json::Value {
    let policy = json!({"rpm": {"type": "integer", "minimum": 0}, "tpm": {"type": "integer", "minimum": 0},
        "max_concurrent": {"type": "integer", "minimum": 0}, "budget_micros": {"type": "integer", "minimum": 0,
        "description": "integer micro-units of USD; 0 = no budget"},
        "budget_period": {"type": "string", "enum": ["daily", "monthly", "total", "prepaid"]}});
    let mut scope = json!({"type": "object", "required": ["name"], "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "metadata": {"type": "object"}}});
    let mut key = json!({"type": "object", "required": ["team_id"], "properties": {"team_id": {"type": "string"}, "name": {"type": "string"},
        "allowed_models": {"type": "array", "items": {"type": "string"}}, "ip_allowlist": {"type": "array", "items": {"type": "string"}}, "allowed_regions": {"type": "array", "items": {"type": "string"}},
        "routing_strategy": {"type": "string", "enum": ["", "weighted", "priority", "cost", "latency", "balanced", "headroom"]},
        "zero_retention": {"type": "boolean", "description": "Store none of this key's content (Responses state, logged prompts and answers)."},
        "response_cache_ttl_secs": {"type": "integer", "minimum": 0, "maximum": 604800, "description": "Cache this key's answers this many seconds (0 = the model group's setting)."},
        "expires_at_ms": {"type": "integer"}, "metadata": {"type": "object"}}});
    for target in [&mut scope, &mut key] {
        if let (Some(props), Some(extra)) = (target["properties"].as_object_mut(), policy.as_object()) {
            props.extend(extra.clone());
        }
    }
    let op = |summary: &str, body: Option<&str>| {
        let mut o = json!({"summary": summary, "responses": {"200": {"description": "OK"}, "401": {"description": "bad admin token"}, "404": {"description": "not found"}}});
        if let Some(schema) = body {
            o["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
        }
        o
    };
    let action = |what: &str| {
        json!({"post": op(&format!("{what}: revoke (keys), disable or enable"), None),
        "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
                       {"name": "action", "in": "path", "required": true, "schema": {"type": "string", "enum": ["revoke", "disable", "enable"]}}]})
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Relay admin API", "version": "1"},
        "components": {
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Scope": scope, "Key": key},
        },
        "security": [{"admin": []}],
        "paths": {
            "/admin/v1/orgs": {"get": op("List orgs", None), "post": op("Create an org", Some("Scope"))},
            "/admin/v1/orgs/{id}": {"get": op("Show an org", None)},
            "/admin/v1/orgs/{id}/teams": {"get": op("List an org's teams", None), "post": op("Create a team", Some("Scope"))},
            "/admin/v1/orgs/{id}/{action}": action("Org"),
            "/admin/v1/teams/{id}": {"get": op("Show a team", None)},
            "/admin/v1/teams/{id}/{action}": action("Team"),
            "/admin/v1/keys": {"get": op("List keys (?team_id=, ?org_id=)", None), "post": op("Create a key; the answer's `key` is the only copy of the secret", Some("Key"))},
            "/admin/v1/keys/{id}": {"get": op("Show a key (never its secret)", None)},
            "/admin/v1/keys/{id}/{action}": action("Key"),
        }
    })
}
