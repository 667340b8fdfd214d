//! A deterministic OpenAI-compatible upstream for tests.
//!
//! Replies `ECHO: <last user text>` (directives removed), one token per space-separated word, usage
//! `prompt = 1000 + words of all input`, `completion = reply tokens`. Streams one chunk per token, the usage
//! chunk when `stream_options.include_usage` is set, then `[DONE]`. Knobs travel in the message text:
//! `[[mock status=503]]`, `[[mock chunk_delay_ms=50]]`, `[[mock delay_ms=500]]` (whole answers), `[[mock die_after=2]]` (close after N events).
//! `[[mock call=1]]` with tools: the answer calls the first tool; after a tool result it quotes it.
//! It also speaks Anthropic Messages (`/v1/messages`) and Gemini (`/v1beta/models/{m}:generateContent`),
//! whole answers only, with the same echo and usage.
//! Faults of the whole upstream (every request, changeable while a test runs): [`MockOpenAi::fail_with`],
//! [`MockOpenAi::delay`], and [`MockOpenAi::slow_tail`] (one request in N answers late).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone, Default)]
struct Shared {
    log: Arc<Mutex<Vec<Recorded>>>,
    /// Status every chat request is answered with (0 = answer normally).
    fail_status: Arc<AtomicU64>,
    /// Delay before every chat answer (headers included), ms.
    delay_ms: Arc<AtomicU64>,
    /// Every `slow_every`-th chat request waits `slow_ms` more (0 = never).
    slow_every: Arc<AtomicU64>,
    slow_ms: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// The next `fail_next` chat requests answer `fail_next_status`, with `Retry-After` when set.
    fail_next: Arc<AtomicU64>,
    fail_next_status: Arc<AtomicU64>,
    fail_retry_after: Arc<AtomicU64>,
    /// Responses the mock stored (`/v1/responses` with `store`), with how many turns their chain has.
    responses: Arc<Mutex<std::collections::HashMap<String, u64>>>,
}

pub struct MockOpenAi {
    pub base_url: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockOpenAi {
    pub async fn start() -> Self {
        let shared = Shared::default();
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/completions", post(completions))
            .route("/v1/moderations", post(moderations))
            .route("/v1/audio/speech", post(speech))
            .route("/v1/audio/transcriptions", post(transcriptions))
            .route("/v1/images/generations", post(images))
            .route("/v1/responses", post(responses))
            .route("/v1/messages", post(anthropic_messages))
            .route("/v1beta/models/{model_action}", post(gemini_generate))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            use axum::serve::ListenerExt as _;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).await;
        });
        Self { base_url: format!("http://{addr}/v1"), shared, task }
    }

    /// From now on, every chat request is answered `status` (0 = answer normally again).
    pub fn fail_with(&self, status: u16) {
        self.shared.fail_status.store(u64::from(status), Ordering::SeqCst);
    }

    /// From now on, every chat answer (its headers too) comes `ms` late.
    pub fn delay(&self, ms: u64) {
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// One chat request in `every` waits `ms` before answering (a slow tail; `every` = 0 turns it off).
    pub fn slow_tail(&self, every: u64, ms: u64) {
        self.shared.slow_ms.store(ms, Ordering::SeqCst);
        self.shared.slow_every.store(every, Ordering::SeqCst);
    }

    /// The next `n` chat requests answer `status` (with `Retry-After: retry_after` seconds when given).
    pub fn fail_next(&self, n: u64, status: u16, retry_after: Option<u64>) {
        self.shared.fail_next_status.store(u64::from(status), Ordering::SeqCst);
        self.shared.fail_retry_after.store(retry_after.unwrap_or(0), Ordering::SeqCst);
        self.shared.fail_next.store(n, Ordering::SeqCst);
    }

    /// Chat requests received so far.
    pub fn chat_requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Every request received whose body mentions `needle`.
    pub fn requests_containing(&self, needle: &str) -> Vec<Recorded> {
        let log = self.shared.log.lock().unwrap();
        log.iter().filter(|r| r.body.to_string().contains(needle)).cloned().collect()
    }
}

/// What the mock answers to user text `text`.
pub fn echo(text: &str) -> String {
    format!("ECHO: {}", strip_directives(text).0)
}

fn strip_directives(text: &str) -> (String, Vec<(String, String)>) {
    let mut out = String::new();
    let mut knobs = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("[[mock") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("]]") else {
            break;
        };
        for part in rest[start + 6..start + end].split_whitespace() {
            if let Some((k, v)) = part.split_once('=') {
                knobs.push((k.to_owned(), v.to_owned()));
            }
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    (out.split_whitespace().collect::<Vec<_>>().join(" "), knobs)
}

fn knob(knobs: &[(String, String)], name: &str) -> Option<u64> {
    knobs.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.parse().ok())
}

