//! The Batches API (`/v1/batches`): a batch of an org's input file, run by Relay itself on any upstream
//! (see `batch_runner.rs`: each line goes through the same pipeline as a live request of the key, with
//! its limits and budget, and is billed at batch prices). Batches and their files belong to the key's org;
//! another org's batch or file ids are 404 whatever they are.

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use prost::Message as _;
use relay_core::pb::state::v1::{BatchRef, FileRef, PutBatchRequest, StoredBatch};
use relay_core::{ErrorCode, RelayError};
use serde_json::{Map, Value, json};

use crate::Edge;
use crate::listing::answer;
use crate::request::RequestCtx;
use crate::state::{new_id, owned};

/// Endpoints a batch may target.
pub const ENDPOINTS: [&str; 5] =
    ["/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions", "/v1/moderations"];
/// Most lines one batch may hold (OpenAI's limit).
const MAX_LINES: usize = 50_000;
/// The one completion window (OpenAI's).
const WINDOW_MS: i64 = 24 * 3_600_000;

fn bad(param: &str, msg: impl Into<String>) -> RelayError {
    RelayError::invalid_request(msg).with_param(param)
}

/// One line of a batch input file.
#[derive(Debug, Clone)]
pub struct Line {
    pub custom_id: String,
    pub url: String,
    pub body: Value,
}

/// The lines of a batch input file (JSONL), each checked: a unique `custom_id`, `method` POST, a supported
/// `url`, an object `body` that does not ask to stream.
pub fn lines(content: &[u8]) -> Result<Vec<Line>, RelayError> {
    let text =
        std::str::from_utf8(content).map_err(|_| bad("file", "a batch input file must be UTF-8 JSONL"))?;
    let mut out: Vec<Line> = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (i, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let n = i + 1;
        let v: Map<String, Value> =
            serde_json::from_str(raw).map_err(|_| bad("file", format!("line {n} is not a JSON object")))?;
        let custom_id = v
            .get("custom_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("file", format!("line {n}: `custom_id` is required")))?;
        if !ids.insert(custom_id.to_owned()) {
            return Err(bad("file", format!("line {n}: `custom_id` {custom_id:?} is used twice")));
        }
        if v.get("method").and_then(Value::as_str) != Some("POST") {
            return Err(bad("file", format!("line {n}: `method` must be POST")));
        }
        let url = v.get("url").and_then(Value::as_str).unwrap_or_default();
        if !ENDPOINTS.contains(&url) {
            return Err(bad("file", format!("line {n}: `url` must be one of {}", ENDPOINTS.join(", "))));
        }
        let body = v
            .get("body")
            .filter(|b| b.is_object())
            .ok_or_else(|| bad("file", format!("line {n}: `body` must be an object")))?;
        if body.get("stream") == Some(&Value::Bool(true)) {
            return Err(bad("file", format!("line {n}: batch requests cannot stream")));
        }
        out.push(Line { custom_id: custom_id.to_owned(), url: url.to_owned(), body: body.clone() });
        if out.len() > MAX_LINES {
            return Err(bad("file", format!("a batch holds at most {MAX_LINES} requests")));
        }
    }
    if out.is_empty() {
        return Err(bad("file", "the batch input file holds no requests"));
    }
    Ok(out)
}

/// The check an upload with purpose `batch` gets.
pub fn check_input_file(content: &[u8]) -> Result<(), RelayError> {
    lines(content).map(|_| ())
}

fn metadata(v: Option<&Value>) -> Result<Value, RelayError> {
    match v {
        None | Some(Value::Null) => Ok(json!({})),
        Some(Value::Object(m)) if m.len() <= 16 && m.values().all(Value::is_string) => {
            Ok(Value::Object(m.clone()))
        }
        Some(_) => Err(bad("metadata", "`metadata` must be an object of at most 16 strings")),
    }
}

pub(crate) fn object_of(b: &StoredBatch) -> Value {
    serde_json::from_slice(&b.object_json)
        .unwrap_or_else(|_| json!({"id": b.id, "object": "batch", "status": b.status}))
}

/// `POST /v1/batches` (`input_file_id`, `endpoint`, `completion_window` = "24h", `metadata`).
pub async fn create(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            if p.zero_retention {
                return Err(RelayError::invalid_request(
                    "this key is zero-retention: Relay stores nothing for it, so it cannot run batches",
                ));
            }
            let (_, body): (_, Map<String, Value>) = crate::dispatch::read_json(&edge, raw).await?;
            let endpoint = body.get("endpoint").and_then(Value::as_str).unwrap_or_default();
            if !ENDPOINTS.contains(&endpoint) {
                return Err(bad("endpoint", format!("`endpoint` must be one of {}", ENDPOINTS.join(", "))));
            }
            if body.get("completion_window").and_then(Value::as_str) != Some("24h") {
                return Err(bad("completion_window", "`completion_window` must be \"24h\""));
            }
            let file_id = body
                .get("input_file_id")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("input_file_id", "`input_file_id` is required"))?;
            let file = state
                .get_file(FileRef { org_id: p.org_id.clone(), id: file_id.to_owned(), with_content: true })
                .await
                .map_err(|e| match e.code {
                    ErrorCode::NotFound => bad("input_file_id", format!("No such File object: {file_id}")),
                    _ => e,
                })?;
            let lines = lines(&file.content).map_err(|e| bad("input_file_id", e.message))?;
            if let Some(other) = lines.iter().position(|l| l.url != endpoint) {
                return Err(bad("input_file_id", format!("line {}: `url` is not the batch's endpoint {endpoint}", other + 1)));
            }
            let now = relay_core::ids::now_ms();
            let id = new_id("batch");
            let object = json!({
                "id": id, "object": "batch", "endpoint": endpoint, "errors": null, "input_file_id": file_id,
                "completion_window": "24h", "status": "in_progress", "output_file_id": null, "error_file_id": null,
                "created_at": now / 1000, "in_progress_at": now / 1000, "expires_at": (now + WINDOW_MS) / 1000,
                "finalizing_at": null, "completed_at": null, "failed_at": null, "expired_at": null,
                "cancelling_at": null, "cancelled_at": null,
                "request_counts": {"total": lines.len(), "completed": 0, "failed": 0},
                "metadata": metadata(body.get("metadata"))?,
            });
            let batch = StoredBatch {
                id,
                org_id: p.org_id.clone(),
                team_id: p.team_id.clone(),
                key_id: p.key_id.clone(),
                created_at_unix_ms: now,
                status: "in_progress".into(),
                object_json: object.to_string().into(),
                principal: p.encode_to_vec().into(),
                deadline_unix_ms: now + WINDOW_MS,
            };
            let stored = state.put_batch(PutBatchRequest { batch: Some(batch), create: true, ..Default::default() }).await?;
            edge.inner.batch_wake.notify_one();
            Ok(object_of(&stored))
        }
        .await,
    )
}

