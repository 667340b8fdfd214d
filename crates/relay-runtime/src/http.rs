//! The HTTP server loop every Relay listener uses (edge API, admin): `axum::serve` without its blind
//! spots. A client that sends its headers one line at a time is cut off after `header_read_timeout`; the
//! number of open connections is bounded (accepting pauses at the bound instead of exhausting file
//! descriptors); accepted sockets send small writes at once (`TCP_NODELAY`); the peer address reaches
//! handlers as `ConnectInfo<SocketAddr>`; shutdown stops accepting, lets each connection finish the request
//! it is on, and returns when every connection has closed. With a [`ReloadingTls`] the listener speaks
//! HTTPS (the handshake counts against the header timeout), offering HTTP/2 and HTTP/1.1 by ALPN.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// Connection-level bounds of one listener (the edge's come from `[edge]`, which validates them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Longest a client may take to send a request's headers (HTTP/1; also an idle keep-alive
    /// connection's wait for its next request). Past it the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Most connections open at once; at the bound, new ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// HTTP/2 keep-alive ping interval (a dead peer's streams are reset after one more interval).
    pub http2_keepalive_secs: u64,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self { header_read_timeout_ms: 10_000, max_connections: 10_000, http2_keepalive_secs: 30 }
    }
}

use crate::tls::ReloadingTls;

/// Serves `app` on `listener` (over TLS when `tls` is set) until `stop` is cancelled, then waits for open
/// connections to finish.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnLimits,
    tls: Option<Arc<ReloadingTls>>,
    stop: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms.max(1)));
    let keepalive = Duration::from_secs(limits.http2_keepalive_secs.max(1));
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(keepalive).keep_alive_timeout(keepalive);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: wait a little, keep serving.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let service = app.clone().map_request(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            req.map(axum::body::Body::new)
        });
        let service = TowerToHyperService::new(service);
        let (builder, stop) = (builder.clone(), stop.clone());
        let first_byte = Duration::from_millis(limits.header_read_timeout_ms.max(1));
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        connections.spawn(async move {
            let _slot = slot;
            // hyper's header timeout starts only once the protocol is detected, i.e. after the first
            // bytes: a connection that never sends one is closed here.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte, tcp.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            match acceptor {
                None => drive(&builder, tcp, service, &stop).await,
                Some(acceptor) => match tokio::time::timeout(first_byte, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => drive(&builder, tls, service, &stop).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                },
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Runs one connection to its end; at shutdown, lets it finish the request it is on.
async fn drive<I, S>(builder: &Builder<TokioExecutor>, io: I, service: S, stop: &CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = axum::response::Response>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => log_end(r),
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            log_end(conn.await);
        }
    }
}

fn log_end(r: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: ConnLimits) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(
                |ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() },
            ),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, app, limits, None, stop.clone()));
        (addr, stop, task)
    }

    #[tokio::test]
    async fn slow_headers_are_cut_off_and_normal_requests_see_their_peer() {
        let limits = ConnLimits { header_read_timeout_ms: 300, ..Default::default() };
        let (addr, stop, task) = start(limits).await;
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        ok.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("127.0.0.1"), "{answer}");

        // One header line every 100 ms: never finishes, so the server must hang up on its own.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        let began = std::time::Instant::now();
        slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        let closed = loop {
            tokio::select! {
                n = slow.read(&mut buf) => break n.map_or(true, |n| n == 0 || buf[..n].starts_with(b"HTTP/1.1 408")),
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if slow.write_all(b"x-slow: 1\r\n").await.is_err() { break true; }
                }
            }
            assert!(began.elapsed() < Duration::from_secs(5), "the slow client was never cut off");
        };
        assert!(closed);
        assert!(began.elapsed() >= Duration::from_millis(250), "cut at the timeout, not before");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_wait_for_a_free_slot() {
        let limits = ConnLimits { max_connections: 1, header_read_timeout_ms: 400, ..Default::default() };
        let (addr, stop, task) = start(limits).await;
        let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let began = std::time::Instant::now();
        second.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        second.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(began.elapsed() >= Duration::from_millis(250), "served only once the idle one was cut");
        stop.cancel();
        task.await.unwrap();
    }
}
