//! Gemini's native API inbound (what the `google-genai` SDKs send): whole and streamed answers on a
//! converted (OpenAI-compatible) upstream, the body forwarded untouched to a Gemini upstream, a
//! function-calling turn, token counting, Google's error shape, and billing under the Gemini protocol.

use relay_core::pb::common::v1::Protocol;
use serde_json::{Value, json};

use crate::client;
use crate::harness::{KEY, RelayProc, auth_section, temp_dir};

struct Answer {
    status: u16,
    content_type: String,
    request_id: String,
    body: String,
}

async fn call(base: &str, path: &str, key: Option<&str>, body: &Value) -> Answer {
    let mut req = client::http().post(format!("{base}{path}")).json(body);
    if let Some(key) = key {
        req = req.header("x-goog-api-key", key);
    }
    let r = req.send().await.unwrap();
    let header = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let (status, content_type, request_id) =
        (r.status().as_u16(), header("content-type"), header("x-relay-request-id"));
    Answer { status, content_type, request_id, body: r.text().await.unwrap() }
}

fn json_of(a: &Answer) -> Value {
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body))
}

fn text_of(v: &Value) -> String {
    v["candidates"][0]["content"]["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["text"].as_str())
        .collect()
}

fn user(text: &str) -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": text}]}]})
}