/// `GET /v1/batches/{id}`.
pub async fn get(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            Ok(object_of(&state.get_batch(BatchRef { org_id: p.org_id.clone(), id }).await?))
        }
        .await,
    )
}

#[derive(serde::Deserialize, Default)]
pub struct BatchQuery {
    limit: Option<usize>,
    after: Option<String>,
}

/// `GET /v1/batches` (`limit` up to 100, `after`), newest first.
pub async fn list(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Query(q): Query<BatchQuery>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            let all = state.list_batches(BatchRef { org_id: p.org_id.clone(), id: String::new() }).await?;
            let batches: Vec<Value> = all.batches.iter().map(object_of).collect();
            Ok(crate::listing::page(batches, q.after.as_deref(), q.limit.unwrap_or(20).clamp(1, 100)))
        }
        .await,
    )
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` until the runner stops it (lines already answered are
/// kept in its output file).
pub async fn cancel(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            let b = state.get_batch(BatchRef { org_id: p.org_id.clone(), id }).await?;
            let mut object = object_of(&b);
            object["status"] = json!("cancelling");
            object["cancelling_at"] = json!(relay_core::ids::now_ms() / 1000);
            let batch =
                StoredBatch { status: "cancelling".into(), object_json: object.to_string().into(), ..b };
            let req = PutBatchRequest {
                batch: Some(batch),
                if_status: vec!["validating".into(), "in_progress".into()],
                // The lease stays as it is: the runner holding it sees the change between lines.
                ..Default::default()
            };
            let stored = state.put_batch(req).await?;
            edge.inner.batch_wake.notify_one();
            Ok(object_of(&stored))
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_lines_are_checked() {
        let ok = br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}

{"custom_id":"b","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#;
        assert_eq!(lines(ok).unwrap().len(), 2);
        for (bad_file, says) in [
            (&b"not json"[..], "not a JSON object"),
            (br#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#, "custom_id"),
            (br#"{"custom_id":"a","method":"GET","url":"/v1/chat/completions","body":{}}"#, "POST"),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/files","body":{}}"#, "url"),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"stream":true}}"#, "stream"),
            (b"", "no requests"),
        ] {
            let e = lines(bad_file).unwrap_err();
            assert!(e.message.contains(says), "{}: {}", String::from_utf8_lossy(bad_file), e.message);
        }
        let line = br#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{}}"#;
        let twice = [&line[..], b"\n", &line[..]].concat();
        assert!(lines(&twice).unwrap_err().message.contains("twice"));
    }
}
