//! Conversations API storage: `conversations` (one row per conversation, sealed metadata) and
//! `conversation_items` (sealed items in order, numbered by `seq`). Every statement names the org, and a
//! conversation that is absent, expired or another org's is NOT_FOUND. Appends lock the conversation row
//! (its expiry is pushed forward first), so concurrent appends keep a gapless order.

use relay_core::contracts::Result;
use relay_core::pb::state::v1::{
    AppendConversationItemsRequest, Conversation, ConversationItemRef, ConversationItems, ConversationRef,
    PutConversationRequest,
};
use relay_core::{ErrorCode, RelayError};
use relay_db::{Arg, Col, Tx};

use crate::{DAY_MS, ResponsesStore, db_error};

/// Most items one conversation holds (an append past it is a 400).
pub const MAX_ITEMS: i64 = 10_000;

fn not_found(id: &str) -> RelayError {
    RelayError::new(ErrorCode::NotFound, format!("Conversation with id '{id}' not found."))
        .with_param("conversation_id")
}

fn item_id(item: &[u8]) -> Result<String> {
    serde_json::from_slice::<serde_json::Value>(item)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
        .filter(|i| !i.is_empty())
        .ok_or_else(|| RelayError::invalid_request("every conversation item needs an id"))
}

impl ResponsesStore {
    fn expiry(&self, retention_days: u32) -> i64 {
        let days = if retention_days == 0 { self.retention_days } else { retention_days };
        relay_core::ids::now_ms().saturating_add(i64::from(days) * DAY_MS)
    }

    /// Pushes a live conversation's expiry forward, which also locks its row for the transaction;
    /// NOT_FOUND when the org has no such live conversation.
    async fn touch(&self, tx: &mut Tx, org: &str, id: &str, expires: i64) -> Result<()> {
        let n = tx
            .execute(
                "UPDATE conversations SET expires_at_ms = $1 WHERE org_id = $2 AND id = $3 AND expires_at_ms > $4",
                &[expires.into(), org.into(), id.into(), relay_core::ids::now_ms().into()],
            )
            .await
            .map_err(|e| db_error(&e))?;
        if n == 0 { Err(not_found(id)) } else { Ok(()) }
    }

    async fn insert_items(
        &self,
        tx: &mut Tx,
        org: &str,
        conversation: &str,
        items: &[impl AsRef<[u8]>],
    ) -> Result<()> {
        let rows = tx
            .fetch(
                "SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM conversation_items WHERE org_id = $1 AND conversation_id = $2",
                &[org.into(), conversation.into()],
                &[Col::I64, Col::I64],
            )
            .await
            .map_err(|e| db_error(&e))?;
        let (mut seq, count) = rows.first().map_or((0, 0), |r| (r[0].i64(), r[1].i64()));
        if count + items.len() as i64 > MAX_ITEMS {
            return Err(RelayError::invalid_request(format!(
                "a conversation holds at most {MAX_ITEMS} items"
            ))
            .with_param("items"));
        }
        let mut seen = std::collections::HashSet::new();
        for item in items {
            let item = item.as_ref();
            let id = item_id(item)?;
            // Ids are unique within a conversation (the caller holds the conversation's row lock).
            let taken = !seen.insert(id.clone())
                || !tx
                    .fetch(
                        "SELECT seq FROM conversation_items WHERE org_id = $1 AND conversation_id = $2 AND id = $3",
                        &[org.into(), conversation.into(), (&id).into()],
                        &[Col::I64],
                    )
                    .await
                    .map_err(|e| db_error(&e))?
                    .is_empty();
            if taken {
                return Err(RelayError::invalid_request(format!(
                    "An item with id '{id}' is already in the conversation."
                ))
                .with_param("items"));
            }
            seq += 1;
            let sealed = self.sealer.seal(&[org, "conversation-item", conversation, &id], item);
            tx.execute(
                "INSERT INTO conversation_items (org_id, conversation_id, seq, id, item) VALUES ($1, $2, $3, $4, $5)",
                &[org.into(), conversation.into(), seq.into(), Arg::Text(id), sealed.into()],
            )
            .await
            .map_err(|e| db_error(&e))?;
        }
        Ok(())
    }

