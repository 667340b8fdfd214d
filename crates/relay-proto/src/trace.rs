//! W3C trace context in gRPC metadata: injected by every client, extracted once per server request.

use opentelemetry::global;
use opentelemetry::propagation::Injector;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(&value)) {
            self.0.insert(k, v);
        }
    }
}

/// Client interceptor: adds the current span's `traceparent` to the request metadata.
pub fn inject(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut())));
    Ok(req)
}

/// Server `trace_fn`: one span per RPC, parented on the caller's trace.
pub fn server_span(req: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc.server", rpc.path = %req.uri().path(), otel.kind = "server");
    relay_telemetry::set_parent(&span, relay_telemetry::context_from_headers(req.headers()));
    span
}
