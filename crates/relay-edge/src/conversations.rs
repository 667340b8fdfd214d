//! The Conversations API (`/v1/conversations` and its items), kept in Relay's state store and owned by the
//! key's org: another org's conversation ids are 404 whatever the request. A Responses request naming a
//! `conversation` gets its items as context, and its new input and output are appended after the answer
//! (see `state.rs`). Zero-retention keys cannot create or add to conversations.

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use relay_core::pb::auth::v1::Principal;
use relay_core::pb::state::v1::{
    AppendConversationItemsRequest, Conversation, ConversationItemRef, ConversationRef,
    PutConversationRequest,
};
use relay_core::{ErrorCode, RelayError};
use serde_json::{Map, Value, json};

use crate::Edge;
use crate::listing::answer;
use crate::request::RequestCtx;
use crate::state::{ListQuery, new_id, owned, page};

/// OpenAI's limits: 20 items when creating or adding, 16 metadata pairs.
const MAX_ITEMS_PER_CALL: usize = 20;
const MAX_METADATA_KEYS: usize = 16;

fn bad(param: &str, msg: impl Into<String>) -> RelayError {
    RelayError::invalid_request(msg).with_param(param)
}

pub(crate) fn object(c: &Conversation) -> Value {
    let metadata: Value = serde_json::from_slice(&c.metadata_json).unwrap_or_else(|_| json!({}));
    json!({"id": c.id, "object": "conversation", "created_at": c.created_at_unix_ms / 1000, "metadata": metadata})
}

/// `metadata`: at most 16 string pairs, keys up to 64 characters, values up to 512.
fn metadata(v: Option<&Value>) -> Result<Vec<u8>, RelayError> {
    let m = match v {
        None | Some(Value::Null) => return Ok(b"{}".to_vec()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad("metadata", "`metadata` must be an object of strings")),
    };
    if m.len() > MAX_METADATA_KEYS {
        return Err(bad("metadata", format!("`metadata` holds at most {MAX_METADATA_KEYS} pairs")));
    }
    for (k, v) in m {
        let ok = k.chars().count() <= 64 && v.as_str().is_some_and(|s| s.chars().count() <= 512);
        if !ok {
            return Err(bad(
                "metadata",
                "`metadata` keys are at most 64 characters and values strings of at most 512",
            ));
        }
    }
    Ok(Value::Object(m.clone()).to_string().into_bytes())
}

/// An item as stored and listed: an id, `type`, message content as a list of parts, and a status.
pub(crate) fn normalise(item: &Value, param: &str) -> Result<Value, RelayError> {
    let mut o = item
        .as_object()
        .cloned()
        .ok_or_else(|| bad(param, format!("each of `{param}` must be an object")))?;
    if o.get("type").is_none() && o.contains_key("role") {
        o.insert("type".into(), json!("message"));
    }
    let kind = o.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
    if kind.is_empty() || kind == "item_reference" {
        return Err(bad(
            param,
            format!("each of `{param}` needs a `type` (a message or another Responses item)"),
        ));
    }
    if kind == "message" {
        let role = o.get("role").and_then(Value::as_str).unwrap_or("user");
        let part = if role == "assistant" { "output_text" } else { "input_text" };
        if let Some(Value::String(s)) = o.get("content") {
            let parts = json!([{"type": part, "text": s}]);
            o.insert("content".into(), parts);
        }
        o.entry("status").or_insert(json!("completed"));
    }
    if o.get("id").and_then(Value::as_str).is_none_or(str::is_empty) {
        let prefix = match kind.as_str() {
            "function_call" => "fc",
            "function_call_output" => "fco",
            "reasoning" => "rs",
            _ => "msg",
        };
        o.insert("id".into(), Value::String(new_id(prefix)));
    }
    Ok(Value::Object(o))
}

fn items(v: Option<&Value>, required: bool) -> Result<Vec<Value>, RelayError> {
    let list = match v {
        None | Some(Value::Null) if !required => return Ok(vec![]),
        Some(Value::Array(a)) if !(required && a.is_empty()) => a,
        _ => return Err(bad("items", "`items` must be an array of items")),
    };
    if list.len() > MAX_ITEMS_PER_CALL {
        return Err(bad("items", format!("at most {MAX_ITEMS_PER_CALL} items per request")));
    }
    list.iter().map(|i| normalise(i, "items")).collect()
}

fn keeps_state(p: &Principal) -> Result<(), RelayError> {
    if p.zero_retention {
        return Err(bad(
            "conversation",
            "this key is zero-retention: Relay stores nothing for it, so it cannot keep conversations",
        ));
    }
    Ok(())
}

async fn body(edge: &Edge, body: Body) -> Result<Map<String, Value>, RelayError> {
    let (_, v): (_, Value) = crate::dispatch::read_json(edge, body).await?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(RelayError::invalid_request("the body must be a JSON object")),
    }
}

fn list(items: Vec<Value>) -> Value {
    let n = items.len();
    crate::listing::page(items, None, n.max(1))
}

fn bytes_of(items: &[Value]) -> Vec<bytes::Bytes> {
    items.iter().map(|i| bytes::Bytes::from(i.to_string())).collect()
}

