//! The HTTP surface: routes, models, embeddings, and OpenAI-shaped answers for everything else.

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use relay_core::pb::adapter::v1::EmbedRequest;
use relay_core::pb::auth::v1::Principal;
use relay_core::{ErrorCode, RelayError};
use serde::Deserialize;
use serde_json::json;

use crate::Edge;
use crate::chat;
use crate::dispatch::{
    Order, admission, admit, billable, check_end_user, decide, ensure_allowed, read_json, required_model,
    resident, route, served_headers,
};
use crate::error::{Inbound, OpenAiError};
use crate::failover::with_failover;
use crate::request::{self, RequestCtx};
use crate::usage::UsageRecord;

pub fn router(edge: Edge) -> Router {
    // SDK-native prefixes: clients configured with a base URL of `<relay>/openai/v1` or
    // `<relay>/anthropic/v1` (as some gateways publish them) reach the same endpoints.
    // Gemini-shaped clients use `<relay>` or `<relay>/gemini` as their base URL.
    let api = api();
    Router::new()
        .merge(api.clone())
        .nest("/openai", api.clone())
        .nest("/anthropic", api.clone())
        .nest("/gemini", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(edge.clone(), request::middleware))
        .with_state(edge)
}

fn api() -> Router<Edge> {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/messages", post(chat::messages))
        .route("/v1/messages/count_tokens", post(chat::count_tokens))
        .route("/v1/responses", post(chat::responses))
        .route(
            "/v1/responses/{id}",
            axum::routing::get(crate::state::get_response).delete(crate::state::delete_response),
        )
        .route("/v1/responses/{id}/input_items", axum::routing::get(crate::state::list_input_items))
        .route("/v1/files", get(crate::files::list).post(crate::files::upload))
        .route("/v1/files/{id}", get(crate::files::get).delete(crate::files::delete))
        .route("/v1/files/{id}/content", get(crate::files::content))
        .route("/v1/batches", get(crate::batches::list).post(crate::batches::create))
        .route("/v1/batches/{id}", get(crate::batches::get))
        .route("/v1/batches/{id}/cancel", post(crate::batches::cancel))
        .route("/v1/conversations", post(crate::conversations::create))
        .route(
            "/v1/conversations/{id}",
            get(crate::conversations::get)
                .post(crate::conversations::update)
                .delete(crate::conversations::delete),
        )
        .route(
            "/v1/conversations/{id}/items",
            get(crate::conversations::list_items).post(crate::conversations::add_items),
        )
        .route(
            "/v1/conversations/{id}/items/{item_id}",
            get(crate::conversations::get_item).delete(crate::conversations::delete_item),
        )
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(crate::forward::completions))
        .route("/v1/moderations", post(crate::forward::moderations))
        .route("/v1/images/generations", post(crate::forward::images))
        .route("/v1/audio/speech", post(crate::forward::speech))
        .route("/v1/audio/transcriptions", post(crate::forward::transcriptions))
        .route("/v1/audio/translations", post(crate::forward::translations))
        .route("/v1/rerank", post(crate::forward::rerank))
        .route("/v1/models", get(list_models))
        // Gemini's stable `v1` shares `/v1/models/...` with OpenAI's model lookups.
        .route("/v1/models/{*id}", get(get_model).post(crate::gemini::model_action))
        .route("/v1beta/models", get(crate::gemini::list_models))
        .route("/v1beta/models/{*tail}", get(crate::gemini::get_model).post(crate::gemini::model_action))
}