    pub(crate) async fn put_conversation_impl(&self, req: PutConversationRequest) -> Result<Conversation> {
        let c = req.conversation.ok_or_else(|| RelayError::invalid_request("no conversation to store"))?;
        if c.org_id.is_empty() || c.id.is_empty() {
            return Err(RelayError::invalid_request("a conversation needs an org and an id"));
        }
        let expires = self.expiry(req.retention_days);
        let metadata = self.sealer.seal(&[&c.org_id, "conversation", &c.id], &c.metadata_json);
        let mut tx = self.db.begin().await.map_err(|e| db_error(&e))?;
        if req.update {
            self.touch(&mut tx, &c.org_id, &c.id, expires).await?;
            tx.execute(
                "UPDATE conversations SET metadata = $1 WHERE org_id = $2 AND id = $3",
                &[metadata.into(), (&c.org_id).into(), (&c.id).into()],
            )
            .await
            .map_err(|e| db_error(&e))?;
        } else {
            tx.execute(
                "INSERT INTO conversations (org_id, id, team_id, key_id, created_at_ms, expires_at_ms, metadata) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    (&c.org_id).into(),
                    (&c.id).into(),
                    (&c.team_id).into(),
                    (&c.key_id).into(),
                    c.created_at_unix_ms.into(),
                    expires.into(),
                    metadata.into(),
                ],
            )
            .await
            .map_err(|e| db_error(&e))?;
            self.insert_items(&mut tx, &c.org_id, &c.id, &req.items).await?;
        }
        tx.commit().await.map_err(|e| db_error(&e))?;
        self.get_conversation_impl(ConversationRef { org_id: c.org_id, id: c.id }).await
    }

    pub(crate) async fn get_conversation_impl(&self, req: ConversationRef) -> Result<Conversation> {
        let rows = self
            .db
            .fetch(
                "SELECT team_id, key_id, created_at_ms, metadata FROM conversations \
                 WHERE org_id = $1 AND id = $2 AND expires_at_ms > $3",
                &[(&req.org_id).into(), (&req.id).into(), relay_core::ids::now_ms().into()],
                &[Col::Text, Col::Text, Col::I64, Col::Bytes],
            )
            .await
            .map_err(|e| db_error(&e))?;
        let mut row = rows.into_iter().next().ok_or_else(|| not_found(&req.id))?.into_iter();
        let mut next = || row.next().ok_or_else(|| not_found(&req.id));
        let (team_id, key_id, created) = (next()?.into_text(), next()?.into_text(), next()?.i64());
        let metadata = self
            .sealer
            .open(&[&req.org_id, "conversation", &req.id], &next()?.into_bytes())
            .ok_or_else(|| RelayError::new(ErrorCode::Internal, "the stored conversation cannot be read"))?;
        Ok(Conversation {
            id: req.id,
            org_id: req.org_id,
            team_id,
            key_id,
            created_at_unix_ms: created,
            metadata_json: metadata.into(),
        })
    }

    pub(crate) async fn delete_conversation_impl(&self, req: ConversationRef) -> Result<()> {
        let args: [Arg; 2] = [(&req.org_id).into(), (&req.id).into()];
        let mut tx = self.db.begin().await.map_err(|e| db_error(&e))?;
        let gone = async {
            tx.execute("DELETE FROM conversation_items WHERE org_id = $1 AND conversation_id = $2", &args)
                .await?;
            tx.execute("DELETE FROM conversations WHERE org_id = $1 AND id = $2", &args).await
        }
        .await
        .map_err(|e| db_error(&e))?;
        tx.commit().await.map_err(|e| db_error(&e))?;
        if gone == 0 { Err(not_found(&req.id)) } else { Ok(()) }
    }

    pub(crate) async fn append_conversation_items_impl(
        &self,
        req: AppendConversationItemsRequest,
    ) -> Result<()> {
        let expires = self.expiry(req.retention_days);
        let mut tx = self.db.begin().await.map_err(|e| db_error(&e))?;
        self.touch(&mut tx, &req.org_id, &req.conversation_id, expires).await?;
        self.insert_items(&mut tx, &req.org_id, &req.conversation_id, &req.items).await?;
        tx.commit().await.map_err(|e| db_error(&e))
    }

    pub(crate) async fn list_conversation_items_impl(
        &self,
        req: ConversationRef,
    ) -> Result<ConversationItems> {
        // The conversation must be the org's and live (its items carry no expiry of their own).
        self.get_conversation_impl(req.clone()).await?;
        let rows = self
            .db
            .fetch(
                "SELECT id, item FROM conversation_items WHERE org_id = $1 AND conversation_id = $2 ORDER BY seq",
                &[(&req.org_id).into(), (&req.id).into()],
                &[Col::Text, Col::Bytes],
            )
            .await
            .map_err(|e| db_error(&e))?;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows {
            let mut row = row.into_iter();
            let (Some(id), Some(sealed)) = (row.next(), row.next()) else { continue };
            let item = self
                .sealer
                .open(&[&req.org_id, "conversation-item", &req.id, id.text()], &sealed.into_bytes())
                .ok_or_else(|| {
                    RelayError::new(ErrorCode::Internal, "a stored conversation item cannot be read")
                })?;
            items.push(item.into());
        }
        Ok(ConversationItems { items })
    }

    pub(crate) async fn delete_conversation_item_impl(&self, req: ConversationItemRef) -> Result<()> {
        let mut tx = self.db.begin().await.map_err(|e| db_error(&e))?;
        self.touch(&mut tx, &req.org_id, &req.conversation_id, self.expiry(0)).await?;
        let n = tx
            .execute(
                "DELETE FROM conversation_items WHERE org_id = $1 AND conversation_id = $2 AND id = $3",
                &[(&req.org_id).into(), (&req.conversation_id).into(), (&req.item_id).into()],
            )
            .await
            .map_err(|e| db_error(&e))?;
        if n == 0 {
            return Err(RelayError::new(
                ErrorCode::NotFound,
                format!("Item with id '{}' not found.", req.item_id),
            )
            .with_param("item_id"));
        }
        tx.commit().await.map_err(|e| db_error(&e))
    }

    /// Conversations past their expiry, with their items; returns how many rows went.
    pub(crate) async fn purge_conversations(&self, now: i64) -> anyhow::Result<u64> {
        let items = self
            .db
            .execute(
                "DELETE FROM conversation_items WHERE EXISTS (SELECT 1 FROM conversations c \
                 WHERE c.org_id = conversation_items.org_id AND c.id = conversation_items.conversation_id AND c.expires_at_ms <= $1)",
                &[now.into()],
            )
            .await?;
        let convs =
            self.db.execute("DELETE FROM conversations WHERE expires_at_ms <= $1", &[now.into()]).await?;
        Ok(items + convs)
    }
}
