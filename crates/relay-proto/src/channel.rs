//! The client transport of every internal gRPC call: HTTP/2 straight over `h2`, one connection per
//! server address, calls spread over the addresses by the less loaded of two.
//!
//! Why not tonic's `Channel`: it queues every call through a `tower::Buffer` worker task, then hyper's
//! client task, then h2's connection task, so one unary call crossed three tasks (and threads) before its
//! bytes left, and its HEADERS and DATA frames often went out in separate writes. Here the caller's task
//! queues HEADERS and DATA(END_STREAM) itself and wakes the one connection task, which writes them together.
//!
//! A connection is dialled on first use (`TCP_NODELAY`, 3 s timeout), replaced when it closes or is refused,
//! and pinged every 30 s (closed when the pong does not come within 20 s), so a peer that vanished without
//! a FIN is noticed even while idle.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use relay_core::RelayError;
use tonic::Status;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const PING_EVERY: Duration = Duration::from_secs(30);
const PONG_WITHIN: Duration = Duration::from_secs(20);
/// How often service names are resolved again (pods come and go behind a headless Service).
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// Flow-control windows: large enough that a chat stream or a 256 MiB message is never paced by
/// round trips inside the cluster.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;

/// A cheap-to-clone handle on the connections to one service.
#[derive(Clone)]
pub struct GrpcChannel {
    shared: Arc<Shared>,
}

struct Shared {
    backends: RwLock<Arc<[Arc<Backend>]>>,
    picks: AtomicUsize,
}

/// One server address and its connection.
struct Backend {
    /// `host:port` to dial (an IP address, or a name resolved at every dial).
    target: String,
    authority: http::uri::Authority,
    in_flight: AtomicUsize,
    conn: Mutex<Option<Conn>>,
    dialing: tokio::sync::Mutex<()>,
    /// Dials finished (either way): a caller that waited behind a failed dial fails with it instead of
    /// dialling again, so a dead address costs one timeout, not one per waiting call.
    dials: AtomicU64,
    generation: AtomicU64,
}

#[derive(Clone)]
struct Conn {
    generation: u64,
    send: h2::client::SendRequest<Bytes>,
}

impl GrpcChannel {
    /// A channel to `url`: one address (`http://host:port`) or several separated by commas. Names that
    /// resolve are followed: the channel keeps one backend per address they resolve to (a headless
    /// Service gives one per pod), re-resolving every few seconds. A single IP address, a name that does
    /// not resolve yet, or no Tokio runtime at hand: one backend dialled by name on first use.
    pub fn new(url: &str) -> relay_core::contracts::Result<Self> {
        let urls: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let [first, ..] = urls.as_slice() else {
            return Err(RelayError::internal("empty gRPC address"));
        };
        let names: Vec<String> =
            urls.iter().map(|u| authority(u)).collect::<relay_core::contracts::Result<_>>()?;
        let single_ip = names.len() == 1 && names[0].parse::<SocketAddr>().is_ok();
        let runtime = tokio::runtime::Handle::try_current();
        let lazy = |why: &str| {
            if !why.is_empty() {
                tracing::warn!(address = %first, "{why}");
            }
            Ok(Self::with_targets(std::iter::once(names[0].clone())))
        };
        if single_ip || runtime.is_err() {
            return lazy("");
        }
        // Resolved once here (start-up), so the first calls have somewhere to go.
        let known: BTreeSet<SocketAddr> = names
            .iter()
            .filter_map(|n| std::net::ToSocketAddrs::to_socket_addrs(n.as_str()).ok())
            .flatten()
            .collect();
        if known.is_empty() && urls.len() == 1 {
            return lazy("gRPC address does not resolve yet; connecting lazily");
        }
        let channel = Self::with_targets(known.iter().map(SocketAddr::to_string));
        if let Ok(rt) = runtime {
            rt.spawn(follow(Arc::downgrade(&channel.shared), names, known));
        }
        Ok(channel)
    }

    fn with_targets(targets: impl Iterator<Item = String>) -> Self {
        let backends: Vec<Arc<Backend>> = targets.filter_map(|t| Backend::new(t).map(Arc::new)).collect();
        Self {
            shared: Arc::new(Shared { backends: RwLock::new(backends.into()), picks: AtomicUsize::new(0) }),
        }
    }