fn content_text(c: &Value) -> String {
    match c {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(" "),
        _ => String::new(),
    }
}

fn record(shared: &Shared, path: &str, headers: &HeaderMap, body: &Value) {
    shared.log.lock().unwrap().push(Recorded {
        path: path.into(),
        headers: headers.clone(),
        body: body.clone(),
    });
}

fn error(status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({"error": {"message": message, "type": "mock_error", "code": null}})))
        .into_response()
}

async fn chat(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "invalid json");
    };
    record(&shared, "/v1/chat/completions", &headers, &req);
    let n = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let mut wait = shared.delay_ms.load(Ordering::SeqCst);
    let every = shared.slow_every.load(Ordering::SeqCst);
    if every > 0 && n % every == 0 {
        wait += shared.slow_ms.load(Ordering::SeqCst);
    }
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    if shared.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        let status = shared.fail_next_status.load(Ordering::SeqCst) as u16;
        let mut resp = error(status, &format!("mock upstream fails once with {status}"));
        match shared.fail_retry_after.load(Ordering::SeqCst) {
            0 => {}
            secs => {
                resp.headers_mut().insert("retry-after", secs.into());
            }
        }
        return resp;
    }
    match shared.fail_status.load(Ordering::SeqCst) {
        0 => {}
        status => return error(status as u16, &format!("mock upstream fails with {status}")),
    }
    let messages = req["messages"].as_array().cloned().unwrap_or_default();
    let last_user = messages.iter().rev().find(|m| m["role"] == "user").map(|m| content_text(&m["content"]));
    let (_, knobs) = strip_directives(last_user.as_deref().unwrap_or(""));
    if let Some(status) = knob(&knobs, "status") {
        return error(status as u16, &format!("mock forced status {status}"));
    }
    // Tools: `[[mock call=1]]` in the last user message makes the answer a call of the first tool (its
    // arguments carry the message); after a tool result, the answer quotes it.
    let tool_result = messages.last().filter(|m| m["role"] == "tool").map(|m| content_text(&m["content"]));
    let first_tool = req["tools"][0]["function"]["name"].as_str().map(str::to_owned);
    if let (Some(name), Some(_), None) = (&first_tool, knob(&knobs, "call"), &tool_result) {
        let args = json!({"q": strip_directives(last_user.as_deref().unwrap_or("")).0}).to_string();
        let call =
            json!({"id": "call_mock_1", "type": "function", "function": {"name": name, "arguments": args}});
        let usage = json!({"prompt_tokens": 1000, "completion_tokens": 7, "total_tokens": 1007});
        let model = req["model"].as_str().unwrap_or("mock").to_owned();
        if req["stream"] != json!(true) {
            return axum::Json(json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [call]}, "finish_reason": "tool_calls"}],
                "usage": usage}))
            .into_response();
        }
        let mut indexed = call.clone();
        indexed["index"] = json!(0);
        let frames = [
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [indexed]}, "finish_reason": null}]}),
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}], "usage": usage}),
        ];
        let mut body: String = frames.iter().map(|f| format!("data: {f}\n\n")).collect();
        body.push_str("data: [DONE]\n\n");
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(body))
            .unwrap();
    }
    let reply = match &tool_result {
        Some(result) => format!("TOOL SAID: {result}"),
        None => echo(last_user.as_deref().unwrap_or("")),
    };
    let parts: Vec<&str> = reply.split(' ').collect();
    let tokens: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| if i + 1 < parts.len() { format!("{p} ") } else { (*p).into() })
        .collect();
    let input_words: usize =
        messages.iter().map(|m| content_text(&m["content"]).split_whitespace().count()).sum();
    let (prompt, completion) = (1000 + input_words as u64, tokens.len() as u64);
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    let model = req["model"].as_str().unwrap_or("mock").to_owned();
    let id = "chatcmpl-mock";
    if req["stream"] != json!(true) {
        if let Some(ms) = knob(&knobs, "delay_ms") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        return axum::Json(json!({"id": id, "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": usage}))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    events.extend(tokens.iter().map(|t| chunk(json!({"content": t}), Value::Null)));
    events.push(chunk(json!({}), json!("stop")));
    if req["stream_options"]["include_usage"] == json!(true) {
        events.push(json!({"id": id, "object": "chat.completion.chunk", "created": 1, "model": model,
                           "choices": [], "usage": usage}));
    }
    let mut frames: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    frames.push("data: [DONE]\n\n".into());
    if let Some(n) = knob(&knobs, "die_after") {
        frames.truncate(n as usize);
    }
    let delay = Duration::from_millis(knob(&knobs, "chunk_delay_ms").unwrap_or(0));
    let stream = futures_util::stream::unfold(frames.into_iter(), move |mut it| async move {
        let frame = it.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(frame)), it))
    });
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).unwrap()
}