/// A known path with a method it does not serve (the error body is OpenAI's, like every other).
async fn method_not_allowed() -> Response {
    let body = json!({"error": {"message": "This method is not allowed for this endpoint.",
        "type": "invalid_request_error", "param": null, "code": "method_not_allowed"}});
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

async fn not_found() -> Response {
    OpenAiError(RelayError::new(ErrorCode::NotFound, "Unknown endpoint.")).into_response()
}

fn model_json(m: &relay_core::pb::routing::v1::ModelInfo) -> serde_json::Value {
    json!({"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by})
}

pub(crate) async fn visible_models(
    edge: &Edge,
    p: &Principal,
) -> Result<Vec<relay_core::pb::routing::v1::ModelInfo>, RelayError> {
    let all = edge.inner.services.router.list_models().await?.models;
    Ok(all.into_iter().filter(|m| relay_core::model_allowed(&p.allowed_models, &m.id)).collect())
}

async fn list_models(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    Query(params): Query<crate::gemini::Params>,
    headers: HeaderMap,
) -> Response {
    // Gemini's stable API lists models on the same path.
    if crate::gemini::is_gemini_client(&headers, &params) {
        return crate::gemini::list_models(State(edge), Extension(ctx), Query(params), headers).await;
    }
    // Anthropic SDKs send `anthropic-version` and expect their own list shape (and error shape).
    let inbound =
        if headers.contains_key("anthropic-version") { Inbound::Anthropic } else { Inbound::OpenAiChat };
    let models = match edge.principal(&ctx, &headers).await {
        Ok(p) => visible_models(&edge, &p).await,
        Err(e) => Err(e),
    };
    let models = match models {
        Ok(m) => m,
        Err(e) => return inbound.error(e),
    };
    if inbound == Inbound::Anthropic {
        let data: Vec<_> = models
            .iter()
            .map(|m| json!({"type": "model", "id": m.id, "display_name": m.id, "created_at": "2025-01-01T00:00:00Z"}))
            .collect();
        let (first, last) = (models.first().map(|m| m.id.clone()), models.last().map(|m| m.id.clone()));
        return axum::Json(json!({"data": data, "has_more": false, "first_id": first, "last_id": last}))
            .into_response();
    }
    let data: Vec<_> = models.iter().map(model_json).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    Query(params): Query<crate::gemini::Params>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, OpenAiError> {
    if crate::gemini::is_gemini_client(&headers, &params) {
        return Ok(
            crate::gemini::get_model(State(edge), Extension(ctx), Path(id), Query(params), headers).await
        );
    }
    let p = edge.principal(&ctx, &headers).await?;
    let models = visible_models(&edge, &p).await?;
    let m = models.iter().find(|m| m.id == id).ok_or_else(|| {
        RelayError::new(ErrorCode::ModelNotFound, format!("The model `{id}` does not exist."))
            .with_param("model")
    })?;
    Ok(axum::Json(model_json(m)).into_response())
}

#[derive(Deserialize)]
struct EmbedEnvelope {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    user: Option<String>,
}

async fn embeddings(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OpenAiError> {
    let p = edge.principal(&ctx, &headers).await?;
    let mut rec = UsageRecord::new(&edge, &ctx, &p, crate::error::Inbound::Embeddings.protocol());
    match embed(&edge, &ctx, &p, &headers, body, &mut rec).await {
        Ok(resp) => {
            rec.usage(resp.usage.unwrap_or_default());
            rec.first_byte();
            let mut r = (StatusCode::OK, resp.body).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            served_headers(r.headers_mut(), &rec);
            rec.succeed();
            Ok(r)
        }
        Err(e) => {
            let mut r = OpenAiError(e.clone()).into_response();
            served_headers(r.headers_mut(), &rec);
            rec.fail(&e, e.http_status());
            Ok(r)
        }
    }
}

async fn embed(
    edge: &Edge,
    ctx: &RequestCtx,
    p: &Principal,
    headers: &HeaderMap,
    body: Body,
    rec: &mut UsageRecord,
) -> Result<relay_core::pb::adapter::v1::EmbedResponse, RelayError> {
    let (bytes, env): (axum::body::Bytes, EmbedEnvelope) = read_json(edge, body).await?;
    let model = required_model(env.model)?;
    if env.input.is_none() {
        return Err(RelayError::invalid_request("you must provide an input parameter").with_param("input"));
    }
    check_end_user(env.user.as_deref().unwrap_or(""), "user")?;
    rec.request(&model, false, env.user.as_deref().unwrap_or(""), &bytes);
    ensure_allowed(p, &model)?;
    let route = route(edge, &model, false).await?;
    let candidates = resident(p, &model, &route.candidates)?;
    let candidates = billable(p, &model, &candidates)?;
    let lease = admission(
        ctx,
        p,
        bytes.len(),
        crate::dispatch::OutputLimit { tokens: Some(0), choices: 1, images: 0 },
        &candidates,
    );
    admit(edge, rec, lease).await.map_err(|d| d.error)?;
    let decision = decide(edge, headers, p, &route, rec.lease()).await?;
    rec.routing_rule(decision.rule.as_deref());
    let strategy = decision.strategy;
    let order = Order { strategy, tokens: (bytes.len() as u64 / 4, 0), ..Default::default() }.hedging(&route);
    with_failover(edge, &candidates, order, Some(rec), |dep| {
        let req = EmbedRequest {
            request_id: ctx.request_id.clone(),
            body: bytes.clone(),
            deployment: Some(dep.clone()),
        };
        edge.inner.services.adapter.embed(req)
    })
    .await
}
