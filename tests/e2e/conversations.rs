//! The Conversations API: a conversation created with items, Responses turns that name it (whole and
//! streamed) reaching the upstream with the conversation so far and appending to it, the item endpoints,
//! and tenant isolation: another org's key can never read, list, change, delete or use it.

use relay_test_support::MockOpenAi;
use serde_json::{Value, json};

use crate::client;
use crate::harness::{KEY, RelayProc, auth_section, temp_dir};
use crate::responses_state::{OTHER_KEY, ZR_KEY, other_org_key};

async fn post(base: &str, key: &str, path: &str, body: Value) -> (u16, Value) {
    client::send_json(reqwest::Method::POST, base, key, path, Some(body)).await
}

async fn get(base: &str, key: &str, path: &str) -> (u16, Value) {
    client::send_json(reqwest::Method::GET, base, key, path, None).await
}

async fn delete(base: &str, key: &str, path: &str) -> (u16, Value) {
    client::send_json(reqwest::Method::DELETE, base, key, path, None).await
}

/// The conversation's items, oldest first, once it holds `n` of them (turns are appended just after the
/// answer).
async fn items_when(base: &str, id: &str, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let (status, list) =
            get(base, KEY, &format!("/v1/conversations/{id}/items?order=asc&limit=100")).await;
        assert_eq!(status, 200, "{list}");
        let data = list["data"].as_array().cloned().unwrap_or_default();
        if data.len() >= n {
            return data;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("conversation {id} never reached {n} items");
}

fn texts(items: &[Value]) -> Vec<String> {
    items.iter().map(|i| i["content"][0]["text"].as_str().unwrap_or_default().to_owned()).collect()
}

#[tokio::test]
async fn conversations_carry_turns_and_belong_to_their_org() {
    let mock = MockOpenAi::start().await;
    let dir = temp_dir("conversations");
    let config = format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n{}{}{}",
        dir.join("relay.db").display(),
        auth_section(),
        other_org_key(),
        crate::upstream_sections(&mock)
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let base = relay.http();

    let (status, conv) = post(
        &base,
        KEY,
        "/v1/conversations",
        json!({"metadata": {"topic": "names"}, "items": [{"type": "message", "role": "user", "content": "my name is Ada"}]}),
    )
    .await;
    assert_eq!(status, 200, "{conv}");
    let id = conv["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("conv_"), "{conv}");
    assert_eq!(
        (conv["object"].as_str(), conv["metadata"]["topic"].as_str()),
        (Some("conversation"), Some("names"))
    );

    // A turn in the conversation: the upstream sees the conversation so far; the turn is appended.
    let (status, r) = post(
        &base,
        KEY,
        "/v1/responses",
        json!({"model": "mock", "conversation": id, "input": "what is my name"}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["conversation"]["id"], id.as_str(), "{r}");
    let sent = mock.requests_containing("what is my name");
    let messages = sent.last().unwrap().body["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages[0].to_string().contains("my name is Ada"), "{messages:?}");
    let items = items_when(&base, &id, 3).await;
    assert_eq!(
        texts(&items),
        ["my name is Ada", "what is my name", &relay_test_support::echo("what is my name")]
    );
    assert_eq!(items[2]["role"], "assistant");

    // Streamed, with the object form: the earlier turn is in context and the stream's output is appended.
    let r = client::http()
        .post(format!("{base}/v1/responses"))
        .bearer_auth(KEY)
        .json(&json!({"model": "mock", "conversation": {"id": id}, "input": "and again", "stream": true, "store": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sse = r.text().await.unwrap();
    assert!(sse.contains("response.completed"), "{sse}");
    assert_eq!(
        mock.requests_containing("and again").last().unwrap().body["messages"].as_array().unwrap().len(),
        4
    );
    let items = items_when(&base, &id, 5).await;
    assert_eq!(texts(&items)[3..], ["and again".to_owned(), relay_test_support::echo("and again")]);

    // Items: add, read one, list newest first with paging, delete one; metadata update.
    let (status, added) = post(
        &base,
        KEY,
        &format!("/v1/conversations/{id}/items"),
        json!({"items": [{"role": "user", "content": "note one"}, {"role": "user", "content": "note two"}]}),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    let note = added["data"][0]["id"].as_str().unwrap().to_owned();
    let (status, one) = get(&base, KEY, &format!("/v1/conversations/{id}/items/{note}")).await;
    assert_eq!((status, one["content"][0]["text"].as_str()), (200, Some("note one")), "{one}");
    let (_, page) = get(&base, KEY, &format!("/v1/conversations/{id}/items?limit=2")).await;
    assert_eq!(texts(page["data"].as_array().unwrap()), ["note two", "note one"]);
    assert_eq!(page["has_more"], true);
    let (status, after_delete) = delete(&base, KEY, &format!("/v1/conversations/{id}/items/{note}")).await;
    assert_eq!((status, after_delete["id"].as_str()), (200, Some(id.as_str())), "{after_delete}");
    assert_eq!(get(&base, KEY, &format!("/v1/conversations/{id}/items/{note}")).await.0, 404);
    let (status, updated) =
        post(&base, KEY, &format!("/v1/conversations/{id}"), json!({"metadata": {"topic": "renamed"}})).await;
    assert_eq!((status, updated["metadata"]["topic"].as_str()), (200, Some("renamed")), "{updated}");

    // Another org: every endpoint is a 404, and a turn naming the conversation is a 400; nothing changes.
    let paths = [
        format!("/v1/conversations/{id}"),
        format!("/v1/conversations/{id}/items"),
        format!("/v1/conversations/{id}/items/{}", items[0]["id"].as_str().unwrap()),
    ];
    for path in &paths {
        assert_eq!(get(&base, OTHER_KEY, path).await.0, 404, "GET {path}");
    }
    for path in [&paths[0], &paths[2]] {
        assert_eq!(delete(&base, OTHER_KEY, path).await.0, 404, "DELETE {path}");
    }
    let (status, e) = delete(&base, KEY, &paths[1]).await;
    assert_eq!((status, e["error"]["code"].as_str()), (405, Some("method_not_allowed")), "{e}");
    assert_eq!(post(&base, OTHER_KEY, &paths[0], json!({"metadata": {"x": "y"}})).await.0, 404);
    assert_eq!(
        post(&base, OTHER_KEY, &paths[1], json!({"items": [{"role": "user", "content": "intrude"}]})).await.0,
        404
    );
    let (status, e) = post(
        &base,
        OTHER_KEY,
        "/v1/responses",
        json!({"model": "mock", "conversation": id, "input": "leak it"}),
    )
    .await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("conversation")), "{e}");
    assert!(mock.requests_containing("leak it").is_empty(), "refused before any upstream call");
    assert_eq!(texts(&items_when(&base, &id, 6).await).len(), 6, "unchanged by the other org");

    // Bad combinations, zero-retention keys.
    let (status, e) = post(
        &base,
        KEY,
        "/v1/responses",
        json!({"model": "mock", "conversation": id, "previous_response_id": "resp_x", "input": "x"}),
    )
    .await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("conversation")), "{e}");
    let (status, e) = post(&base, ZR_KEY, "/v1/conversations", json!({})).await;
    assert!(status == 400 && e["error"]["message"].as_str().unwrap().contains("zero-retention"), "{e}");
    let (status, e) =
        post(&base, ZR_KEY, "/v1/responses", json!({"model": "mock", "conversation": id, "input": "x"}))
            .await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("conversation")), "{e}");
    assert_eq!(post(&base, KEY, "/v1/conversations", json!({"items": "nope"})).await.0, 400);

    // Deleted: gone for its owner too.
    let (status, gone) = delete(&base, KEY, &format!("/v1/conversations/{id}")).await;
    assert_eq!((status, gone["deleted"].clone()), (200, json!(true)), "{gone}");
    assert_eq!(get(&base, KEY, &format!("/v1/conversations/{id}")).await.0, 404);
    assert_eq!(get(&base, KEY, &format!("/v1/conversations/{id}/items")).await.0, 404);
    relay.stop().await;
}
