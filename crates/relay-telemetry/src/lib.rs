//! relay-telemetry: logs, traces and metrics for every Relay process.
//!
//! Owns the tracing subscriber, the OpenTelemetry tracer provider (OTLP/gRPC export when an endpoint is
//! configured), W3C trace-context propagation helpers for HTTP headers and string maps, and the process-wide
//! Prometheus recorder with its [`catalogue`] of metrics, and the [`access_log`] writer. It does not know about services, requests or gRPC types (relay-proto wraps these
//! helpers for tonic metadata).

pub mod access_log;
pub mod catalogue;
pub mod handles;
pub mod redact;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, global};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use serde::Deserialize;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// `[telemetry]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`. Unset: no trace export.
    pub otlp_endpoint: Option<String>,
    /// `text` (human) or `json` (one object per line).
    pub log_format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info,relay_edge=debug`. `RUST_LOG` wins when set.
    pub log_filter: String,
    /// How long spans wait in the batch before export.
    pub export_delay_ms: u64,
    /// One JSON line per request.
    pub access_log: access_log::AccessLogConfig,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            export_delay_ms: 1000,
            access_log: access_log::AccessLogConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes pending spans.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter. Blocking: call it from `spawn_blocking` or after the runtime ends.
    pub fn shutdown(&self) {
        access_log::flush(Duration::from_secs(2));
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber and propagator. Must run inside a Tokio runtime (the OTLP exporter needs it).
/// Every log line goes out through the masking writer: no key, token, email or card number reaches the
/// logs, whatever a message or a field carries.
fn masked_stderr() -> redact::Scrubbing<std::io::Stderr> {
    redact::Scrubbing(std::io::stderr())
}

pub fn init(cfg: &TelemetryConfig, service_name: &str) -> anyhow::Result<Telemetry> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    access_log::install(&cfg.access_log)?;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.log_filter.clone());
    let fmt = match cfg.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(masked_stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(masked_stderr).boxed(),
    }
    .with_filter(EnvFilter::try_new(filter)?);

    let Some(endpoint) = &cfg.otlp_endpoint else {
        tracing_subscriber::registry().with(fmt).try_init()?;
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()?;
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(cfg.export_delay_ms))
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_resource(Resource::builder().with_service_name(service_name.to_owned()).build())
        .build();
    let tracer = provider.tracer("relay");
    global::set_tracer_provider(provider.clone());
    // The exporter's own gRPC client must not trace itself (each export would create more spans).
    let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(EnvFilter::try_new(
        "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,reqwest=off",
    )?);
    tracing_subscriber::registry().with(fmt).with(otel).try_init()?;
    Ok(Telemetry { provider: Some(provider) })
}

// === propagation ===

/// Reads W3C trace context from HTTP headers (and so from gRPC metadata, which is HTTP/2 headers).
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes W3C trace context into HTTP headers.
pub struct HeaderInjector<'a>(pub &'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(val)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, val);
        }
    }
}

/// The parent context carried by incoming headers.
pub fn context_from_headers(headers: &http::HeaderMap) -> Context {
    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Adds the current span's trace context to outgoing headers.
pub fn inject_current_into_headers(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}

/// The current span's trace context as a string map (stored in usage events, NATS headers).
pub fn current_context_map() -> HashMap<String, String> {
    let cx = tracing::Span::current().context();
    let mut map = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut map));
    map
}

/// The context carried by a string map written by [`current_context_map`].
pub fn context_from_map(map: &HashMap<String, String>) -> Context {
    global::get_text_map_propagator(|p| p.extract(map))
}

/// Makes `span` a child of the remote context `cx` (no-op when `cx` carries no trace).
pub fn set_parent(span: &tracing::Span, cx: Context) {
    let _ = span.set_parent(cx);
}

// === metrics ===

/// The process-wide Prometheus recorder, installed on first use: every metric of the [`catalogue`]
/// described, histograms with their buckets.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        for m in catalogue::METRICS.iter().filter(|m| m.kind == catalogue::Kind::Histogram) {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(m.name.to_owned()), m.buckets)
                .unwrap_or_else(|_| unreachable!("catalogue buckets are never empty"));
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; metrics then go there instead.
        let _ = metrics::set_global_recorder(recorder);
        for m in catalogue::METRICS {
            match m.kind {
                catalogue::Kind::Counter => metrics::describe_counter!(m.name, m.help),
                catalogue::Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
                catalogue::Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
            }
        }
        // Histogram samples pile up in memory until they are folded into their buckets, which a scrape
        // does; with nobody scraping (or scraping rarely) that was 8 bytes per observation, unbounded.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            }
        });
        handle
    })
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
