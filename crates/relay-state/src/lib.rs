//! relay-state: what the Responses API keeps between calls.
//!
//! A stored response (the object the client received, and the whole input of its turn) and each of its
//! items, in `stored_responses` / `stored_items` on Postgres or SQLite; conversations and their items in
//! `conversations` / `conversation_items`. Every row belongs to an org and
//! every query names the caller's org, so an id of another org's object finds nothing, whatever the id.
//! Bodies are sealed with AES-256-GCM under a key from `[state]`, with the org and id as associated data
//! (a row copied under another org or id does not open). Rows expire after the retention period and are
//! purged by [`ResponsesStore::purge_expired`]. The edge decides what to store; this crate only keeps it.

mod batches;
mod conversations;
mod files;
mod seal;

use relay_core::contracts::{ResponseStore, Result};
use relay_core::pb::state::v1::{
    AppendConversationItemsRequest, BatchList, BatchRef, BatchResult, BatchResults, ClaimBatchRequest,
    Conversation, ConversationItemRef, ConversationItems, ConversationRef, FileList, FileRef,
    GetItemsRequest, GetItemsResponse, GetResponseRequest, ListFilesRequest, PutBatchRequest,
    PutConversationRequest, PutFileRequest, PutResponseRequest, StoredBatch, StoredFile, StoredResponse,
};
use relay_core::{ErrorCode, RelayError, Secret};
use relay_db::{Arg, Col, Db};
use serde::Deserialize;

pub use seal::Sealer;

/// `[state]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Keep Responses state (`store`, `previous_response_id`, `item_reference`). Off: the Responses API
    /// is stateless and asking for state is a clear 400.
    pub enabled: bool,
    /// Secret the encryption key is derived from (16+ characters). Unset: derived from `auth.pepper`.
    pub encryption_key: Option<Secret>,
    /// How long stored responses are kept (OpenAI keeps them 30 days).
    pub retention_days: u32,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self { enabled: true, encryption_key: None, retention_days: 30 }
    }
}

impl StateConfig {
    pub fn validate(&self, errors: &mut Vec<String>) {
        if self.encryption_key.as_ref().is_some_and(|k| k.expose().len() < 16) {
            errors.push("state.encryption_key: must be at least 16 characters".into());
        }
        if self.retention_days == 0 || self.retention_days > 3650 {
            errors.push("state.retention_days: must be 1 to 3650".into());
        }
    }
}

const DAY_MS: i64 = 86_400_000;

/// The SQL store.
#[derive(Clone)]
pub struct ResponsesStore {
    db: Db,
    sealer: Sealer,
    retention_days: u32,
}

fn db_error(e: &anyhow::Error) -> RelayError {
    tracing::error!(error = %e, "state database query failed");
    RelayError::new(ErrorCode::Unavailable, "response storage is unavailable")
}

fn not_found(id: &str) -> RelayError {
    RelayError::new(ErrorCode::NotFound, format!("No response found with id '{id}'."))
        .with_param("response_id")
}

impl ResponsesStore {
    pub fn new(db: Db, sealer: Sealer, retention_days: u32) -> Self {
        Self { db, sealer, retention_days: retention_days.max(1) }
    }

    /// Deletes every expired response and item; returns how many rows went.
    pub async fn purge_expired(&self) -> anyhow::Result<u64> {
        let now = relay_core::ids::now_ms();
        let a = self.db.execute("DELETE FROM stored_items WHERE expires_at_ms <= $1", &[now.into()]).await?;
        let b =
            self.db.execute("DELETE FROM stored_responses WHERE expires_at_ms <= $1", &[now.into()]).await?;
        let c = self.purge_conversations(now).await?;
        let d = self.purge_files_and_batches(now).await?;
        Ok(a + b + c + d)
    }

