//! The stateful Responses API at the edge, on any upstream. Before dispatch, `previous_response_id` and
//! `item_reference` inputs are expanded from the org's stored state into a whole conversation (so the
//! upstream, whatever its protocol, needs no state of its own; it is sent `store: false`). After a
//! `store`d answer completes, the response object and the turn's whole input are kept, owned by the key's
//! org. `GET` / `DELETE /v1/responses/{id}` and `/input_items` read them back; every lookup names the
//! caller's org, so another org's ids find nothing.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use relay_core::contracts::ResponseStore;
use relay_core::pb::auth::v1::Principal;
use relay_core::pb::state::v1::{GetItemsRequest, GetResponseRequest, PutResponseRequest, StoredResponse};
use relay_core::{ErrorCode, RelayError};
use serde_json::{Map, Value, json};

use crate::Edge;
use crate::listing::answer;
use crate::request::RequestCtx;

/// Most `item_reference`s one request may carry.
const MAX_REFERENCES: usize = 1000;

/// What to store once the answer is complete.
pub(crate) struct Pending {
    store: Arc<dyn ResponseStore>,
    principal: Principal,
    previous: String,
    /// The turn's whole input (previous turns included), each item with an id.
    input: Vec<Value>,
    /// `store`: keep the response object (else only the conversation is appended to).
    keep_response: bool,
    /// The conversation this turn belongs to, and the turn's own new input items.
    conversation: Option<String>,
    new_items: Vec<Value>,
}

fn bad(param: &str, msg: impl Into<String>) -> RelayError {
    RelayError::invalid_request(msg).with_param(param)
}

pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// An item as sent upstream: without its id (the upstream never stored it) and without reasoning that
/// carries nothing a model can read back.
fn upstream_item(item: &Value) -> Option<Value> {
    let mut item = item.clone();
    let o = item.as_object_mut()?;
    if o.get("type").and_then(Value::as_str) == Some("reasoning") && o.get("encrypted_content").is_none() {
        return None;
    }
    o.remove("id");
    o.remove("status");
    Some(item)
}

/// `input` as a list of items (a string is one user message).
fn items_in(body: &Map<String, Value>) -> Result<Vec<Value>, RelayError> {
    match body.get("input") {
        Some(Value::String(s)) => Ok(vec![json!({"type": "message", "role": "user", "content": s})]),
        Some(Value::Array(items)) => Ok(items.clone()),
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(_) => Err(bad("input", "`input` must be a string or an array of items")),
    }
}

/// `store` (OpenAI's default: true).
fn store_flag(body: &Map<String, Value>) -> Result<bool, RelayError> {
    match body.get("store") {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad("store", "`store` must be a boolean")),
    }
}

/// `previous_response_id`, when given.
fn previous_id(v: Option<Value>) -> Result<Option<String>, RelayError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(_) => Err(bad("previous_response_id", "`previous_response_id` must be a response id")),
    }
}

fn is_reference(item: &Value) -> bool {
    item.get("type").and_then(Value::as_str) == Some("item_reference")
}

/// The ids of the `item_reference`s among input items.
fn references(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter(|i| is_reference(i))
        .map(|i| i.get("id").and_then(Value::as_str).unwrap_or_default().to_owned())
        .collect()
}

/// The parameter by which a request asks for stored state, if it does (what a zero-retention key may not).
fn stored_state_asked(
    body: &Map<String, Value>,
    previous: bool,
    conversation: bool,
    items: &[Value],
) -> Option<&'static str> {
    if previous {
        Some("previous_response_id")
    } else if conversation {
        Some("conversation")
    } else if items.iter().any(is_reference) {
        Some("input")
    } else if body.get("store") == Some(&Value::Bool(true)) {
        Some("store")
    } else {
        None
    }
}

