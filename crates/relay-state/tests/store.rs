//! The store on SQLite and on Postgres (from `DATABASE_URL`): responses and items by org only, sealed at
//! rest, deleted with their items, gone after their retention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use relay_core::ErrorCode;
use relay_core::contracts::ResponseStore;
use relay_core::pb::state::v1::{
    AppendConversationItemsRequest, Conversation, ConversationItemRef, ConversationRef, GetItemsRequest,
    GetResponseRequest, PutConversationRequest, PutResponseRequest, StoredResponse,
};
use relay_db::{Col, Db};
use relay_state::{ResponsesStore, Sealer};

fn response(org: &str, id: &str, created: i64) -> StoredResponse {
    StoredResponse {
        id: id.into(),
        org_id: org.into(),
        team_id: "t".into(),
        key_id: "k".into(),
        created_at_unix_ms: created,
        previous_response_id: String::new(),
        response_json: format!(
            r#"{{"id":"{id}","output":[{{"id":"msg_{id}","type":"message","content":"secret answer"}}]}}"#
        )
        .into(),
        input_json: format!(
            r#"[{{"id":"in_{id}","type":"message","role":"user","content":"secret question"}}]"#
        )
        .into(),
    }
}

async fn exercise(db: Db) {
    let store = ResponsesStore::new(db.clone(), Sealer::from_secret("store-test-secret-key"), 30);
    let now = relay_core::ids::now_ms();
    let put = |r: StoredResponse| PutResponseRequest { response: Some(r), retention_days: 0 };
    store.put_response(put(response("org-a", "resp_1", now))).await.unwrap();
    let get = |org: &str, id: &str| GetResponseRequest { org_id: org.into(), id: id.into() };

    let r = store.get_response(get("org-a", "resp_1")).await.unwrap();
    assert!(String::from_utf8_lossy(&r.response_json).contains("secret answer"));
    assert_eq!(store.get_response(get("org-b", "resp_1")).await.unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(store.delete_response(get("org-b", "resp_1")).await.unwrap_err().code, ErrorCode::NotFound);
    let items = |org: &str| GetItemsRequest {
        org_id: org.into(),
        ids: vec!["msg_resp_1".into(), "in_resp_1".into(), "nope".into()],
    };
    let mine = store.get_items(items("org-a")).await.unwrap();
    assert_eq!(mine.items.len(), 2, "output and input items by id");
    assert!(store.get_items(items("org-b")).await.unwrap().items.is_empty(), "another org's items");

    // Sealed at rest.
    let rows = db
        .fetch("SELECT response, input FROM stored_responses", &[], &[Col::Bytes, Col::Bytes])
        .await
        .unwrap();
    for v in rows.into_iter().flatten() {
        assert!(!String::from_utf8_lossy(&v.into_bytes()).contains("secret"), "plaintext at rest");
    }

    // Delete takes the items along.
    store.delete_response(get("org-a", "resp_1")).await.unwrap();
    assert_eq!(store.get_response(get("org-a", "resp_1")).await.unwrap_err().code, ErrorCode::NotFound);
    assert!(store.get_items(items("org-a")).await.unwrap().items.is_empty());

    // Past its retention a response is not served and is purged.
    let old = now - 31 * 86_400_000;
    store.put_response(put(response("org-a", "resp_old", old))).await.unwrap();
    assert_eq!(store.get_response(get("org-a", "resp_old")).await.unwrap_err().code, ErrorCode::NotFound);
    assert!(store.purge_expired().await.unwrap() >= 2, "response and item purged");
}

fn item(id: &str, text: &str) -> bytes::Bytes {
    format!(r#"{{"id":"{id}","type":"message","role":"user","content":"{text}"}}"#).into_bytes().into()
}

async fn conversations(db: Db) {
    let store = ResponsesStore::new(db.clone(), Sealer::from_secret("store-test-secret-key"), 30);
    let conv = |org: &str, id: &str, metadata: &str| Conversation {
        id: id.into(),
        org_id: org.into(),
        team_id: "t".into(),
        key_id: "k".into(),
        created_at_unix_ms: relay_core::ids::now_ms(),
        metadata_json: metadata.as_bytes().to_vec().into(),
    };
    let r = |org: &str, id: &str| ConversationRef { org_id: org.into(), id: id.into() };
    let put = |c: Conversation, items: Vec<bytes::Bytes>, update: bool| PutConversationRequest {
        conversation: Some(c),
        items,
        retention_days: 0,
        update,
    };
    let c = store
        .put_conversation(put(
            conv("org-a", "conv_1", r#"{"topic":"secret topic"}"#),
            vec![item("i1", "secret one")],
            false,
        ))
        .await
        .unwrap();
    assert_eq!(c.metadata_json.as_ref(), br#"{"topic":"secret topic"}"#);
    let append = |org: &str, items: Vec<bytes::Bytes>| AppendConversationItemsRequest {
        org_id: org.into(),
        conversation_id: "conv_1".into(),
        items,
        retention_days: 0,
    };
    store
        .append_conversation_items(append("org-a", vec![item("i2", "two"), item("i3", "three")]))
        .await
        .unwrap();
    let listed = store.list_conversation_items(r("org-a", "conv_1")).await.unwrap();
    let ids: Vec<String> = listed
        .items
        .iter()
        .map(|b| serde_json::from_slice::<serde_json::Value>(b).unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["i1", "i2", "i3"], "in order");

    // Another org: nothing, whatever it does.
    let nf = ErrorCode::NotFound;
    assert_eq!(store.get_conversation(r("org-b", "conv_1")).await.unwrap_err().code, nf);
    assert_eq!(store.list_conversation_items(r("org-b", "conv_1")).await.unwrap_err().code, nf);
    assert_eq!(
        store.append_conversation_items(append("org-b", vec![item("x", "x")])).await.unwrap_err().code,
        nf
    );
    assert_eq!(store.delete_conversation(r("org-b", "conv_1")).await.unwrap_err().code, nf);
    let item_ref = |org: &str, id: &str| ConversationItemRef {
        org_id: org.into(),
        conversation_id: "conv_1".into(),
        item_id: id.into(),
    };
    assert_eq!(store.delete_conversation_item(item_ref("org-b", "i1")).await.unwrap_err().code, nf);
    assert_eq!(
        store.put_conversation(put(conv("org-b", "conv_1", "{}"), vec![], true)).await.unwrap_err().code,
        nf,
        "another org cannot update it"
    );

    // A repeated item id is a 400; the append adds nothing.
    let e = store
        .append_conversation_items(append("org-a", vec![item("i4", "four"), item("i2", "again")]))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert_eq!(store.list_conversation_items(r("org-a", "conv_1")).await.unwrap().items.len(), 3);

    // Metadata update, item delete, sealed at rest.
    store.put_conversation(put(conv("org-a", "conv_1", r#"{"topic":"new"}"#), vec![], true)).await.unwrap();
    assert_eq!(
        store.get_conversation(r("org-a", "conv_1")).await.unwrap().metadata_json.as_ref(),
        br#"{"topic":"new"}"#
    );
    store.delete_conversation_item(item_ref("org-a", "i2")).await.unwrap();
    assert_eq!(store.delete_conversation_item(item_ref("org-a", "i2")).await.unwrap_err().code, nf);
    assert_eq!(store.list_conversation_items(r("org-a", "conv_1")).await.unwrap().items.len(), 2);
    let rows = db.fetch("SELECT item FROM conversation_items", &[], &[Col::Bytes]).await.unwrap();
    for v in rows.into_iter().flatten() {
        assert!(!String::from_utf8_lossy(&v.into_bytes()).contains("secret"), "plaintext at rest");
    }

    // Delete takes the items along; expired conversations are purged.
    store.delete_conversation(r("org-a", "conv_1")).await.unwrap();
    assert_eq!(store.get_conversation(r("org-a", "conv_1")).await.unwrap_err().code, nf);
    assert!(db.fetch("SELECT id FROM conversation_items", &[], &[Col::Text]).await.unwrap().is_empty());
    store
        .put_conversation(put(conv("org-a", "conv_old", "{}"), vec![item("o1", "old")], false))
        .await
        .unwrap();
    db.execute("UPDATE conversations SET expires_at_ms = 1", &[]).await.unwrap();
    assert_eq!(store.get_conversation(r("org-a", "conv_old")).await.unwrap_err().code, nf);
    assert!(store.purge_expired().await.unwrap() >= 2, "conversation and item purged");
}

#[tokio::test]
async fn sqlite_store_isolates_orgs_seals_and_expires() {
    let db = Db::connect("sqlite::memory:").await.unwrap();
    db.migrate().await.unwrap();
    exercise(db.clone()).await;
    conversations(db).await;
}

#[tokio::test]
async fn postgres_store_isolates_orgs_seals_and_expires() {
    let Some(url) = relay_test_support::env_service("DATABASE_URL") else { return };
    let db = relay_test_support::fresh_postgres(&url).await;
    exercise(db.clone()).await;
    conversations(db).await;
}
