//! What the stored-object endpoints (responses, conversations, files, batches) share: JSON answers with
//! OpenAI-shaped errors, and OpenAI's list pages (`after` cursor, `limit`, `first_id` / `last_id`,
//! `has_more`).

use axum::Json;
use axum::response::{IntoResponse, Response};
use relay_core::RelayError;
use serde_json::{Value, json};

use crate::error::Inbound;

/// A JSON answer, or the error in OpenAI's shape.
pub(crate) fn answer(r: Result<Value, RelayError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => Inbound::OpenAiChat.error(e),
    }
}

/// A page of `items` (already in listing order): those after the one with id `after`, at most `limit`.
pub(crate) fn page(mut items: Vec<Value>, after: Option<&str>, limit: usize) -> Value {
    if let Some(after) = after {
        let at = items.iter().position(|i| i.get("id").and_then(Value::as_str) == Some(after));
        items.drain(..at.map_or(items.len(), |a| a + 1));
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    let id_of = |i: Option<&Value>| i.and_then(|i| i.get("id")).cloned().unwrap_or(Value::Null);
    json!({"object": "list", "first_id": id_of(items.first()), "last_id": id_of(items.last()), "has_more": has_more, "data": items})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_cursor() {
        let items: Vec<Value> = (1..=5).map(|i| json!({"id": format!("i{i}")})).collect();
        let p = page(items.clone(), Some("i2"), 2);
        assert_eq!(
            (p["first_id"].as_str(), p["last_id"].as_str(), p["has_more"].as_bool()),
            (Some("i3"), Some("i4"), Some(true))
        );
        assert_eq!(
            page(items.clone(), Some("nope"), 10)["data"],
            json!([]),
            "an unknown cursor ends the list"
        );
        assert_eq!(page(items, None, 10)["has_more"], false);
    }
}