    /// Purges expired rows every hour until `stop`.
    pub async fn purge_forever(self, stop: tokio_util::sync::CancellationToken) {
        loop {
            match self.purge_expired().await {
                Ok(n) if n > 0 => tracing::info!(rows = n, "expired Responses state purged"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "purging expired Responses state failed"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            }
        }
    }
}

/// Ids of the items of a response (its input items, then its output items), with their JSON.
fn items_of(r: &StoredResponse) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for json in [&r.input_json[..], &r.response_json[..]] {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else { continue };
        let list = match v.get("output") {
            Some(serde_json::Value::Array(a)) => a.clone(),
            _ => v.as_array().cloned().unwrap_or_default(),
        };
        for item in list {
            if let Some(id) = item.get("id").and_then(|i| i.as_str()).filter(|i| !i.is_empty()) {
                out.push((id.to_owned(), item.to_string().into_bytes()));
            }
        }
    }
    out
}

#[async_trait::async_trait]
impl ResponseStore for ResponsesStore {
    async fn put_response(&self, req: PutResponseRequest) -> Result<()> {
        let r = req.response.ok_or_else(|| RelayError::invalid_request("no response to store"))?;
        if r.org_id.is_empty() || r.id.is_empty() {
            return Err(RelayError::invalid_request("a stored response needs an org and an id"));
        }
        let days = if req.retention_days == 0 { self.retention_days } else { req.retention_days };
        let expires = r.created_at_unix_ms.saturating_add(i64::from(days) * DAY_MS);
        let seal = |what: &str, id: &str, body: &[u8]| self.sealer.seal(&[&r.org_id, what, id], body);
        let mut tx = self.db.begin().await.map_err(|e| db_error(&e))?;
        let run = async {
            tx.execute(
                "DELETE FROM stored_items WHERE org_id = $1 AND response_id = $2",
                &[(&r.org_id).into(), (&r.id).into()],
            )
            .await?;
            tx.execute(
                "DELETE FROM stored_responses WHERE org_id = $1 AND id = $2",
                &[(&r.org_id).into(), (&r.id).into()],
            )
            .await?;
            tx.execute(
                "INSERT INTO stored_responses (org_id, id, team_id, key_id, previous_response_id, created_at_ms, expires_at_ms, response, input) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    (&r.org_id).into(),
                    (&r.id).into(),
                    (&r.team_id).into(),
                    (&r.key_id).into(),
                    (&r.previous_response_id).into(),
                    r.created_at_unix_ms.into(),
                    expires.into(),
                    seal("response", &r.id, &r.response_json).into(),
                    seal("input", &r.id, &r.input_json).into(),
                ],
            )
            .await?;
            for (item_id, body) in items_of(&r) {
                // An item id seen again (a client resending an item) now belongs to this response.
                tx.execute(
                    "DELETE FROM stored_items WHERE org_id = $1 AND id = $2",
                    &[(&r.org_id).into(), (&item_id).into()],
                )
                .await?;
                tx.execute(
                    "INSERT INTO stored_items (org_id, id, response_id, expires_at_ms, item) VALUES ($1, $2, $3, $4, $5)",
                    &[(&r.org_id).into(), (&item_id).into(), (&r.id).into(), expires.into(), seal("item", &item_id, &body).into()],
                )
                .await?;
            }
            anyhow::Ok(())
        };
        run.await.map_err(|e| db_error(&e))?;
        tx.commit().await.map_err(|e| db_error(&e))
    }

    async fn get_response(&self, req: GetResponseRequest) -> Result<StoredResponse> {
        let rows = self
            .db
            .fetch(
                "SELECT team_id, key_id, previous_response_id, created_at_ms, response, input FROM stored_responses \
                 WHERE org_id = $1 AND id = $2 AND expires_at_ms > $3",
                &[(&req.org_id).into(), (&req.id).into(), relay_core::ids::now_ms().into()],
                &[Col::Text, Col::Text, Col::Text, Col::I64, Col::Bytes, Col::Bytes],
            )
            .await
            .map_err(|e| db_error(&e))?;
        let mut row = rows.into_iter().next().ok_or_else(|| not_found(&req.id))?.into_iter();
        let mut next = || row.next().ok_or_else(|| not_found(&req.id));
        let (team_id, key_id, previous) = (next()?.into_text(), next()?.into_text(), next()?.into_text());
        let created = next()?.i64();
        let open = |what: &str, sealed: Vec<u8>| {
            self.sealer.open(&[&req.org_id, what, &req.id], &sealed).ok_or_else(|| {
                tracing::error!(id = %req.id, "stored response does not decrypt (wrong state.encryption_key?)");
                RelayError::new(ErrorCode::Internal, "the stored response cannot be read")
            })
        };
        let response_json = open("response", next()?.into_bytes())?;
        let input_json = open("input", next()?.into_bytes())?;
        Ok(StoredResponse {
            id: req.id.clone(),
            org_id: req.org_id.clone(),
            team_id,
            key_id,
            created_at_unix_ms: created,
            previous_response_id: previous,
            response_json: response_json.into(),
            input_json: input_json.into(),
        })
    }

    async fn delete_response(&self, req: GetResponseRequest) -> Result<()> {
        let mut tx = self.db.begin().await.map_err(|e| db_error(&e))?;
        let args: [Arg; 2] = [(&req.org_id).into(), (&req.id).into()];
        let gone = async {
            tx.execute("DELETE FROM stored_items WHERE org_id = $1 AND response_id = $2", &args).await?;
            tx.execute("DELETE FROM stored_responses WHERE org_id = $1 AND id = $2", &args).await
        }
        .await
        .map_err(|e| db_error(&e))?;
        tx.commit().await.map_err(|e| db_error(&e))?;
        if gone == 0 { Err(not_found(&req.id)) } else { Ok(()) }
    }

    async fn get_items(&self, req: GetItemsRequest) -> Result<GetItemsResponse> {
        let mut out = GetItemsResponse::default();
        let now = relay_core::ids::now_ms();
        for id in req.ids.iter().take(1000) {
            let rows = self
                .db
                .fetch(
                    "SELECT item FROM stored_items WHERE org_id = $1 AND id = $2 AND expires_at_ms > $3",
                    &[(&req.org_id).into(), id.into(), now.into()],
                    &[Col::Bytes],
                )
                .await
                .map_err(|e| db_error(&e))?;
            if let Some(sealed) = rows.into_iter().next().and_then(|r| r.into_iter().next())
                && let Some(item) = self.sealer.open(&[&req.org_id, "item", id], &sealed.into_bytes())
            {
                out.items.insert(id.clone(), item.into());
            }
        }
        Ok(out)
    }

    async fn put_conversation(&self, req: PutConversationRequest) -> Result<Conversation> {
        self.put_conversation_impl(req).await
    }
    async fn get_conversation(&self, req: ConversationRef) -> Result<Conversation> {
        self.get_conversation_impl(req).await
    }
    async fn delete_conversation(&self, req: ConversationRef) -> Result<()> {
        self.delete_conversation_impl(req).await
    }
    async fn append_conversation_items(&self, req: AppendConversationItemsRequest) -> Result<()> {
        self.append_conversation_items_impl(req).await
    }
    async fn list_conversation_items(&self, req: ConversationRef) -> Result<ConversationItems> {
        self.list_conversation_items_impl(req).await
    }
    async fn delete_conversation_item(&self, req: ConversationItemRef) -> Result<()> {
        self.delete_conversation_item_impl(req).await
    }
    async fn put_file(&self, req: PutFileRequest) -> Result<StoredFile> {
        self.put_file_impl(req).await
    }
    async fn get_file(&self, req: FileRef) -> Result<StoredFile> {
        self.get_file_impl(req).await
    }
    async fn list_files(&self, req: ListFilesRequest) -> Result<FileList> {
        self.list_files_impl(req).await
    }
    async fn delete_file(&self, req: FileRef) -> Result<()> {
        self.delete_file_impl(req).await
    }
    async fn put_batch(&self, req: PutBatchRequest) -> Result<StoredBatch> {
        self.put_batch_impl(req).await
    }
    async fn get_batch(&self, req: BatchRef) -> Result<StoredBatch> {
        self.get_batch_impl(req).await
    }
    async fn list_batches(&self, req: BatchRef) -> Result<BatchList> {
        self.list_batches_impl(req).await
    }
    async fn claim_batch(&self, req: ClaimBatchRequest) -> Result<StoredBatch> {
        self.claim_batch_impl(req).await
    }
    async fn put_batch_result(&self, req: BatchResult) -> Result<()> {
        self.put_batch_result_impl(req).await
    }
    async fn list_batch_results(&self, req: BatchRef) -> Result<BatchResults> {
        self.list_batch_results_impl(req).await
    }
}
