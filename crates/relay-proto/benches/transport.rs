//! The internal gRPC client transport against tonic's `Channel`, same server, same process: unary calls
//! per second and process CPU per call, one at a time and 32 at once (`cargo bench -p relay-proto`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_core::contracts::{Adapter, ChatEventStream, Result};
use relay_core::pb::adapter::v1 as pb;
use relay_proto::generated::adapter::adapter_service_client::AdapterServiceClient;

struct Echo;

#[async_trait::async_trait]
impl Adapter for Echo {
    async fn chat(&self, _: pb::ChatRequest) -> Result<ChatEventStream> {
        Ok(Box::pin(futures_util::stream::empty()))
    }
    async fn embed(&self, req: pb::EmbedRequest) -> Result<pb::EmbedResponse> {
        Ok(pb::EmbedResponse { body: req.body, usage: None })
    }
    async fn count_tokens(&self, _: pb::CountTokensRequest) -> Result<pb::CountTokensResponse> {
        Ok(pb::CountTokensResponse::default())
    }
}

/// Process CPU time (user + system) so far.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command; clock ticks of 10 ms.
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((tick(11) + tick(12)) * 10)
}

async fn run<T>(name: &str, client: AdapterServiceClient<T>, concurrency: usize)
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    T::Future: Send,
{
    let call = |mut c: AdapterServiceClient<T>| async move {
        let req = pb::EmbedRequest { body: vec![b'x'; 1024].into(), ..Default::default() };
        c.embed(req).await.expect("call");
    };
    for _ in 0..200 {
        call(client.clone()).await;
    }
    let (t0, c0) = (Instant::now(), cpu());
    let mut calls = 0u64;
    while t0.elapsed() < Duration::from_secs(3) {
        let wave = (0..concurrency).map(|_| call(client.clone()));
        futures_util::future::join_all(wave).await;
        calls += concurrency as u64;
    }
    let (wall, used) = (t0.elapsed(), cpu() - c0);
    println!(
        "{name:<14} c={concurrency:<3} {:>8.0} calls/s  {:>6.1} µs CPU/call",
        calls as f64 / wall.as_secs_f64(),
        used.as_secs_f64() * 1e6 / calls as f64
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let svc = relay_proto::servers::adapter(Arc::new(Echo));
        tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming));
        for concurrency in [1, 32] {
            for _round in 0..2 {
                let ours = relay_proto::channel::GrpcChannel::new(&url).expect("channel");
                run("relay h2", AdapterServiceClient::new(ours), concurrency).await;
                let tonic = tonic::transport::Endpoint::from_shared(url.clone())
                    .expect("endpoint")
                    .tcp_nodelay(true)
                    .connect_lazy();
                run("tonic Channel", AdapterServiceClient::new(tonic), concurrency).await;
            }
        }
    });
}
