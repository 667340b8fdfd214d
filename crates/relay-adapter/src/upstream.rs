//! The HTTP side of providers: one pooled client per provider, requests with auth and trace headers,
//! non-2xx answers mapped to typed errors, and SSE bodies turned into pipeline units by a decoder.

use std::time::Duration;

use futures_util::{Stream, StreamExt, stream};
use http::HeaderMap;
use relay_core::{ErrorCode, RelayError};

use crate::config::ProviderConfig;
use crate::convert::Unit;
use crate::ir::Delta;
use crate::providers::{transport_error, upstream_error};
use crate::sse::{SseEvent, SseParser};
use relay_telemetry::handles::HandleCache;

/// Reads one provider's answers.
pub trait Decoder: Send + 'static {
    /// One event of a streamed answer. An `Err` is an in-band upstream failure.
    fn event(&mut self, ev: &SseEvent) -> Result<Vec<Delta>, RelayError>;
    /// Has the upstream said the answer is finished?
    fn complete(&self) -> bool;
}

pub struct Http {
    pub name: String,
    client: reqwest::Client,
    headers: HeaderMap,
    /// Parsed upstream URLs (a provider's few endpoints): parsing one cost more than the rest of sending.
    urls: HandleCache<Option<reqwest::Url>>,
    statuses: HandleCache<metrics::Counter>,
    duration: metrics::Histogram,
}

impl Http {
    /// `auth`: the provider's credential headers (marked sensitive so they never print).
    pub fn new(cfg: &ProviderConfig, mut auth: HeaderMap) -> anyhow::Result<Self> {
        for v in auth.values_mut() {
            v.set_sensitive(true);
        }
        for (k, v) in &cfg.headers {
            auth.insert(http::HeaderName::from_bytes(k.as_bytes())?, http::HeaderValue::from_str(v)?);
        }
        let mut client = reqwest::Client::builder();
        if let Some(bundle) = &cfg.ca_bundle {
            let certs = relay_runtime::tls::load_certs(bundle)?;
            let certs =
                certs.iter().map(|c| reqwest::Certificate::from_der(c)).collect::<Result<Vec<_>, _>>()?;
            client = client.tls_certs_merge(certs);
        }
        let client = client
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .read_timeout(Duration::from_secs(cfg.read_timeout_secs))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            // Never follow: a redirect would carry provider credentials that are not `Authorization`
            // (`x-api-key`, `api-key`, `x-goog-api-key`) to whatever host it names, and turn a POST into
            // a GET. A 3xx is reported as the upstream's error like any other non-2xx answer.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            name: cfg.name.clone(),
            client,
            headers: auth,
            urls: HandleCache::new(1024),
            statuses: HandleCache::new(64),
            duration: metrics::histogram!("relay_adapter_upstream_duration_seconds", "provider" => cfg.name.clone()),
        })
    }

    pub async fn post(
        &self,
        url: &str,
        request_id: &str,
        extra: HeaderMap,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, RelayError> {
        let mut headers = self.headers.clone();
        // JSON unless the call says otherwise (forwarded forms).
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        headers.extend(extra);
        if let Ok(v) = http::HeaderValue::from_str(request_id) {
            headers.insert("x-request-id", v);
        }
        relay_telemetry::inject_current_into_headers(&mut headers);
        let began = std::time::Instant::now();
        let parsed = self.urls.get(&[url], || reqwest::Url::parse(url).ok());
        let Some(parsed) = parsed.as_ref().clone() else {
            return Err(RelayError::internal(format!("provider `{}` has an invalid URL", self.name)));
        };
        let sent = self.client.post(parsed).headers(headers).body(body).send().await;
        let status = sent.as_ref().map_or(0, |r| r.status().as_u16());
        let mut buf = [0; 10];
        let status = relay_telemetry::handles::decimal(&mut buf, u32::from(status));
        self.statuses
            .counter("relay_adapter_upstream_requests_total", &["provider", "status"], &[&self.name, status])
            .increment(1);
        self.duration.record(began.elapsed().as_secs_f64());
        let resp = sent.map_err(|e| transport_error(&self.name, &e))?;
        if resp.status().is_success() { Ok(resp) } else { Err(upstream_error(&self.name, resp).await) }
    }

    /// POSTs and reads a whole JSON answer (token counts, embeddings).
    pub async fn post_json(
        &self,
        url: &str,
        request_id: &str,
        extra: HeaderMap,
        body: Vec<u8>,
    ) -> Result<serde_json::Value, RelayError> {
        let resp = self.post(url, request_id, extra, body).await?;
        serde_json::from_slice(&self.body(resp).await?).map_err(|_| self.invalid_answer())
    }

    /// A whole answer, at most [`MAX_ANSWER_BYTES`] (a provider is not trusted to bound itself).
    pub async fn body(&self, mut resp: reqwest::Response) -> Result<bytes::Bytes, RelayError> {
        let too_large = || {
            RelayError::new(
                ErrorCode::UpstreamProtocol,
                format!(
                    "upstream provider `{}` sent an answer larger than {} MiB",
                    self.name,
                    MAX_ANSWER_BYTES >> 20
                ),
            )
        };
        if resp.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
            return Err(too_large());
        }
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(&self.name, &e))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    pub fn invalid_answer(&self) -> RelayError {
        RelayError::new(
            ErrorCode::UpstreamProtocol,
            format!("upstream provider `{}` sent an invalid answer", self.name),
        )
    }
}