    /// The backend for the next call: the one with fewer calls in flight of two candidates.
    fn pick(&self) -> Option<Arc<Backend>> {
        let list = self.shared.backends.read().unwrap_or_else(|p| p.into_inner()).clone();
        match list.len() {
            0 => None,
            1 => Some(list[0].clone()),
            n => {
                let turn = self.shared.picks.fetch_add(1, Ordering::Relaxed);
                let a = turn % n;
                let spread = ((turn as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) as usize;
                let b = (a + 1 + spread % (n - 1)) % n;
                let load = |i: usize| list[i].in_flight.load(Ordering::Relaxed);
                Some(list[if load(b) < load(a) { b } else { a }].clone())
            }
        }
    }

    /// Makes the backends exactly `now`, keeping the connections of addresses that stay.
    fn set_targets(&self, now: &BTreeSet<SocketAddr>) {
        let mut slot = self.shared.backends.write().unwrap_or_else(|p| p.into_inner());
        let kept: Vec<Arc<Backend>> = now
            .iter()
            .filter_map(|addr| {
                let target = addr.to_string();
                slot.iter()
                    .find(|b| b.target == target)
                    .cloned()
                    .or_else(|| Backend::new(target).map(Arc::new))
            })
            .collect();
        *slot = kept.into();
    }
}

/// `host:port` of an `http://host:port` address.
fn authority(url: &str) -> relay_core::contracts::Result<String> {
    let uri: http::Uri =
        url.parse().map_err(|_| RelayError::internal(format!("invalid gRPC address `{url}`")))?;
    if uri.scheme_str().is_some_and(|s| s != "http") {
        return Err(RelayError::internal(format!(
            "gRPC address `{url}`: internal calls are plaintext HTTP/2 (`http://host:port`)"
        )));
    }
    let host = uri.host().ok_or_else(|| RelayError::internal(format!("no host in `{url}`")))?;
    let port = uri.port_u16().unwrap_or(80);
    Ok(match host.trim_start_matches('[').trim_end_matches(']') {
        h if h.contains(':') => format!("[{h}]:{port}"),
        h => format!("{h}:{port}"),
    })
}

/// Keeps a channel's backends equal to what `names` resolve to, until the channel is dropped.
/// An empty or failed resolution changes nothing (a DNS hiccup must not empty the channel).
async fn follow(shared: Weak<Shared>, names: Vec<String>, mut known: BTreeSet<SocketAddr>) {
    loop {
        tokio::time::sleep(RESOLVE_EVERY).await;
        let mut now = BTreeSet::new();
        for n in &names {
            if let Ok(addrs) = tokio::net::lookup_host(n.as_str()).await {
                now.extend(addrs);
            }
        }
        let Some(shared) = shared.upgrade() else { return };
        if now.is_empty() || now == known {
            continue;
        }
        GrpcChannel { shared }.set_targets(&now);
        tracing::info!(addresses = now.len(), "gRPC endpoints changed");
        known = now;
    }
}

impl Backend {
    fn new(target: String) -> Option<Self> {
        let authority = target.parse().ok()?;
        Some(Self {
            target,
            authority,
            in_flight: AtomicUsize::new(0),
            conn: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
            dials: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        })
    }

    fn current(&self) -> Option<Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops connection `generation` (closed, refused or unhealthy) so the next call dials again.
    fn forget(&self, generation: u64) {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|c| c.generation == generation) {
            *slot = None;
        }
    }

    /// A sender ready for one more stream: the open connection, or a new one when there is none or the
    /// open one refuses new streams (GOAWAY, closed). A refused stream was never sent, so trying a new
    /// connection once is safe for any call.
    async fn ready(self: &Arc<Self>) -> Result<h2::client::SendRequest<Bytes>, Status> {
        let mut last = None;
        for _ in 0..2 {
            let conn = match self.current() {
                Some(c) => c,
                None => self.dial().await?,
            };
            match conn.send.clone().ready().await {
                Ok(send) => return Ok(send),
                Err(e) => {
                    self.forget(conn.generation);
                    last = Some(e);
                }
            }
        }
        Err(transport_status(last.as_ref()))
    }

    /// Dials once for all callers waiting on this backend.
    async fn dial(self: &Arc<Self>) -> Result<Conn, Status> {
        let seen = self.dials.load(Ordering::Acquire);
        let _one_dialer = self.dialing.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        if self.dials.load(Ordering::Acquire) != seen {
            return Err(Status::unavailable("service unreachable"));
        }
        let dialled = self.connect().await;
        self.dials.fetch_add(1, Ordering::Release);
        dialled
    }