async fn embeddings(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "invalid json");
    };
    record(&shared, "/v1/embeddings", &headers, &req);
    let inputs: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => return error(400, "bad input"),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": [t.len() as f64, 0.5]}))
        .collect();
    let words: usize = inputs.iter().map(|t| t.split_whitespace().count()).sum();
    axum::Json(json!({"object": "list", "data": data, "model": req["model"],
                      "usage": {"prompt_tokens": words, "total_tokens": words}}))
    .into_response()
}

/// The text of the last user turn and the words of every turn, from Anthropic `messages` or Gemini
/// `contents`.
fn last_user_and_words(
    turns: &[Value],
    role_key: &str,
    user: &str,
    text_of: fn(&Value) -> String,
) -> (String, usize) {
    let last = turns.iter().rev().find(|t| t[role_key] == user).map(text_of).unwrap_or_default();
    let words = turns.iter().map(|t| text_of(t).split_whitespace().count()).sum();
    (last, words)
}

/// Anthropic Messages, whole answers only: echoes the last user turn like the chat endpoint.
async fn anthropic_messages(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return error(400, "invalid json") };
    record(&shared, "/v1/messages", &headers, &req);
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let turns = req["messages"].as_array().cloned().unwrap_or_default();
    let (last, words) = last_user_and_words(&turns, "role", "user", |t| content_text(&t["content"]));
    let reply = echo(&last);
    let (prompt, completion) = (1000 + words as u64, reply.split(' ').count() as u64);
    axum::Json(json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": req["model"],
        "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": prompt, "output_tokens": completion}}))
    .into_response()
}