#[tokio::test]
async fn gemini_clients_work_on_converted_and_native_upstreams() {
    let mock = relay_test_support::MockOpenAi::start().await;
    let dir = temp_dir("gemini-inbound");
    let root = mock.base_url.trim_end_matches("/v1");
    let config = format!(
        "[server]\nservice_token = \"relay-test-service-token\"\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n{}{}\
         [[adapter.providers]]\nname = \"gemini\"\nkind = \"gemini\"\nbase_url = \"{root}/v1beta\"\napi_key = \"k\"\n\
         [[routing.models]]\nname = \"on-gemini\"\ndeployments = [{{ provider = \"gemini\", model = \"gemini-mock\" }}]\n",
        dir.join("relay.db").display(),
        auth_section(),
        crate::upstream_sections(&mock)
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let base = relay.http();
    let billing = client::billing_client(&relay.grpc());

    // Whole answer, converted to the OpenAI-compatible upstream and back; billed as Gemini.
    let a = call(&base, "/v1beta/models/mock:generateContent", Some(KEY), &user("hello gemini client")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let v = json_of(&a);
    assert_eq!(text_of(&v), relay_test_support::echo("hello gemini client"));
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    let (prompt, completion) = client::mock_usage("hello gemini client");
    assert_eq!(v["usageMetadata"]["promptTokenCount"], prompt);
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], completion);
    let sent = mock.requests_containing("hello gemini client");
    assert_eq!(
        (sent[0].path.as_str(), sent[0].body["model"].as_str()),
        ("/v1/chat/completions", Some("gpt-mock-upstream"))
    );
    let ev = client::recorded_usage(&billing, &a.request_id).await;
    assert_eq!(ev.protocol, Protocol::GeminiGenerate as i32);
    let u = ev.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (prompt, completion));

    // The stable `v1` path and `?key=` work too; the key never reaches the upstream.
    let a =
        call(&base, &format!("/v1/models/mock:generateContent?key={KEY}"), None, &user("via v1 path")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let sent = mock.requests_containing("via v1 path");
    assert!(
        !sent[0].headers.values().any(|v| v.as_bytes() == KEY.as_bytes()),
        "the client key went upstream"
    );

    // A Gemini upstream gets the client's body as it was sent (no `model`, Google's own fields kept).
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "native hello"}]}],
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]});
    let a = call(&base, "/v1beta/models/on-gemini:generateContent", Some(KEY), &body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(text_of(&json_of(&a)), relay_test_support::echo("native hello"));
    let sent = mock.requests_containing("native hello");
    assert_eq!(sent[0].path, "/v1beta/models/gemini-mock:generateContent");
    assert_eq!(sent[0].body, body, "forwarded untouched");

    // A function-calling turn: the call comes back as a functionCall; its functionResponse (paired by
    // name, as the SDKs send it) reaches the upstream as the tool result of that call.
    let tools = json!([{"functionDeclarations": [{"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}}]}]);
    let turn1 = json!({"role": "user", "parts": [{"text": "weather in Paris [[mock call=1]]"}]});
    let a = call(
        &base,
        "/v1beta/models/mock:generateContent",
        Some(KEY),
        &json!({"contents": [turn1], "tools": tools}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let v = json_of(&a);
    let fc = v["candidates"][0]["content"]["parts"][0]["functionCall"].clone();
    assert_eq!(fc["name"], "get_weather", "{v}");
    let upstream_tools = &mock.requests_containing("weather in Paris")[0].body["tools"];
    assert_eq!(upstream_tools[0]["function"]["parameters"]["properties"]["city"]["type"], "string");
    let model_turn =
        json!({"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": fc["args"]}}]});
    let result = json!({"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "sunny and 21C"}}}]});
    let a = call(
        &base,
        "/v1beta/models/mock:generateContent",
        Some(KEY),
        &json!({"contents": [turn1, model_turn, result], "tools": tools}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(text_of(&json_of(&a)), "TOOL SAID: sunny and 21C");
    let messages = mock.requests_containing("sunny and 21C")[0].body["messages"].clone();
    assert_eq!(messages[1]["tool_calls"][0]["id"], messages[2]["tool_call_id"], "{messages}");

    // Streams: `alt=sse` events, then Google's JSON array without it (the demo provider streams).
    let a = call(
        &base,
        "/v1beta/models/demo:streamGenerateContent?alt=sse",
        Some(KEY),
        &user("stream me please"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.content_type.starts_with("text/event-stream"), "{}", a.content_type);
    let events: Vec<Value> = a
        .body
        .split("\r\n\r\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(events.len() > 2, "{}", a.body);
    let text: String = events.iter().map(text_of).collect();
    assert_eq!(text, "You said: stream me please");
    let last = events.last().unwrap();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 5);
    let a =
        call(&base, "/v1beta/models/demo:streamGenerateContent", Some(KEY), &user("stream me please")).await;
    assert!(a.content_type.starts_with("application/json"), "{}", a.content_type);
    let chunks: Vec<Value> = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body));
    assert_eq!(chunks.iter().map(text_of).collect::<String>(), "You said: stream me please");

    // Counting, listing.
    let a = call(&base, "/v1beta/models/demo:countTokens", Some(KEY), &user("one two three")).await;
    assert_eq!((a.status, json_of(&a)["totalTokens"].as_u64()), (200, Some(3)), "{}", a.body);
    let r = client::http()
        .get(format!("{base}/v1beta/models"))
        .header("x-goog-api-key", KEY)
        .send()
        .await
        .unwrap();
    let listed: Value = r.json().await.unwrap();
    assert!(listed["models"].as_array().unwrap().iter().any(|m| m["name"] == "models/demo"), "{listed}");

    // Errors in Google's shape.
    let cases = [
        ("/v1beta/models/mock:generateContent", None, user("x"), 401, "UNAUTHENTICATED"),
        ("/v1beta/models/nope:generateContent", Some(KEY), user("x"), 404, "NOT_FOUND"),
        ("/v1beta/models/mock:generateContent", Some(KEY), json!({"contents": []}), 400, "INVALID_ARGUMENT"),
        ("/v1beta/models/mock:embedContent", Some(KEY), user("x"), 404, "NOT_FOUND"),
        (
            "/v1beta/models/mock:generateContent",
            Some(KEY),
            json!({"contents": [{"role": "bot", "parts": [{"text": "x"}]}]}),
            400,
            "INVALID_ARGUMENT",
        ),
    ];
    for (path, key, body, status, google) in cases {
        let a = call(&base, path, key, &body).await;
        let v = json_of(&a);
        assert_eq!((a.status, v["error"]["status"].as_str()), (status, Some(google)), "{path}: {}", a.body);
        assert_eq!(v["error"]["code"], status);
    }
    relay.stop().await;
}