    async fn connect(self: &Arc<Self>) -> Result<Conn, Status> {
        let tcp =
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.target)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    tracing::warn!(target = %self.target, error = %e, "gRPC connect failed");
                    return Err(Status::unavailable("service unreachable"));
                }
                Err(_) => {
                    tracing::warn!(target = %self.target, "gRPC connect timed out");
                    return Err(Status::unavailable("service unreachable"));
                }
            };
        let _ = tcp.set_nodelay(true);
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(16 << 20)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| {
                tracing::warn!(target = %self.target, error = %e, "gRPC handshake failed");
                Status::unavailable("service unreachable")
            })?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let pings = connection.ping_pong();
        let backend = Arc::downgrade(self);
        tokio::spawn(async move {
            drive(connection, pings, &backend).await;
            if let Some(b) = backend.upgrade() {
                b.forget(generation);
            }
        });
        let conn = Conn { generation, send };
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }
}

/// Runs a connection until it closes, fails a keep-alive ping, or its backend is gone.
async fn drive(
    connection: h2::client::Connection<tokio::net::TcpStream, Bytes>,
    mut pings: Option<h2::PingPong>,
    backend: &Weak<Backend>,
) {
    tokio::pin!(connection);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            biased;
            _ = &mut connection => return,
            _ = tick.tick() => {
                if backend.strong_count() == 0 {
                    return;
                }
                let Some(p) = pings.as_mut() else { continue };
                let pong = tokio::time::timeout(PONG_WITHIN, p.ping(h2::Ping::opaque()));
                tokio::select! {
                    biased;
                    _ = &mut connection => return,
                    answered = pong => if !matches!(answered, Ok(Ok(_))) {
                        tracing::warn!("gRPC connection missed its keep-alive pong; closing it");
                        return;
                    },
                }
            }
        }
    }
}

fn transport_status(e: Option<&h2::Error>) -> Status {
    match e {
        Some(e) if e.is_go_away() || e.is_io() || e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
            Status::unavailable("service connection closed")
        }
        Some(e) if e.reason() == Some(h2::Reason::CANCEL) => Status::cancelled("call cancelled"),
        _ => Status::unavailable("service connection failed"),
    }
}

/// Counts a call against its backend from start until its response body is dropped.
struct InFlight(Arc<Backend>);

impl InFlight {
    fn new(b: Arc<Backend>) -> Self {
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(b)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, Status>> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for GrpcChannel {
    type Response = http::Response<ResponseBody>;
    type Error = Status;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Readiness is per connection and awaited inside the call, where the connection is chosen.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> CallFuture {
        let backend = self.pick();
        Box::pin(async move {
            let backend = backend.ok_or_else(|| Status::unavailable("no service address"))?;
            let in_flight = InFlight::new(backend.clone());
            let (mut head, body) = req.into_parts();
            // Every Relay RPC sends one request message, so the body is complete at once.
            let message = body.collect().await?.to_bytes();
            let path = head.uri.path_and_query().cloned();
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = Some(backend.authority.clone());
            uri.path_and_query = path;
            head.uri = http::Uri::from_parts(uri).map_err(|_| Status::internal("invalid gRPC path"))?;
            let mut send = backend.ready().await?;
            let (response, mut body_tx) = send
                .send_request(http::Request::from_parts(head, ()), message.is_empty())
                .map_err(|e| transport_status(Some(&e)))?;
            if !message.is_empty() {
                body_tx.send_data(message, true).map_err(|e| transport_status(Some(&e)))?;
            }
            let response = response.await.map_err(|e| transport_status(Some(&e)))?;
            Ok(response.map(|recv| ResponseBody { recv, read: Read::Data, _in_flight: in_flight }))
        })
    }
}

/// A response body read straight from its h2 stream, giving the flow-control window back as data is
/// taken, then yielding the trailers (where gRPC puts its status).
pub struct ResponseBody {
    recv: h2::RecvStream,
    read: Read,
    _in_flight: InFlight,
}

#[derive(PartialEq)]
enum Read {
    Data,
    Trailers,
    Done,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.read == Read::Data {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.read = Read::Done;
                    return Poll::Ready(Some(Err(transport_status(Some(&e)))));
                }
                Poll::Ready(None) => this.read = Read::Trailers,
            }
        }
        if this.read == Read::Done {
            return Poll::Ready(None);
        }
        let trailers = std::task::ready!(this.recv.poll_trailers(cx));
        this.read = Read::Done;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(transport_status(Some(&e))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read == Read::Done || self.recv.is_end_stream()
    }
}