/// Expands a Responses request from stored state; returns the body to send on, and what to store after.
pub(crate) async fn expand(
    edge: &Edge,
    principal: &Principal,
    bytes: Bytes,
) -> Result<(Bytes, Option<Pending>), RelayError> {
    let mut body: Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|_| RelayError::invalid_request("the body must be a JSON object"))?;
    let store = store_flag(&body)?;
    let previous = previous_id(body.remove("previous_response_id"))?;
    let conversation = match body.remove("conversation") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::Object(o)) if o.get("id").and_then(Value::as_str).is_some_and(|s| !s.is_empty()) => {
            o.get("id").and_then(Value::as_str).map(str::to_owned)
        }
        Some(_) => {
            return Err(bad("conversation", "`conversation` must be a conversation id or {\"id\": ...}"));
        }
    };
    if conversation.is_some() && previous.is_some() {
        return Err(bad(
            "conversation",
            "`previous_response_id` and `conversation` cannot both be given: a conversation already holds the earlier turns",
        ));
    }
    let mut items = items_in(&body)?;
    if principal.zero_retention {
        // Nothing of this key is kept: asking for stored state is an error, not a silent stateless turn.
        if let Some(param) = stored_state_asked(&body, previous.is_some(), conversation.is_some(), &items) {
            return Err(bad(
                param,
                "this key is zero-retention: Relay stores nothing for it, so there is no stored state to use or create; send the whole conversation in `input` with `store: false`",
            ));
        }
        return Ok((bytes, None));
    }
    let references = references(&items);
    let Some(state) = edge.inner.services.state.clone() else {
        if previous.is_some() || conversation.is_some() || !references.is_empty() {
            let what = if previous.is_some() {
                "previous_response_id"
            } else if conversation.is_some() {
                "conversation"
            } else {
                "input"
            };
            return Err(bad(
                what,
                "this Relay keeps no Responses state ([state] enabled = false): send the whole conversation in `input`",
            ));
        }
        return Ok((bytes, None));
    };
    if previous.is_none() && conversation.is_none() && references.is_empty() && !store {
        return Ok((bytes, None));
    }
    if references.len() > MAX_REFERENCES {
        return Err(bad("input", format!("at most {MAX_REFERENCES} item references per request")));
    }
    let org = principal.org_id.clone();
    // Referenced items, from this org's state only.
    if !references.is_empty() {
        let found = state.get_items(GetItemsRequest { org_id: org.clone(), ids: references.clone() }).await?;
        for item in &mut items {
            if !is_reference(item) {
                continue;
            }
            let id = item.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
            let stored = found.items.get(&id).and_then(|b| serde_json::from_slice::<Value>(b).ok());
            *item = stored.ok_or_else(|| bad("input", format!("Item with id '{id}' not found.")))?;
        }
    }
    // The previous turn: its whole input, then its output.
    let mut whole = Vec::new();
    if let Some(prev) = &previous {
        let r = state
            .get_response(GetResponseRequest { org_id: org.clone(), id: prev.clone() })
            .await
            .map_err(|e| match e.code {
                ErrorCode::NotFound => {
                    bad("previous_response_id", format!("Previous response with id '{prev}' not found."))
                }
                _ => e,
            })?;
        whole.extend(serde_json::from_slice::<Vec<Value>>(&r.input_json).unwrap_or_default());
        let response: Value = serde_json::from_slice(&r.response_json).unwrap_or_default();
        whole.extend(response.get("output").and_then(Value::as_array).cloned().unwrap_or_default());
    }
    // The conversation's items so far.
    if let Some(id) = &conversation {
        whole.extend(crate::conversations::all_items(state.as_ref(), &org, id).await.map_err(
            |e| match e.code {
                ErrorCode::NotFound => bad("conversation", format!("Conversation with id '{id}' not found.")),
                _ => e,
            },
        )?);
    }
    let context = whole.len();
    for mut item in items {
        if let Some(o) = item.as_object_mut()
            && o.get("id").and_then(Value::as_str).is_none_or(str::is_empty)
        {
            let prefix = match o.get("type").and_then(Value::as_str) {
                Some("function_call_output") => "fco",
                Some("function_call") => "fc",
                _ => "msg",
            };
            o.insert("id".into(), Value::String(new_id(prefix)));
        }
        whole.push(item);
    }
    body.insert("input".into(), Value::Array(whole.iter().filter_map(upstream_item).collect()));
    // Relay keeps the state: the upstream (if it has state of its own) is asked not to.
    body.insert("store".into(), Value::Bool(false));
    let bytes = Bytes::from(serde_json::to_vec(&body).map_err(|_| RelayError::invalid_request("bad body"))?);
    let new_items = match &conversation {
        Some(_) => whole[context..]
            .iter()
            .map(|i| crate::conversations::normalise(i, "input"))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let pending = (store || conversation.is_some()).then(|| Pending {
        store: state,
        principal: principal.clone(),
        previous: previous.unwrap_or_default(),
        input: whole,
        keep_response: store,
        conversation,
        new_items,
    });
    Ok((bytes, pending))
}

