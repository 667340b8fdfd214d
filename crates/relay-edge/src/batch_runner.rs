//! Relay's batch runner: every edge runs one. It claims a pending batch from the state store under a lease
//! (one runner per batch; a runner that dies loses the lease and another resumes after the lines already
//! answered), sends each line through the edge's own router as the batch's caller (so the key's limits,
//! budget, routing and failover apply, and usage is booked at batch prices), keeps each answer, and at
//! the end writes the output and error files and completes the batch. Relay's own rate limits make a
//! line wait and retry, never fail.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures_util::StreamExt;
use prost::Message as _;
use relay_core::contracts::ResponseStore;
use relay_core::pb::auth::v1::Principal;
use relay_core::pb::state::v1::{
    BatchRef, BatchResult, ClaimBatchRequest, FileRef, PutBatchRequest, StoredBatch,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::Edge;
use crate::batches::{Line, lines, object_of};
use crate::request::BatchCaller;

/// How long a claim lasts without renewal; renewed (and the batch's status checked, so a cancel takes
/// effect) every [`RENEW`].
const LEASE_MS: u32 = 60_000;
const RENEW: Duration = Duration::from_secs(1);
/// Lines of one batch in flight at once.
const CONCURRENCY: usize = 4;
/// How often an idle runner looks for work (a batch created here wakes it at once).
const POLL: Duration = Duration::from_secs(2);
/// Largest answer kept for one line.
const MAX_ANSWER: usize = 64 << 20;

/// Runs batches until `stop`.
pub async fn run(edge: Edge, stop: CancellationToken) {
    let Some(state) = edge.inner.services.state.clone() else { return };
    let runner = format!("runner-{}", uuid::Uuid::now_v7().simple());
    let router = crate::routes::router(edge.clone());
    loop {
        let claimed =
            state.claim_batch(ClaimBatchRequest { runner: runner.clone(), lease_ms: LEASE_MS }).await;
        match claimed {
            Ok(b) if !b.id.is_empty() => {
                let id = b.id.clone();
                if let Err(e) = run_batch(&router, state.as_ref(), b, &stop).await {
                    tracing::warn!(batch_id = %id, error = %e, "batch run interrupted; it resumes when its lease ends");
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "looking for batches to run failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = edge.inner.batch_wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Why a run stopped before the batch was done.
enum Halt {
    Cancelled,
    Expired,
    Stopping,
}

async fn run_batch(
    router: &axum::Router,
    state: &dyn ResponseStore,
    batch: StoredBatch,
    stop: &CancellationToken,
) -> Result<(), relay_core::RelayError> {
    let principal = Arc::new(
        Principal::decode(batch.principal.as_ref())
            .map_err(|_| relay_core::RelayError::internal("the batch's caller cannot be read"))?,
    );
    let object = object_of(&batch);
    let reference = BatchRef { org_id: batch.org_id.clone(), id: batch.id.clone() };
    let now = relay_core::ids::now_ms();
    if batch.status == "cancelling" {
        return finish(state, &principal, batch, "cancelled").await;
    }
    if now >= batch.deadline_unix_ms {
        return finish(state, &principal, batch, "expired").await;
    }
    let file_id = object["input_file_id"].as_str().unwrap_or_default().to_owned();
    let input =
        match state.get_file(FileRef { org_id: batch.org_id.clone(), id: file_id, with_content: true }).await
        {
            Ok(f) => f.content,
            Err(e) if e.code == relay_core::ErrorCode::NotFound => {
                return fail(state, &principal, batch, "input_file_not_found", "The input file was deleted.")
                    .await;
            }
            Err(e) => return Err(e),
        };
    let lines = match lines(&input) {
        Ok(l) => l,
        Err(e) => return fail(state, &principal, batch, "invalid_input", &e.message).await,
    };
    let earlier = state.list_batch_results(reference.clone()).await?.results;
    let done: HashSet<u64> = earlier.iter().map(|r| r.line).collect();
    let mut failed = earlier.iter().filter(|r| !r.ok).count();
    let mut answered = earlier.len();
    let caller = Arc::new(BatchCaller { principal: principal.clone(), batch_id: batch.id.clone() });
    let todo: Vec<(u64, Line)> = lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| (i as u64, l))
        .filter(|(i, _)| !done.contains(i))
        .collect();
    let deadline = batch.deadline_unix_ms;
    let mut answers = futures_util::stream::iter(todo)
        .map(|(i, line)| {
            let (router, caller) = (router.clone(), caller.clone());
            async move { (i, answer_line(router, caller, &line, deadline, stop).await) }
        })
        .buffer_unordered(CONCURRENCY);
    let mut renewed = tokio::time::Instant::now();
    let mut halt = None;
    while let Some((line, outcome)) = answers.next().await {
        let Some((ok, result)) = outcome else {
            halt = Some(Halt::Stopping);
            break;
        };
        metrics::counter!("relay_edge_batch_lines_total", "result" => if ok { "ok" } else { "error" })
            .increment(1);
        let r = BatchResult {
            org_id: batch.org_id.clone(),
            batch_id: batch.id.clone(),
            line,
            ok,
            result_json: result.into(),
        };
        state.put_batch_result(r).await?;
        answered += 1;
        failed += usize::from(!ok);
        if relay_core::ids::now_ms() >= deadline {
            halt = Some(Halt::Expired);
            break;
        }
        if renewed.elapsed() >= RENEW {
            renewed = tokio::time::Instant::now();
            if !progress(state, &batch, answered, failed).await? {
                halt = Some(Halt::Cancelled);
                break;
            }
        }
    }
    drop(answers);
    match halt {
        Some(Halt::Stopping) => {
            // Let another runner (or this one after a restart) resume at once.
            let b = state.get_batch(reference).await?;
            let _ = state
                .put_batch(PutBatchRequest { batch: Some(b), release_lease: true, ..Default::default() })
                .await;
            Ok(())
        }
        Some(Halt::Cancelled) => {
            finish(state, &principal, state.get_batch(reference).await?, "cancelled").await
        }
        Some(Halt::Expired) => finish(state, &principal, state.get_batch(reference).await?, "expired").await,
        None => {
            let b = state.get_batch(reference).await?;
            let status = if b.status == "cancelling" { "cancelled" } else { "completed" };
            finish(state, &principal, b, status).await
        }
    }
}

/// Renews the lease and the batch's counts; false when the batch was cancelled meanwhile.
async fn progress(
    state: &dyn ResponseStore,
    batch: &StoredBatch,
    answered: usize,
    failed: usize,
) -> Result<bool, relay_core::RelayError> {
    let current = state.get_batch(BatchRef { org_id: batch.org_id.clone(), id: batch.id.clone() }).await?;
    if current.status != "in_progress" {
        return Ok(false);
    }
    let mut object = object_of(&current);
    object["request_counts"]["completed"] = json!(answered - failed);
    object["request_counts"]["failed"] = json!(failed);
    let b = StoredBatch { object_json: object.to_string().into(), ..current };
    let req = PutBatchRequest {
        batch: Some(b),
        if_status: vec!["in_progress".into()],
        lease_ms: LEASE_MS,
        ..Default::default()
    };
    match state.put_batch(req).await {
        Ok(_) => Ok(true),
        Err(e) if e.code == relay_core::ErrorCode::InvalidRequest => Ok(false),
        Err(e) => Err(e),
    }
}

/// One line through the router as the batch's caller: `(ok, output line)`, or `None` when the runner is
/// stopping. Relay's own 429s (the key's rate limits) wait and retry until the batch's deadline.
async fn answer_line(
    router: axum::Router,
    caller: Arc<BatchCaller>,
    line: &Line,
    deadline: i64,
    stop: &CancellationToken,
) -> Option<(bool, String)> {
    let body = line.body.to_string();
    loop {
        if stop.is_cancelled() {
            return None;
        }
        let req = Request::post(&line.url)
            .header(header::CONTENT_TYPE, "application/json")
            .extension(caller.clone())
            .body(Body::from(body.clone()))
            .ok()?;
        let Ok(resp) = router.clone().oneshot(req).await;
        let status = resp.status();
        let request_id =
            resp.headers().get("x-relay-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let retry_after =
            resp.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let bytes = axum::body::to_bytes(resp.into_body(), MAX_ANSWER).await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        let limited = status == StatusCode::TOO_MANY_REQUESTS && body["error"]["type"] == "rate_limit_error";
        if limited && relay_core::ids::now_ms() < deadline {
            let wait = Duration::from_secs(retry_after.unwrap_or(1).clamp(1, 60));
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(wait) => continue,
            }
        }
        let out = json!({
            "id": format!("batch_req_{}", uuid::Uuid::now_v7().simple()),
            "custom_id": line.custom_id,
            "response": {"status_code": status.as_u16(), "request_id": request_id, "body": body},
            "error": null,
        });
        return Some((status.is_success(), out.to_string()));
    }
}

async fn fail(
    state: &dyn ResponseStore,
    principal: &Principal,
    mut batch: StoredBatch,
    code: &str,
    message: &str,
) -> Result<(), relay_core::RelayError> {
    let mut object = object_of(&batch);
    object["errors"] =
        json!({"object": "list", "data": [{"code": code, "message": message, "param": null, "line": null}]});
    batch.object_json = object.to_string().into();
    finish(state, principal, batch, "failed").await
}

/// Writes the output and error files from the answered lines and ends the batch in `status`.
async fn finish(
    state: &dyn ResponseStore,
    principal: &Principal,
    batch: StoredBatch,
    status: &str,
) -> Result<(), relay_core::RelayError> {
    let reference = BatchRef { org_id: batch.org_id.clone(), id: batch.id.clone() };
    let results = state.list_batch_results(reference).await?.results;
    let now = relay_core::ids::now_ms() / 1000;
    let mut object = object_of(&batch);
    let mut made = Vec::new();
    for (ok, key) in [(true, "output_file_id"), (false, "error_file_id")] {
        let body: Vec<&[u8]> =
            results.iter().filter(|r| r.ok == ok).map(|r| r.result_json.as_ref()).collect();
        if body.is_empty() {
            continue;
        }
        let content = bytes::Bytes::from([body.join(&b'\n'), b"\n".to_vec()].concat());
        let name = format!("{}_{}.jsonl", batch.id, if ok { "output" } else { "error" });
        let file = crate::files::store(state, principal, &name, "batch_output", content).await?;
        object[key] = json!(file.id);
        made.push(file.id);
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    object["request_counts"]["completed"] = json!(results.len() - failed);
    object["request_counts"]["failed"] = json!(failed);
    object["status"] = json!(status);
    object["finalizing_at"] = json!(now);
    let at = match status {
        "completed" => "completed_at",
        "cancelled" => "cancelled_at",
        "expired" => "expired_at",
        _ => "failed_at",
    };
    object[at] = json!(now);
    let b = StoredBatch { status: status.to_owned(), object_json: object.to_string().into(), ..batch };
    let req = PutBatchRequest {
        batch: Some(b),
        if_status: vec!["validating".into(), "in_progress".into(), "cancelling".into()],
        release_lease: true,
        ..Default::default()
    };
    if let Err(e) = state.put_batch(req).await {
        // Finalised elsewhere meanwhile: this run's files are not the batch's.
        for id in made {
            let _ = state
                .delete_file(FileRef { org_id: principal.org_id.clone(), id, with_content: false })
                .await;
        }
        return Err(e);
    }
    Ok(())
}