/// Largest whole (non-streamed) answer read from a provider.
pub const MAX_ANSWER_BYTES: usize = 256 << 20;
/// Largest single server-sent event (one line or a run of lines without the blank line ending it).
pub const MAX_EVENT_BYTES: usize = 16 << 20;

/// The units of a streamed (SSE) answer, read as they arrive.
pub fn sse_units(
    resp: reqwest::Response,
    decoder: Box<dyn Decoder>,
    provider: String,
) -> impl Stream<Item = Unit> + Send {
    struct St {
        body: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
        parser: SseParser,
        decoder: Box<dyn Decoder>,
        over: bool,
    }
    let st = St { body: Box::pin(resp.bytes_stream()), parser: SseParser::default(), decoder, over: false };
    stream::unfold(st, move |mut st| {
        let provider = provider.clone();
        async move {
            if st.over {
                return None;
            }
            let mut units = Vec::new();
            match st.body.next().await {
                Some(Ok(bytes)) => {
                    st.parser.push(&bytes);
                    while let Some(ev) = st.parser.next_event() {
                        match st.decoder.event(&ev) {
                            Ok(deltas) => units.push(Unit::Event { raw: ev.raw, deltas }),
                            Err(e) => {
                                units.push(Unit::Fail(e));
                                st.over = true;
                                break;
                            }
                        }
                    }
                    if !st.over && st.parser.buffered() > MAX_EVENT_BYTES {
                        let msg = format!(
                            "upstream provider `{provider}` sent an event larger than {} MiB",
                            MAX_EVENT_BYTES >> 20
                        );
                        units.push(Unit::Fail(RelayError::new(ErrorCode::UpstreamProtocol, msg)));
                        st.over = true;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "upstream stream broke");
                    let msg = format!("upstream provider `{provider}` stream was interrupted");
                    units.push(Unit::Fail(RelayError::new(ErrorCode::UpstreamServerError, msg)));
                    st.over = true;
                }
                None => {
                    units.push(Unit::End { complete: st.decoder.complete() });
                    st.over = true;
                }
            }
            Some((stream::iter(units), st))
        }
    })
    .flatten()
}

/// An in-band error event's message, for the typed error (4xx-style messages are the provider's own).
pub fn in_band_error(provider: &str, data: &serde_json::Value) -> RelayError {
    let err = data.get("error").unwrap_or(data);
    let kind = err.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let code = match kind {
        "overloaded_error" => ErrorCode::Unavailable,
        "rate_limit_error" => ErrorCode::UpstreamRateLimited,
        "invalid_request_error" => ErrorCode::UpstreamClientError,
        _ => ErrorCode::UpstreamServerError,
    };
    RelayError::new(
        code,
        format!(
            "upstream provider `{provider}` failed mid-answer ({})",
            if kind.is_empty() { "error" } else { kind }
        ),
    )
}