/// `POST /v1/conversations`.
pub async fn create(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            keeps_state(&p)?;
            let b = body(&edge, raw).await?;
            let c = Conversation {
                id: new_id("conv"),
                org_id: p.org_id.clone(),
                team_id: p.team_id.clone(),
                key_id: p.key_id.clone(),
                created_at_unix_ms: relay_core::ids::now_ms(),
                metadata_json: metadata(b.get("metadata"))?.into(),
            };
            let items = items(b.get("items"), false)?;
            let req = PutConversationRequest {
                conversation: Some(c),
                items: bytes_of(&items),
                retention_days: 0,
                update: false,
            };
            Ok(object(&state.put_conversation(req).await?))
        }
        .await,
    )
}

/// `GET /v1/conversations/{id}`.
pub async fn get(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            Ok(object(&state.get_conversation(ConversationRef { org_id: p.org_id.clone(), id }).await?))
        }
        .await,
    )
}

/// `POST /v1/conversations/{id}`: replaces the metadata.
pub async fn update(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Body,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            keeps_state(&p)?;
            let b = body(&edge, raw).await?;
            let metadata = b.get("metadata").ok_or_else(|| bad("metadata", "`metadata` is required"))?;
            let c = Conversation {
                id,
                org_id: p.org_id.clone(),
                metadata_json: self::metadata(Some(metadata))?.into(),
                ..Default::default()
            };
            let req = PutConversationRequest {
                conversation: Some(c),
                items: vec![],
                retention_days: 0,
                update: true,
            };
            Ok(object(&state.put_conversation(req).await?))
        }
        .await,
    )
}

/// `DELETE /v1/conversations/{id}`.
pub async fn delete(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            state.delete_conversation(ConversationRef { org_id: p.org_id.clone(), id: id.clone() }).await?;
            Ok(json!({"id": id, "object": "conversation.deleted", "deleted": true}))
        }
        .await,
    )
}

/// `POST /v1/conversations/{id}/items`: returns the added items.
pub async fn add_items(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Body,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            keeps_state(&p)?;
            let b = body(&edge, raw).await?;
            let items = items(b.get("items"), true)?;
            let req = AppendConversationItemsRequest {
                org_id: p.org_id.clone(),
                conversation_id: id,
                items: bytes_of(&items),
                retention_days: 0,
            };
            state.append_conversation_items(req).await?;
            Ok(list(items))
        }
        .await,
    )
}

/// A conversation's items, oldest first (the org's only).
pub(crate) async fn all_items(
    state: &dyn relay_core::contracts::ResponseStore,
    org: &str,
    id: &str,
) -> Result<Vec<Value>, RelayError> {
    let r =
        state.list_conversation_items(ConversationRef { org_id: org.to_owned(), id: id.to_owned() }).await?;
    Ok(r.items.iter().filter_map(|b| serde_json::from_slice(b).ok()).collect())
}

/// `GET /v1/conversations/{id}/items` (`limit`, `order` = desc by default, `after`).
pub async fn list_items(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            let items = all_items(state.as_ref(), &p.org_id, &id).await?;
            Ok(page(items, &q))
        }
        .await,
    )
}

/// `GET /v1/conversations/{id}/items/{item_id}`.
pub async fn get_item(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path((id, item_id)): Path<(String, String)>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            let items = all_items(state.as_ref(), &p.org_id, &id).await?;
            items
                .into_iter()
                .find(|i| i.get("id").and_then(Value::as_str) == Some(item_id.as_str()))
                .ok_or_else(|| {
                    RelayError::new(ErrorCode::NotFound, format!("Item with id '{item_id}' not found."))
                        .with_param("item_id")
                })
        }
        .await,
    )
}

/// `DELETE /v1/conversations/{id}/items/{item_id}`: returns the conversation.
pub async fn delete_item(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path((id, item_id)): Path<(String, String)>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            let org = p.org_id.clone();
            state
                .delete_conversation_item(ConversationItemRef {
                    org_id: org.clone(),
                    conversation_id: id.clone(),
                    item_id,
                })
                .await?;
            Ok(object(&state.get_conversation(ConversationRef { org_id: org, id }).await?))
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_normalised_with_ids() {
        let i = normalise(&json!({"role": "user", "content": "hi"}), "items").unwrap();
        assert_eq!(i["type"], "message");
        assert_eq!(i["content"], json!([{"type": "input_text", "text": "hi"}]));
        assert!(i["id"].as_str().unwrap().starts_with("msg_"));
        let a = normalise(
            &json!({"type": "message", "role": "assistant", "content": "yo", "id": "msg_1"}),
            "items",
        )
        .unwrap();
        assert_eq!(
            (a["id"].as_str(), a["content"][0]["type"].as_str()),
            (Some("msg_1"), Some("output_text"))
        );
        assert!(normalise(&json!({"type": "item_reference", "id": "x"}), "items").is_err());
        assert!(normalise(&json!("text"), "items").is_err());
    }

    #[test]
    fn metadata_is_bounded() {
        assert_eq!(metadata(None).unwrap(), b"{}");
        assert!(metadata(Some(&json!({"a": "b"}))).is_ok());
        assert!(metadata(Some(&json!({"a": 1}))).is_err());
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert!(metadata(Some(&Value::Object(many))).is_err());
    }
}
