//! The store on SQLite and on Postgres (from `DATABASE_URL`): responses and items by org only, sealed at
//! rest, deleted with their items, gone after their retention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use relay_core::ErrorCode;
use relay_core::contracts::ResponseStore;
use relay_core::pb::state::v1::{GetItemsRequest, GetResponseRequest, PutResponseRequest, StoredResponse};
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

#[tokio::test]
async fn sqlite_store_isolates_orgs_seals_and_expires() {
    let db = Db::connect("sqlite::memory:").await.unwrap();
    db.migrate().await.unwrap();
    exercise(db).await;
}

#[tokio::test]
async fn postgres_store_isolates_orgs_seals_and_expires() {
    let Some(url) = relay_test_support::env_service("DATABASE_URL") else { return };
    exercise(relay_test_support::fresh_postgres(&url).await).await;
}
