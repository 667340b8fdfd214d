//! The internal gRPC client transport against real tonic servers on loopback ports: messages and streams
//! far larger than the flow-control windows, many calls at once on one connection, calls spread over
//! several addresses, a server that restarts, and one that is not there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use relay_core::contracts::{Adapter, ChatEventStream, Result};
use relay_core::pb::adapter::v1::{self as pb, chat_event::Event};
use relay_core::{ErrorCode, RelayError};
use relay_proto::clients::{GrpcAdapter, channel};
use tokio_util::sync::CancellationToken;

/// Answers `embed` with `name:length of the body`, and `chat` with `count` chunks of `size` bytes, where the
/// body is `count,size`.
struct Echo {
    name: &'static str,
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl Adapter for Echo {
    async fn chat(&self, req: pb::ChatRequest) -> Result<ChatEventStream> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let spec = String::from_utf8_lossy(&req.body).to_string();
        let (count, size) = spec.split_once(',').expect("count,size");
        let (count, size): (usize, usize) = (count.parse().unwrap(), size.parse().unwrap());
        let chunk = move |i: usize| pb::ChatEvent {
            event: Some(Event::Chunk(pb::Chunk {
                data: vec![b'a' + (i % 26) as u8; size].into(),
                output_tokens: 1,
            })),
        };
        Ok(Box::pin(futures_util::stream::iter((0..count).map(chunk))))
    }
    async fn embed(&self, req: pb::EmbedRequest) -> Result<pb::EmbedResponse> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if req.body.as_ref() == b"fail" {
            return Err(
                RelayError::new(ErrorCode::UpstreamRateLimited, "slow down").with_retry_after(Some(3))
            );
        }
        Ok(pb::EmbedResponse { body: format!("{}:{}", self.name, req.body.len()).into(), usage: None })
    }
    async fn count_tokens(&self, _: pb::CountTokensRequest) -> Result<pb::CountTokensResponse> {
        Err(RelayError::internal("not used"))
    }
}

struct Server {
    addr: SocketAddr,
    echo: Arc<Echo>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn serve_on(addr: SocketAddr, name: &'static str) -> Server {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let echo = Arc::new(Echo { name, calls: AtomicUsize::new(0) });
    let svc = relay_proto::servers::adapter(echo.clone())
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let stop = CancellationToken::new();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let until = stop.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, until)
            .await
            .expect("serve");
    });
    Server { addr, echo, stop, task }
}

async fn serve(name: &'static str) -> Server {
    serve_on("127.0.0.1:0".parse().unwrap(), name).await
}

impl Server {
    async fn shut(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn client(url: &str) -> GrpcAdapter {
    GrpcAdapter::new(channel(url, None).expect("channel"))
}

fn embed(body: Vec<u8>) -> pb::EmbedRequest {
    pb::EmbedRequest { body: body.into(), ..Default::default() }
}

#[tokio::test]
async fn messages_and_streams_larger_than_every_window_arrive_whole() {
    let s = serve("one").await;
    let c = client(&format!("http://{}", s.addr));
    // 12 MiB each way: past the 2 MiB stream and 5 MiB connection windows many times over.
    let r = c.embed(embed(vec![7; 12 << 20])).await.expect("big request");
    assert_eq!(r.body, format!("one:{}", 12 << 20));
    let mut events = c
        .chat(pb::ChatRequest { body: bytes::Bytes::from_static(b"3000,4096"), ..Default::default() })
        .await
        .expect("chat");
    let (mut n, mut bytes) = (0usize, 0usize);
    while let Some(ev) = events.next().await {
        let Some(Event::Chunk(ch)) = ev.event else { panic!("unexpected event {ev:?}") };
        assert!(ch.data.iter().all(|b| *b == b'a' + (n % 26) as u8), "chunk {n} arrived intact");
        (n, bytes) = (n + 1, bytes + ch.data.len());
    }
    assert_eq!((n, bytes), (3000, 3000 * 4096));
    // A typed error crosses whole.
    let e = c.embed(embed(b"fail".to_vec())).await.expect_err("typed error");
    assert_eq!((e.code, e.retry_after_secs), (ErrorCode::UpstreamRateLimited, Some(3)));
    s.shut().await;
}

#[tokio::test]
async fn many_calls_at_once_share_one_connection() {
    let s = serve("one").await;
    let c = client(&format!("http://{}", s.addr));
    let calls = (0..1500).map(|i| {
        let c = c.clone();
        async move { c.embed(embed(vec![1; i])).await.map(|r| (i, r.body)) }
    });
    for r in futures_util::future::join_all(calls).await {
        let (i, body) = r.expect("every call answered");
        assert_eq!(body, format!("one:{i}"));
    }
    assert_eq!(s.echo.calls.load(Ordering::Relaxed), 1500);
    s.shut().await;
}

#[tokio::test]
async fn calls_are_spread_over_every_address() {
    let (a, b) = (serve("a").await, serve("b").await);
    let c = client(&format!("http://{}, http://{}", a.addr, b.addr));
    for _ in 0..100 {
        c.embed(embed(vec![1])).await.expect("answered");
    }
    let (na, nb) = (a.echo.calls.load(Ordering::Relaxed), b.echo.calls.load(Ordering::Relaxed));
    assert_eq!(na + nb, 100);
    assert!(na >= 25 && nb >= 25, "both addresses serve: {na} / {nb}");
    a.shut().await;
    // With one address gone, calls go to the other (at most the calls already on their way fail).
    let mut ok = 0;
    for _ in 0..50 {
        if c.embed(embed(vec![1])).await.is_ok() {
            ok += 1;
        }
    }
    assert!(ok >= 25, "the remaining address serves: {ok} of 50");
    b.shut().await;
}

#[tokio::test]
async fn a_restarted_server_is_dialled_again() {
    let s = serve("before").await;
    let addr = s.addr;
    let c = client(&format!("http://{addr}"));
    assert_eq!(c.embed(embed(vec![1])).await.expect("first").body.as_ref(), b"before:1");
    s.shut().await;
    let e = c.embed(embed(vec![1])).await.expect_err("nothing listens");
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    let s = serve_on(addr, "after").await;
    let mut answer = None;
    for _ in 0..50 {
        match c.embed(embed(vec![1])).await {
            Ok(r) => {
                answer = Some(r.body);
                break;
            }
            Err(e) => assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answer.as_deref(), Some(&b"after:1"[..]));
    s.shut().await;
}

#[tokio::test]
async fn an_address_nobody_listens_on_is_unavailable_without_detail() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let c = client(&format!("http://127.0.0.1:{port}"));
    let calls = (0..20).map(|_| c.embed(embed(vec![1])));
    for r in futures_util::future::join_all(calls).await {
        let e = r.expect_err("nothing listens");
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(e.message, "adapter service unavailable");
    }
}

#[test]
fn addresses_that_cannot_work_are_refused_at_start() {
    for bad in ["", " , ", "https://adapter:50051", "http://", "not a url"] {
        assert!(channel(bad, None).is_err(), "`{bad}` accepted");
    }
}
