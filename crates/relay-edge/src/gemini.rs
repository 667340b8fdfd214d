//! Gemini's native API inbound, so the `google-genai` SDKs work against Relay on any upstream:
//! `POST /v1beta/models/{model}:generateContent`, `:streamGenerateContent` (`?alt=sse` events, or Google's
//! streamed JSON array without it), `:countTokens`, and `GET /v1beta/models[/{model}]`. The key comes as
//! `x-goog-api-key` (or `?key=`, which is moved into that header and never logged). Errors answer in
//! Google's shape.

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use relay_core::pb::routing::v1::ModelInfo;
use relay_core::{ErrorCode, RelayError};
use serde::Deserialize;
use serde_json::json;

use crate::Edge;
use crate::chat::{self, InUrl};
use crate::error::Inbound;
use crate::request::RequestCtx;

const INBOUND: Inbound = Inbound::Gemini;

#[derive(Deserialize, Default)]
pub struct Params {
    #[serde(default)]
    alt: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

/// Gemini clients on paths shared with OpenAI's (`GET /v1/models`): they present a Google-style key.
pub fn is_gemini_client(headers: &HeaderMap, params: &Params) -> bool {
    params.key.is_some()
        || headers.contains_key("x-goog-api-key")
        || headers.contains_key("x-goog-api-client")
}

/// A `?key=` credential becomes the header every other path reads (when no header names a key).
fn with_query_key(mut headers: HeaderMap, params: &Params) -> HeaderMap {
    let presented = crate::principal::presented_key(&headers);
    if presented.is_empty()
        && let Some(v) = params.key.as_deref().and_then(|k| HeaderValue::from_str(k).ok())
    {
        headers.insert("x-goog-api-key", v);
    }
    headers
}

/// `models/{model}:{action}` as Gemini clients write it (the `models/` prefix is the route's).
fn split(tail: &str) -> Result<(&str, &str), RelayError> {
    let (model, action) = tail.rsplit_once(':').ok_or_else(|| {
        RelayError::new(
            ErrorCode::NotFound,
            format!("Method not found for `models/{tail}`: POST `models/{{model}}:generateContent`."),
        )
    })?;
    let model = model.strip_prefix("models/").unwrap_or(model);
    Ok((model, action))
}

/// `POST /v1beta/models/{model}:{action}`.
pub async fn model_action(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    Path(tail): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let headers = with_query_key(headers, &params);
    let (model, action) = match split(&tail) {
        Ok(x) => x,
        Err(e) => return INBOUND.error(e),
    };
    let model = Some(model.to_owned());
    match action {
        "generateContent" | "streamGenerateContent" => {
            let stream = action == "streamGenerateContent";
            let url = InUrl { model, stream: Some(stream) };
            let resp = chat::serve(edge, ctx, headers, body, INBOUND, url).await;
            if stream && params.alt.as_deref() != Some("sse") { json_array(resp) } else { resp }
        }
        "countTokens" => match chat::count(&edge, &ctx, &headers, body, INBOUND, model).await {
            Ok(n) => axum::Json(json!({"totalTokens": n})).into_response(),
            Err(e) => INBOUND.error(e),
        },
        other => INBOUND.error(RelayError::new(
            ErrorCode::NotFound,
            format!("Method `{other}` is not served by this relay: use generateContent, streamGenerateContent or countTokens."),
        )),
    }
}

fn model_json(m: &ModelInfo) -> serde_json::Value {
    json!({
        "name": format!("models/{}", m.id), "baseModelId": m.id, "version": "relay", "displayName": m.id,
        "description": format!("{} through Relay", m.id),
        "supportedGenerationMethods": ["generateContent", "streamGenerateContent", "countTokens"],
    })
}

/// `GET /v1beta/models`: the models this key may use.
pub async fn list_models(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    let headers = with_query_key(headers, &params);
    let result = async {
        let p = edge.principal(&ctx, &headers).await?;
        crate::routes::visible_models(&edge, &p).await
    }
    .await;
    match result {
        Ok(models) => {
            axum::Json(json!({"models": models.iter().map(model_json).collect::<Vec<_>>()})).into_response()
        }
        Err(e) => INBOUND.error(e),
    }
}

/// `GET /v1beta/models/{model}`.
pub async fn get_model(
    State(edge): State<Edge>,
    Extension(ctx): Extension<RequestCtx>,
    Path(name): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    let headers = with_query_key(headers, &params);
    let id = name.strip_prefix("models/").unwrap_or(&name).to_owned();
    let result = async {
        let p = edge.principal(&ctx, &headers).await?;
        let models = crate::routes::visible_models(&edge, &p).await?;
        models.into_iter().find(|m| m.id == id).ok_or_else(|| {
            RelayError::new(
                ErrorCode::ModelNotFound,
                format!("models/{id} is not found for API version v1beta."),
            )
        })
    }
    .await;
    match result {
        Ok(m) => axum::Json(model_json(&m)).into_response(),
        Err(e) => INBOUND.error(e),
    }
}

/// A streamed answer without `alt=sse`: Google sends the chunks as one JSON array, element by element.
/// Error answers (not event streams) pass unchanged.
fn json_array(resp: Response) -> Response {
    let is_stream = resp.status() == StatusCode::OK
        && resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !is_stream {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let mut framer = ArrayFramer::default();
    let events = body.into_data_stream().map(move |chunk| chunk.map(|b| framer.push(&b)));
    let close = futures_util::stream::once(async { Ok::<_, axum::Error>(Bytes::from_static(b"]")) });
    Response::from_parts(parts, Body::from_stream(events.chain(close)))
}

/// Turns `data:` events into array elements: `[` before the first, `,` between, the caller adds `]`.
#[derive(Default)]
struct ArrayFramer {
    pending: Vec<u8>,
    started: bool,
    elements: usize,
}

impl ArrayFramer {
    fn push(&mut self, bytes: &[u8]) -> Bytes {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            out.push(b'[');
        }
        while let Some((end, separator)) = boundary(&self.pending) {
            let data = event_data(&self.pending[..end]);
            self.pending.drain(..end + separator);
            if data.is_empty() {
                continue;
            }
            if self.elements > 0 {
                out.push(b',');
            }
            self.elements += 1;
            out.extend_from_slice(data.as_bytes());
        }
        Bytes::from(out)
    }
}

/// The end of the first complete event and the length of its blank-line separator.
fn boundary(b: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(b, b"\n\n").map(|i| (i, 2));
    let crlf = memchr::memmem::find(b, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn event_data(event: &[u8]) -> String {
    let text = String::from_utf8_lossy(event);
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_model_and_the_method() {
        assert_eq!(
            split("gemini-2.5-flash:generateContent").unwrap(),
            ("gemini-2.5-flash", "generateContent")
        );
        assert_eq!(split("models/m:countTokens").unwrap(), ("m", "countTokens"));
        assert_eq!(split("no-method").unwrap_err().code, ErrorCode::NotFound);
    }

    #[test]
    fn events_become_one_json_array_however_they_are_cut() {
        let sse = "data: {\"a\":1}\r\n\r\ndata: {\"b\":2}\n\ndata: {\"c\":3}\r\n\r\n";
        for cut in 0..sse.len() {
            let mut f = ArrayFramer::default();
            let mut out = Vec::new();
            out.extend_from_slice(&f.push(&sse.as_bytes()[..cut]));
            out.extend_from_slice(&f.push(&sse.as_bytes()[cut..]));
            out.push(b']');
            let v: serde_json::Value = serde_json::from_slice(&out)
                .unwrap_or_else(|e| panic!("cut {cut}: {e}: {}", String::from_utf8_lossy(&out)));
            assert_eq!(v, json!([{"a": 1}, {"b": 2}, {"c": 3}]), "cut {cut}");
        }
    }
}