/// A Responses request of a model group that keeps state at the provider: sent on as the client wrote it,
/// after checking that its `previous_response_id` and `item_reference`s name this org's objects (several
/// orgs share one provider key, and the provider would answer any of them). A stored answer is also kept
/// by Relay, owned by the org: that copy is what later requests are checked against and what `GET`
/// returns. Zero-retention keys are sent `store: false`.
pub(crate) async fn provider_owned(
    edge: &Edge,
    principal: &Principal,
    bytes: Bytes,
) -> Result<(Bytes, Option<Pending>), RelayError> {
    let mut body: Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|_| RelayError::invalid_request("the body must be a JSON object"))?;
    if body.get("conversation").is_some_and(|c| !c.is_null()) {
        return Err(bad(
            "conversation",
            "this model's Responses state is kept by its provider: use `previous_response_id` rather than a Relay conversation",
        ));
    }
    let store = store_flag(&body)?;
    let previous = previous_id(body.get("previous_response_id").cloned())?;
    let items = items_in(&body)?;
    let references = references(&items);
    if principal.zero_retention {
        if let Some(param) = stored_state_asked(&body, previous.is_some(), false, &items) {
            return Err(bad(
                param,
                "this key is zero-retention: nothing may be stored for it, here or at the provider",
            ));
        }
        // The provider stores by default: not for this key.
        body.insert("store".into(), Value::Bool(false));
        let bytes =
            Bytes::from(serde_json::to_vec(&body).map_err(|_| RelayError::invalid_request("bad body"))?);
        return Ok((bytes, None));
    }
    if references.len() > MAX_REFERENCES {
        return Err(bad("input", format!("at most {MAX_REFERENCES} item references per request")));
    }
    let state = edge.inner.services.state.clone().ok_or_else(|| {
        bad("model", "this model keeps Responses state at the provider, which needs Relay's store ([state] enabled) to check ownership")
    })?;
    let org = principal.org_id.clone();
    if let Some(prev) = &previous {
        state.get_response(GetResponseRequest { org_id: org.clone(), id: prev.clone() }).await.map_err(
            |e| match e.code {
                ErrorCode::NotFound => {
                    bad("previous_response_id", format!("Previous response with id '{prev}' not found."))
                }
                _ => e,
            },
        )?;
    }
    if !references.is_empty() {
        let found = state.get_items(GetItemsRequest { org_id: org, ids: references.clone() }).await?;
        if let Some(id) = references.iter().find(|id| !found.items.contains_key(*id)) {
            return Err(bad("input", format!("Item with id '{id}' not found.")));
        }
    }
    let pending = store.then(|| Pending {
        store: state,
        principal: principal.clone(),
        previous: previous.unwrap_or_default(),
        input: items,
        keep_response: true,
        conversation: None,
        new_items: Vec::new(),
    });
    Ok((bytes, pending))
}

impl Pending {
    /// The response object as the client should see it (marked stored, linked to its predecessor).
    fn mark(&self, response: &mut Value) {
        if let Some(o) = response.as_object_mut() {
            o.insert("store".into(), Value::Bool(self.keep_response));
            let prev = (!self.previous.is_empty()).then(|| Value::String(self.previous.clone()));
            o.insert("previous_response_id".into(), prev.unwrap_or(Value::Null));
            if let Some(c) = &self.conversation {
                o.insert("conversation".into(), json!({"id": c}));
            }
        }
    }

    /// A whole answer: marked, stored in the background, and returned to send.
    pub(crate) fn whole(self, edge: &Edge, body: Vec<u8>) -> Vec<u8> {
        let Ok(mut response) = serde_json::from_slice::<Value>(&body) else { return body };
        self.mark(&mut response);
        let out = serde_json::to_vec(&response).unwrap_or(body);
        self.save(edge, response);
        out
    }

    /// The final response object of a stream (its `response.completed` / `incomplete` / `failed` event).
    pub(crate) fn streamed(self, edge: &Edge, mut response: Value) {
        self.mark(&mut response);
        self.save(edge, response);
    }

    fn save(mut self, edge: &Edge, response: Value) {
        if let Some(conversation) = self.conversation.take() {
            self.append(edge, conversation, &response);
        }
        if !self.keep_response {
            return;
        }
        let Some(id) = response.get("id").and_then(Value::as_str).map(str::to_owned) else { return };
        let stored = StoredResponse {
            id,
            org_id: self.principal.org_id.clone(),
            team_id: self.principal.team_id.clone(),
            key_id: self.principal.key_id.clone(),
            created_at_unix_ms: relay_core::ids::now_ms(),
            previous_response_id: self.previous.clone(),
            response_json: response.to_string().into(),
            input_json: Value::Array(self.input).to_string().into(),
        };
        let store = self.store;
        // Off the request path; a failure is logged (the answer was already delivered).
        edge.inner.background.spawn(async move {
            let id = stored.id.clone();
            if let Err(e) =
                store.put_response(PutResponseRequest { response: Some(stored), retention_days: 0 }).await
            {
                tracing::warn!(response_id = %id, error = %e, "response not stored");
                metrics::counter!("relay_edge_responses_not_stored_total").increment(1);
            }
        });
    }
}

