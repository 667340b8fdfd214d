//! The Files API (`/v1/files`): uploads kept in Relay's state store, sealed at rest and owned by the key's
//! org. A file id is a random name, never a capability: every lookup is by (org, id), so another org's id
//! is 404 whatever it is, and a list shows the caller's org only. Zero-retention keys cannot upload.

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use relay_core::pb::state::v1::{FileRef, ListFilesRequest, PutFileRequest, StoredFile};
use relay_core::{ErrorCode, RelayError};
use serde_json::{Value, json};

use crate::Edge;
use crate::error::Inbound;
use crate::listing::answer;
use crate::multipart;
use crate::request::RequestCtx;
use crate::state::owned;

/// Purposes the Files API accepts.
const PURPOSES: [&str; 6] = ["batch", "assistants", "fine-tune", "vision", "user_data", "evals"];
/// Largest upload (also bounded by the edge's `max_body_bytes`).
pub const MAX_FILE_BYTES: usize = 100 << 20;

pub(crate) fn object(f: &StoredFile) -> Value {
    json!({"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at_unix_ms / 1000,
        "expires_at": f.expires_at_unix_ms / 1000, "filename": f.filename, "purpose": f.purpose,
        "status": "processed", "status_details": null})
}

/// Stores content as a file of the principal's org (uploads, and the output files of batches).
pub(crate) async fn store(
    state: &dyn relay_core::contracts::ResponseStore,
    p: &relay_core::pb::auth::v1::Principal,
    filename: &str,
    purpose: &str,
    content: bytes::Bytes,
) -> Result<StoredFile, RelayError> {
    let file = StoredFile {
        // OpenAI's file ids are `file-…` (a dash, unlike its other ids).
        id: format!("file-{}", uuid::Uuid::now_v7().simple()),
        org_id: p.org_id.clone(),
        team_id: p.team_id.clone(),
        key_id: p.key_id.clone(),
        filename: filename.to_owned(),
        purpose: purpose.to_owned(),
        bytes: content.len() as u64,
        created_at_unix_ms: relay_core::ids::now_ms(),
        expires_at_unix_ms: 0,
        content,
    };
    state.put_file(PutFileRequest { file: Some(file), retention_days: 0 }).await
}

/// `POST /v1/files` (multipart: `file`, `purpose`).
pub async fn upload(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            if p.zero_retention {
                return Err(RelayError::invalid_request(
                    "this key is zero-retention: Relay stores nothing for it, so it cannot upload files",
                ));
            }
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let boundary = multipart::boundary(content_type)?;
            let limit = edge.inner.cfg.max_body_bytes.min(MAX_FILE_BYTES);
            let timeout = std::time::Duration::from_millis(edge.inner.cfg.body_read_timeout_ms);
            let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
                Ok(Ok(b)) => b,
                Ok(Err(_)) => {
                    return Err(RelayError::new(
                        ErrorCode::PayloadTooLarge,
                        format!("The file is too large: at most {limit} bytes are accepted."),
                    ));
                }
                Err(_) => {
                    return Err(RelayError::new(
                        ErrorCode::RequestTimeout,
                        "The upload was not received in time.",
                    ));
                }
            };
            let parts = multipart::parse(&bytes, &boundary)?;
            let purpose = multipart::text(&parts, "purpose")
                .ok_or_else(|| RelayError::invalid_request("`purpose` is required").with_param("purpose"))?;
            if !PURPOSES.contains(&purpose) {
                return Err(RelayError::invalid_request(format!(
                    "`purpose` must be one of {}",
                    PURPOSES.join(", ")
                ))
                .with_param("purpose"));
            }
            let file = parts
                .iter()
                .find(|f| f.name == "file" && f.filename.is_some())
                .ok_or_else(|| RelayError::invalid_request("`file` is required").with_param("file"))?;
            let filename = file.filename.clone().unwrap_or_default();
            if purpose == "batch" {
                crate::batches::check_input_file(&file.data)?;
            }
            Ok(object(&store(state.as_ref(), &p, &filename, purpose, file.data.clone()).await?))
        }
        .await,
    )
}

#[derive(serde::Deserialize, Default)]
pub struct FileQuery {
    purpose: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
    order: Option<String>,
}

/// `GET /v1/files` (`purpose`, `limit` up to 10,000, `after`, `order` = desc by default).
pub async fn list(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            let req =
                ListFilesRequest { org_id: p.org_id.clone(), purpose: q.purpose.clone().unwrap_or_default() };
            let mut files: Vec<Value> = state.list_files(req).await?.files.iter().map(object).collect();
            if q.order.as_deref() == Some("asc") {
                files.reverse();
            }
            Ok(crate::listing::page(files, q.after.as_deref(), q.limit.unwrap_or(10_000).clamp(1, 10_000)))
        }
        .await,
    )
}

async fn file(
    edge: &Edge,
    ctx: &RequestCtx,
    headers: &HeaderMap,
    id: String,
    with_content: bool,
) -> Result<StoredFile, RelayError> {
    let (p, state) = owned(edge, ctx, headers).await?;
    state.get_file(FileRef { org_id: p.org_id.clone(), id, with_content }).await
}

/// `GET /v1/files/{id}`.
pub async fn get(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(file(&edge, &ctx, &headers, id, false).await.map(|f| object(&f)))
}

/// `GET /v1/files/{id}/content`: the bytes as uploaded (or as a batch wrote them).
pub async fn content(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match file(&edge, &ctx, &headers, id, true).await {
        Ok(f) => {
            let mut r = (StatusCode::OK, f.content).into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            r
        }
        Err(e) => Inbound::OpenAiChat.error(e),
    }
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            state
                .delete_file(FileRef { org_id: p.org_id.clone(), id: id.clone(), with_content: false })
                .await?;
            Ok(json!({"id": id, "object": "file", "deleted": true}))
        }
        .await,
    )
}