/// Gemini `models/{model}:generateContent`, whole answers only.
async fn gemini_generate(
    State(shared): State<Shared>,
    axum::extract::Path(model_action): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return error(400, "invalid json") };
    record(&shared, &format!("/v1beta/models/{model_action}"), &headers, &req);
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let turns = req["contents"].as_array().cloned().unwrap_or_default();
    let parts_text = |t: &Value| {
        t["parts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (last, words) = last_user_and_words(&turns, "role", "user", parts_text);
    let reply = echo(&last);
    let (prompt, completion) = (1000 + words as u64, reply.split(' ').count() as u64);
    let model = model_action.split(':').next().unwrap_or_default().to_owned();
    axum::Json(json!({"candidates": [{"content": {"role": "model", "parts": [{"text": reply}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": completion, "totalTokenCount": prompt + completion},
        "modelVersion": model}))
    .into_response()
}

/// Legacy completions: echoes the prompt, with usage like the chat endpoint.
async fn completions(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return error(400, "invalid json") };
    record(&shared, "/v1/completions", &headers, &req);
    let prompt = req["prompt"].as_str().unwrap_or_default().to_owned();
    let reply = echo(&prompt);
    let (p, c) = (1000 + prompt.split_whitespace().count() as u64, reply.split(' ').count() as u64);
    if req["stream"] == json!(true) {
        // A chunk per word, the finish, then usage when asked (as OpenAI streams completions).
        let chunk = |text: &str, finish: Value| {
            json!({"id": "cmpl-mock", "object": "text_completion", "created": 1, "model": req["model"],
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]})
        };
        let mut events: Vec<Value> = reply.split_inclusive(' ').map(|t| chunk(t, Value::Null)).collect();
        events.push(chunk("", json!("stop")));
        if req["stream_options"]["include_usage"] == json!(true) {
            events.push(json!({"id": "cmpl-mock", "object": "text_completion", "created": 1, "model": req["model"], "choices": [],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}));
        }
        let mut body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        body.push_str("data: [DONE]\n\n");
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(body))
            .unwrap();
    }
    axum::Json(json!({"id": "cmpl-mock", "object": "text_completion", "created": 1, "model": req["model"],
        "choices": [{"text": reply, "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}))
    .into_response()
}

/// Moderations: flags input containing "attack" (no usage, as OpenAI's).
async fn moderations(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return error(400, "invalid json") };
    record(&shared, "/v1/moderations", &headers, &req);
    let flagged = req["input"].to_string().contains("attack");
    axum::Json(json!({"id": "modr-mock", "model": req["model"],
        "results": [{"flagged": flagged, "categories": {"violence": flagged}, "category_scores": {"violence": if flagged { 0.9 } else { 0.01 }}}]}))
    .into_response()
}

/// The Responses API with provider-side state: `previous_response_id` must name a response the mock
/// stored, and the answer says which turn of its chain it is (`ECHO: <text> [turn N]`). Whole or streamed.
async fn responses(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return error(400, "invalid json") };
    record(&shared, "/v1/responses", &headers, &req);
    let turn = match req["previous_response_id"].as_str() {
        None => 1,
        Some(prev) => match shared.responses.lock().unwrap().get(prev) {
            Some(n) => n + 1,
            None => return error(400, &format!("Previous response with id '{prev}' not found.")),
        },
    };
    let text = match &req["input"] {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .rev()
            .find(|i| i["role"] == "user")
            .map(|i| content_text(&i["content"]))
            .unwrap_or_default(),
        _ => String::new(),
    };
    let n = shared.requests.fetch_add(1, Ordering::SeqCst);
    let id = format!("resp_mock_{n}");
    if req["store"] != json!(false) {
        shared.responses.lock().unwrap().insert(id.clone(), turn);
    }
    let reply = format!("{} [turn {turn}]", echo(&text));
    let usage = json!({"input_tokens": 1000 + text.split_whitespace().count(), "output_tokens": reply.split(' ').count(),
        "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
    let message = json!({"type": "message", "id": format!("msg_mock_{n}"), "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": reply, "annotations": []}]});
    let response = json!({"id": id, "object": "response", "created_at": 1, "status": "completed", "model": req["model"],
        "output": [message], "previous_response_id": req["previous_response_id"], "usage": usage});
    if req["stream"] != json!(true) {
        return axum::Json(response).into_response();
    }
    let mut events = vec![
        json!({"type": "response.created", "response": {"id": id, "object": "response", "status": "in_progress", "model": req["model"], "output": []}}),
    ];
    events.extend(reply.split_inclusive(' ').map(
        |t| json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": t}),
    ));
    events.push(json!({"type": "response.completed", "response": response}));
    let body: String = events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("")))
        .collect();
    Response::builder().header("content-type", "text/event-stream").body(Body::from(body)).unwrap()
}

/// Image generation: `n` placeholder images (no usage, as DALL-E answers).
async fn images(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return error(400, "invalid json") };
    record(&shared, "/v1/images/generations", &headers, &req);
    let n = req["n"].as_u64().unwrap_or(1).min(10);
    let data: Vec<Value> =
        (0..n).map(|i| json!({"url": format!("https://images.example/{i}.png")})).collect();
    axum::Json(json!({"created": 1, "data": data})).into_response()
}

/// Transcriptions: a multipart form; answers with the file's size and the form's model, and token usage
/// as gpt-4o-transcribe reports it. The recorded body holds the form's text fields and the file's size.
async fn transcriptions(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let kind = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(boundary) = kind.split("boundary=").nth(1) else { return error(400, "not a form") };
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let delimiter = format!("--{boundary}").into_bytes();
    let mut fields = serde_json::Map::new();
    let mut rest = &body[..];
    while let Some(at) = find(rest, &delimiter) {
        rest = &rest[at + delimiter.len()..];
        let Some(head_end) = find(rest, b"\r\n\r\n") else { break };
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let data = &rest[head_end + 4..];
        let end = find(data, &delimiter).map_or(data.len(), |e| e.saturating_sub(2));
        let Some(name) = head.split("name=\"").nth(1).and_then(|n| n.split('"').next()) else { continue };
        let value = if head.contains("filename=") {
            json!(end)
        } else {
            json!(String::from_utf8_lossy(&data[..end]))
        };
        fields.insert(name.to_owned(), value);
    }
    let req = Value::Object(fields);
    record(&shared, "/v1/audio/transcriptions", &headers, &req);
    let reply = format!("transcribed {} bytes with {}", req["file"], req["model"].as_str().unwrap_or(""));
    axum::Json(json!({"text": reply, "usage": {"type": "tokens", "input_tokens": 50, "output_tokens": 6, "total_tokens": 56}}))
        .into_response()
}

/// Speech: a few bytes of "audio" (the input's length in them), as `audio/mpeg`.
async fn speech(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return error(400, "invalid json") };
    record(&shared, "/v1/audio/speech", &headers, &req);
    let n = req["input"].as_str().map_or(0, str::len);
    Response::builder()
        .header("content-type", "audio/mpeg")
        .body(Body::from(format!("ID3-mock-audio-{n}")))
        .unwrap()
}
