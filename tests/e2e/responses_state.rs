//! The stateful Responses API on a converted upstream (Responses in, chat completions out): a Vercel AI
//! SDK-shaped two-step tool loop with `item_reference`, a `previous_response_id` chain (whole and
//! streamed), reading back, listing input items, deleting, and tenant isolation between orgs.

use relay_test_support::MockOpenAi;
use serde_json::{Value, json};

use crate::client;
use crate::harness::{KEY, PEPPER, RelayProc, auth_section, temp_dir};

/// A key of another org.
pub const OTHER_KEY: &str = "sk-e2e-other-org-key";
/// A zero-retention key of the first org.
pub const ZR_KEY: &str = "sk-e2e-zero-retention-key";

pub fn other_org_key() -> String {
    let hash = relay_auth::hash_key(&relay_core::Secret::new(PEPPER), OTHER_KEY);
    let zr = relay_auth::hash_key(&relay_core::Secret::new(PEPPER), ZR_KEY);
    format!(
        "[[auth.keys]]\nid = \"other\"\nteam = \"team-other\"\norg = \"org-other\"\nhash = \"{hash}\"\n\
         [[auth.keys]]\nid = \"zr\"\nteam = \"team-e2e\"\norg = \"org-e2e\"\nhash = \"{zr}\"\nzero_retention = true\n"
    )
}

async fn post(base: &str, key: &str, body: Value) -> (u16, Value) {
    let (status, body, _) = post_id(base, key, body).await;
    (status, body)
}

