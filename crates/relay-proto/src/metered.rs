//! RED metrics for every gRPC server: calls by method and status code, and time to response headers
//! (`relay_grpc_server_*`). A tower layer, so every service of a process is measured the same way.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// Adds [`Metered`] around a gRPC server's routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsLayer;

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered(inner)
    }
}

#[derive(Debug, Clone)]
pub struct Metered<S>(S);

impl<S, B, RB> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let began = Instant::now();
        let answer = self.0.call(req);
        Box::pin(async move {
            let r = answer.await;
            // Errors are trailers-only responses (status in the headers); a stream that fails later
            // reports its status in trailers and counts as started here.
            let code = match &r {
                Ok(resp) => {
                    resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_owned()
                }
                Err(_) => "transport".to_owned(),
            };
            // Paths are the callers' words: only ones the server knows (not UNIMPLEMENTED) are labels.
            let method = if code == "12" { "unknown".to_owned() } else { method };
            metrics::counter!("relay_grpc_server_requests_total", "method" => method.clone(), "code" => code)
                .increment(1);
            metrics::histogram!("relay_grpc_server_duration_seconds", "method" => method)
                .record(began.elapsed().as_secs_f64());
            r
        })
    }
}