impl Pending {
    /// Adds the turn (its new input, then the answer's output) to its conversation; a failed answer adds
    /// nothing.
    fn append(&mut self, edge: &Edge, conversation: String, response: &Value) {
        if response.get("status").and_then(Value::as_str) == Some("failed") {
            return;
        }
        let mut items = std::mem::take(&mut self.new_items);
        let output = response.get("output").and_then(Value::as_array).into_iter().flatten();
        items.extend(output.filter_map(|i| crate::conversations::normalise(i, "output").ok()));
        let req = relay_core::pb::state::v1::AppendConversationItemsRequest {
            org_id: self.principal.org_id.clone(),
            conversation_id: conversation,
            items: items.iter().map(|i| Bytes::from(i.to_string())).collect(),
            retention_days: 0,
        };
        let store = self.store.clone();
        edge.inner.background.spawn(async move {
            let id = req.conversation_id.clone();
            if let Err(e) = store.append_conversation_items(req).await {
                tracing::warn!(conversation_id = %id, error = %e, "turn not added to its conversation");
                metrics::counter!("relay_edge_conversation_appends_failed_total").increment(1);
            }
        });
    }
}

/// Watches a Responses stream for its final response object, an event at a time (events may be split
/// across chunks; at most one event is buffered).
#[derive(Default)]
pub(crate) struct Capture {
    buf: Vec<u8>,
    pub(crate) last: Option<Value>,
}

/// Largest single event kept while looking for the final response.
const MAX_EVENT: usize = 16 << 20;

impl Capture {
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("\n");
            if !(data.contains("\"response.completed\"")
                || data.contains("\"response.incomplete\"")
                || data.contains("\"response.failed\""))
            {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(&data)
                && let Some(r) = v.get("response")
            {
                self.last = Some(r.clone());
            }
        }
        if self.buf.len() > MAX_EVENT {
            self.buf.clear();
        }
    }
}

// === GET / DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items ===

pub(crate) async fn owned(
    edge: &Edge,
    ctx: &RequestCtx,
    headers: &HeaderMap,
) -> Result<(Arc<Principal>, Arc<dyn ResponseStore>), RelayError> {
    let principal = edge.principal(ctx, headers).await?;
    let state = edge.inner.services.state.clone().ok_or_else(|| {
        RelayError::new(ErrorCode::NotFound, "this Relay keeps no Responses state ([state] enabled = false)")
    })?;
    Ok((principal, state))
}

pub async fn get_response(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            let r = state.get_response(GetResponseRequest { org_id: p.org_id.clone(), id }).await?;
            serde_json::from_slice(&r.response_json)
                .map_err(|_| RelayError::new(ErrorCode::Internal, "stored response unreadable"))
        }
        .await,
    )
}

pub async fn delete_response(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            state.delete_response(GetResponseRequest { org_id: p.org_id.clone(), id: id.clone() }).await?;
            Ok(json!({"id": id, "object": "response.deleted", "deleted": true}))
        }
        .await,
    )
}

#[derive(serde::Deserialize, Default)]
pub struct ListQuery {
    limit: Option<usize>,
    order: Option<String>,
    after: Option<String>,
}

pub async fn list_input_items(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    answer(
        async {
            let (p, state) = owned(&edge, &ctx, &headers).await?;
            let r = state.get_response(GetResponseRequest { org_id: p.org_id.clone(), id }).await?;
            let items: Vec<Value> = serde_json::from_slice(&r.input_json).unwrap_or_default();
            Ok(page(items, &q))
        }
        .await,
    )
}

/// The list page of items stored oldest first: newest first unless `order=asc`, after the item `after`,
/// at most `limit` (20 by default, 100 at most).
pub(crate) fn page(mut items: Vec<Value>, q: &ListQuery) -> Value {
    if q.order.as_deref() != Some("asc") {
        items.reverse();
    }
    crate::listing::page(items, q.after.as_deref(), q.limit.unwrap_or(20).clamp(1, 100))
}