/// Status, body and Relay's request id.
async fn post_id(base: &str, key: &str, body: Value) -> (u16, Value, String) {
    let r = client::http()
        .post(format!("{base}/v1/responses"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let id = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    (status, r.json().await.unwrap_or(Value::Null), id)
}

async fn get(base: &str, key: &str, path: &str) -> (u16, Value) {
    let r = client::http().get(format!("{base}{path}")).bearer_auth(key).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn delete(base: &str, key: &str, path: &str) -> (u16, Value) {
    let r = client::http().delete(format!("{base}{path}")).bearer_auth(key).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls until the response is readable (it is stored just after the answer).
async fn stored(base: &str, key: &str, id: &str) -> Value {
    for _ in 0..100 {
        let (status, body) = get(base, key, &format!("/v1/responses/{id}")).await;
        if status == 200 {
            return body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("response {id} never stored");
}

fn text_of(response: &Value) -> String {
    response["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["text"].as_str().map(str::to_owned))
        .collect()
}

/// A `previous_response_id` chain: the second turn reaches the upstream with the first turn in it.
/// Returns the two requests' ids.
pub async fn chain(base: &str, mock: &MockOpenAi, model: &str) -> Vec<String> {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (status, first, id1) =
        post_id(base, KEY, json!({"model": model, "input": format!("my name is Ada {tag}")})).await;
    assert_eq!(status, 200, "{first}");
    stored(base, KEY, first["id"].as_str().unwrap()).await;
    let ask = format!("what is my name {tag}");
    let (status, second, id2) =
        post_id(base, KEY, json!({"model": model, "previous_response_id": first["id"], "input": ask})).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["previous_response_id"], first["id"], "{second}");
    // Whatever the upstream's protocol (chat `messages`, Anthropic `messages`, Gemini `contents`), it got
    // the first turn, the answer to it, and the new question.
    let sent = mock.requests_containing(&ask);
    let body = &sent.last().unwrap().body;
    let turns = body["messages"].as_array().or(body["contents"].as_array()).unwrap().clone();
    let roles: Vec<&str> = turns.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert!(roles == ["user", "assistant", "user"] || roles == ["user", "model", "user"], "{turns:?}");
    assert!(body.to_string().contains(&relay_test_support::echo(&format!("my name is Ada {tag}"))), "{body}");
    let back = stored(base, KEY, second["id"].as_str().unwrap()).await;
    assert_eq!((back["id"].clone(), back["store"].clone()), (second["id"].clone(), json!(true)));
    assert_eq!(text_of(&back), text_of(&second));
    vec![id1, id2]
}

/// The same chain on Anthropic and Gemini upstreams: the state is Relay's, so any upstream works.
#[tokio::test]
async fn previous_response_id_chains_on_anthropic_and_gemini_upstreams() {
    let mock = MockOpenAi::start().await;
    let dir = temp_dir("responses-upstreams");
    let root = mock.base_url.trim_end_matches("/v1");
    let config = format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n{}\
         [[adapter.providers]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{root}\"\napi_key = \"k\"\n\
         [[adapter.providers]]\nname = \"gemini\"\nkind = \"gemini\"\nbase_url = \"{root}/v1beta\"\napi_key = \"k\"\n\
         [[routing.models]]\nname = \"on-anthropic\"\ndeployments = [{{ provider = \"claude\", model = \"claude-mock\" }}]\n\
         [[routing.models]]\nname = \"on-gemini\"\ndeployments = [{{ provider = \"gemini\", model = \"gemini-mock\" }}]\n",
        dir.join("relay.db").display(),
        auth_section(),
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    for model in ["on-anthropic", "on-gemini"] {
        chain(&relay.http(), &mock, model).await;
    }
    relay.stop().await;
}

#[tokio::test]
async fn responses_keep_state_per_org_on_a_converted_upstream() {
    let mock = MockOpenAi::start().await;
    let dir = temp_dir("responses-state");
    let db = dir.join("relay.db");
    let config = format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n\
         [state]\nencryption_key = \"e2e-state-encryption-key\"\n{}{}{}",
        db.display(),
        auth_section(),
        other_org_key(),
        crate::upstream_sections(&mock)
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let base = relay.http();
    chain(&base, &mock, "mock").await;

    // A Vercel AI SDK-shaped tool loop: step 1 calls the tool; step 2 sends the call back as an
    // `item_reference` (the SDK's default with `store`) followed by the tool's output.
    let tools = json!([{"type": "function", "name": "weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let user = json!({"role": "user", "content": [{"type": "input_text", "text": "weather in Paris [[mock call=1]]"}]});
    let (status, step1) =
        post(&base, KEY, json!({"model": "mock", "input": [user.clone()], "tools": tools})).await;
    assert_eq!(status, 200, "{step1}");
    let call =
        step1["output"].as_array().unwrap().iter().find(|i| i["type"] == "function_call").unwrap().clone();
    assert_eq!((call["name"].as_str(), call["call_id"].as_str()), (Some("weather"), Some("call_mock_1")));
    stored(&base, KEY, step1["id"].as_str().unwrap()).await;
    let step2_input = json!([user, {"type": "item_reference", "id": call["id"]},
        {"type": "function_call_output", "call_id": "call_mock_1", "output": "sunny and 21C"}]);
    let (status, step2) =
        post(&base, KEY, json!({"model": "mock", "input": step2_input, "tools": tools})).await;
    assert_eq!(status, 200, "{step2}");
    assert_eq!(text_of(&step2), "TOOL SAID: sunny and 21C", "{step2}");
    let sent = mock.requests_containing("sunny and 21C");
    let messages = sent.last().unwrap().body["messages"].as_array().unwrap().clone();
    assert_eq!(
        messages[1]["tool_calls"][0]["id"], "call_mock_1",
        "the referenced call reached the upstream: {messages:?}"
    );

    // previous_response_id on a stream; the streamed response is stored too.
    let (_, first) = post(&base, KEY, json!({"model": "mock", "input": "remember kiwi"})).await;
    stored(&base, KEY, first["id"].as_str().unwrap()).await;
    let r = client::http()
        .post(format!("{base}/v1/responses"))
        .bearer_auth(KEY)
        .json(&json!({"model": "mock", "previous_response_id": first["id"], "input": "and mango", "stream": true}))
        .send()
        .await
        .unwrap();
    let sse = r.text().await.unwrap();
    let completed: Value = sse
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["type"] == "response.completed")
        .unwrap_or_else(|| panic!("no response.completed: {sse}"));
    let streamed_id = completed["response"]["id"].as_str().unwrap().to_owned();
    let back = stored(&base, KEY, &streamed_id).await;
    assert_eq!(back["previous_response_id"], first["id"]);
    assert_eq!(
        mock.requests_containing("and mango").last().unwrap().body["messages"].as_array().unwrap().len(),
        3
    );
    // Input items: the whole turn, newest first, each with an id.
    let (status, items) = get(&base, KEY, &format!("/v1/responses/{streamed_id}/input_items")).await;
    assert_eq!(status, 200, "{items}");
    let data = items["data"].as_array().unwrap();
    assert_eq!(data.len(), 3, "{items}");
    assert_eq!(data[0]["content"], "and mango");
    assert!(data.iter().all(|i| i["id"].as_str().is_some_and(|s| !s.is_empty())), "{items}");

    // Another org sees nothing: not by id, not as a predecessor, not as a referenced item.
    let own = streamed_id.clone();
    assert_eq!(get(&base, OTHER_KEY, &format!("/v1/responses/{own}")).await.0, 404);
    assert_eq!(get(&base, OTHER_KEY, &format!("/v1/responses/{own}/input_items")).await.0, 404);
    assert_eq!(delete(&base, OTHER_KEY, &format!("/v1/responses/{own}")).await.0, 404);
    let (status, e) =
        post(&base, OTHER_KEY, json!({"model": "mock", "previous_response_id": own, "input": "x"})).await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("previous_response_id")), "{e}");
    let (status, e) = post(
        &base,
        OTHER_KEY,
        json!({"model": "mock", "input": [{"type": "item_reference", "id": call["id"]}]}),
    )
    .await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("input")), "{e}");
    // The owner still reads it, then deletes it.
    assert_eq!(get(&base, KEY, &format!("/v1/responses/{own}")).await.0, 200);
    let (status, gone) = delete(&base, KEY, &format!("/v1/responses/{own}")).await;
    assert_eq!((status, gone["deleted"].clone()), (200, json!(true)), "{gone}");
    assert_eq!(get(&base, KEY, &format!("/v1/responses/{own}")).await.0, 404);

    // A zero-retention key: its turns are never stored, and asking for state is a clear 400.
    let (status, turn) = post(&base, ZR_KEY, json!({"model": "mock", "input": "nothing kept"})).await;
    assert_eq!(status, 200, "{turn}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(get(&base, ZR_KEY, &format!("/v1/responses/{}", turn["id"].as_str().unwrap())).await.0, 404);
    for (body, param) in [
        (json!({"model": "mock", "input": "x", "store": true}), "store"),
        (json!({"model": "mock", "input": "x", "previous_response_id": first["id"]}), "previous_response_id"),
    ] {
        let (status, e) = post(&base, ZR_KEY, body).await;
        assert_eq!((status, e["error"]["param"].as_str()), (400, Some(param)), "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("zero-retention"), "{e}");
    }

    // store: false keeps nothing.
    let (_, unstored) =
        post(&base, KEY, json!({"model": "mock", "input": "forget me", "store": false})).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(get(&base, KEY, &format!("/v1/responses/{}", unstored["id"].as_str().unwrap())).await.0, 404);
    relay.stop().await;

    // At rest the content is sealed: no prompt text in the database file.
    for file in [db.clone(), db.with_extension("db-wal")] {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(!bytes.windows(13).any(|w| w == b"remember kiwi"), "{} holds plaintext", file.display());
    }
}

/// A model group that keeps Responses state at the provider (an OpenAI upstream serving `/responses`):
/// the body goes there as sent, `previous_response_id` included, and Relay only lets an org name its own
/// responses (orgs share the provider key, so the provider would answer any of them).
#[tokio::test]
async fn provider_kept_state_is_forwarded_and_stays_in_its_org() {
    let mock = MockOpenAi::start().await;
    let dir = temp_dir("responses-provider");
    let config = format!(
        "[server]\nservice_token = \"relay-test-service-token\"\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n{}{}{}\
         [[adapter.providers]]\nname = \"native\"\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"k\"\nresponses_api = true\n\
         [[routing.models]]\nname = \"at-provider\"\nresponses_state = \"provider\"\ndeployments = [{{ provider = \"native\", model = \"gpt-mock-upstream\" }}]\n\
         [[routing.models]]\nname = \"misconfigured\"\nresponses_state = \"provider\"\ndeployments = [{{ provider = \"mock\", model = \"gpt-mock-upstream\" }}]\n",
        dir.join("relay.db").display(),
        auth_section(),
        other_org_key(),
        crate::upstream_sections(&mock),
        mock.base_url,
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let base = relay.http();
    let billing = client::billing_client(&relay.grpc());

    let (status, first, request_id) =
        post_id(&base, KEY, json!({"model": "at-provider", "input": "first native turn"})).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(text_of(&first), "ECHO: first native turn [turn 1]");
    let id = first["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("resp_mock_"), "the provider's own id: {first}");
    let sent = mock.requests_containing("first native turn");
    assert_eq!(sent[0].path, "/v1/responses");
    assert_eq!(sent[0].body["model"], "gpt-mock-upstream");
    assert!(sent[0].body.get("store").is_none(), "the client's body as it was: {}", sent[0].body);
    let u = client::recorded_usage(&billing, &request_id).await.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (1003, 6), "the provider's usage");
    assert_eq!(stored(&base, KEY, &id).await["id"], id.as_str(), "Relay keeps the org's copy");

    // The chain continues at the provider, streamed.
    let r = client::http()
        .post(format!("{base}/v1/responses"))
        .bearer_auth(KEY)
        .json(&json!({"model": "at-provider", "previous_response_id": id, "input": "second native turn", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sse = r.text().await.unwrap();
    assert!(sse.contains("[turn 2]") && sse.contains("response.completed"), "{sse}");
    assert_eq!(mock.requests_containing("second native turn")[0].body["previous_response_id"], id.as_str());

    // Another org cannot name it, and it never reaches the provider.
    let (status, e) = post(
        &base,
        OTHER_KEY,
        json!({"model": "at-provider", "previous_response_id": id, "input": "stolen turn"}),
    )
    .await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("previous_response_id")), "{e}");
    assert!(mock.requests_containing("stolen turn").is_empty());
    // A zero-retention key is sent `store: false`; a deployment without the Responses API is a clear 400.
    let (status, _) =
        post(&base, ZR_KEY, json!({"model": "at-provider", "input": "private native turn"})).await;
    assert_eq!(status, 200);
    assert_eq!(mock.requests_containing("private native turn")[0].body["store"], false);
    let (status, e) =
        post(&base, KEY, json!({"model": "misconfigured", "previous_response_id": id, "input": "x"})).await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("does not serve the Responses API"), "{e}");
    relay.stop().await;
}
