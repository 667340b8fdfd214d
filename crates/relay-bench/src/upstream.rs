//! The two servers the benchmark puts around Relay, each run as its own process (so its CPU is its own):
//! a mock OpenAI upstream (a ~1 KB chat answer, or a stream of `chunks` events `gap_ms` apart) and the
//! floor, a bare reverse proxy that forwards every request to the upstream and streams the answer back.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt as _;
use futures_util::StreamExt as _;

#[derive(Clone)]
struct Mock {
    whole: Bytes,
    chunk: Bytes,
    tail: Bytes,
    chunks: usize,
    gap: std::time::Duration,
}

async fn listen() -> anyhow::Result<(tokio::net::TcpListener, String)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    println!("{}", serde_json::json!({ "listening": addr }));
    Ok((l, addr))
}

fn nodelay(tcp: &mut tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}

/// `relay-bench mock [--chunks N] [--gap-ms MS]`.
pub async fn mock(chunks: usize, gap_ms: u64) -> anyhow::Result<()> {
    let content = "x".repeat(700);
    let whole = serde_json::json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 200, "completion_tokens": 150, "total_tokens": 350}
    });
    let chunk = format!(
        "data: {}\n\n",
        serde_json::json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": null}]})
    );
    let tail = format!(
        "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
        serde_json::json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        serde_json::json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 200, "completion_tokens": chunks, "total_tokens": 200 + chunks}})
    );
    let state = Mock {
        whole: Bytes::from(whole.to_string()),
        chunk: Bytes::from(chunk),
        tail: Bytes::from(tail),
        chunks,
        gap: std::time::Duration::from_millis(gap_ms),
    };
    let app = Router::new().route("/v1/chat/completions", axum::routing::post(chat)).with_state(state);
    let (l, _) = listen().await?;
    axum::serve(l.tap_io(nodelay), app).await?;
    Ok(())
}

async fn chat(State(m): State<Mock>, body: Bytes) -> Response {
    let streaming = body.windows(13).any(|w| w == b"\"stream\":true");
    if !streaming {
        return ([("content-type", "application/json")], m.whole.clone()).into_response();
    }
    let (chunk, gap, n) = (m.chunk.clone(), m.gap, m.chunks);
    let events = futures_util::stream::iter(0..n)
        .then(move |_| {
            let chunk = chunk.clone();
            async move {
                if !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                Ok::<_, std::io::Error>(chunk)
            }
        })
        .chain(futures_util::stream::once(std::future::ready(Ok(m.tail.clone()))));
    ([("content-type", "text/event-stream")], Body::from_stream(events)).into_response()
}

#[derive(Clone)]
struct Proxy {
    client: reqwest::Client,
    upstream: String,
}

/// `relay-bench proxy --upstream http://host:port`: the floor.
pub async fn proxy(upstream: String) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().tcp_nodelay(true).pool_max_idle_per_host(1024).build()?;
    let app = Router::new().fallback(forward).with_state(Proxy { client, upstream });
    let (l, _) = listen().await?;
    axum::serve(l.tap_io(nodelay), app).await?;
    Ok(())
}

async fn forward(State(p): State<Proxy>, uri: axum::http::Uri, headers: HeaderMap, body: Bytes) -> Response {
    let mut req = p.client.post(format!("{}{}", p.upstream, uri.path())).body(body);
    for name in ["authorization", "content-type"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    match req.send().await {
        Ok(r) => {
            let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let ct = r.headers().get("content-type").cloned();
            let mut resp = Body::from_stream(r.bytes_stream()).into_response();
            *resp.status_mut() = status;
            if let Some(ct) = ct {
                resp.headers_mut().insert("content-type", ct);
            }
            resp
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}
