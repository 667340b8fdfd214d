//! A fake OpenTelemetry collector (OTLP/gRPC) that keeps every span it receives, for trace assertions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub attrs: HashMap<String, String>,
}

#[derive(Clone, Default)]
pub struct Collector {
    spans: Arc<Mutex<Vec<SpanRecord>>>,
    pub endpoint: String,
}

struct Svc(Arc<Mutex<Vec<SpanRecord>>>);

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Svc {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attrs = s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect();
                    let trace_id = s.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    out.push(SpanRecord { service: service.clone(), name: s.name.clone(), trace_id, attrs });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    pub async fn start() -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(Svc(spans.clone()));
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await;
        });
        Self { spans, endpoint: format!("http://{addr}") }
    }

    pub fn spans(&self) -> Vec<SpanRecord> {
        self.spans.lock().unwrap().clone()
    }

    /// The trace id of the edge's root span for `request_id`, once exported.
    pub fn trace_of(&self, request_id: &str) -> Option<String> {
        self.spans()
            .into_iter()
            .find(|s| {
                s.name == "http.request" && s.attrs.get("request_id").map(String::as_str) == Some(request_id)
            })
            .map(|s| s.trace_id)
    }

    /// Services that exported at least one span in `trace_id`.
    pub fn services_in(&self, trace_id: &str) -> std::collections::BTreeSet<String> {
        self.spans().into_iter().filter(|s| s.trace_id == trace_id).map(|s| s.service).collect()
    }
}
