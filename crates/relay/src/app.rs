//! Assembly: build the services this process runs, wire the rest through gRPC clients, bind listeners
//! (port 0 allowed), serve, and shut down in order: stop accepting, drain streams, flush usage, stop billing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use relay_core::contracts::{Adapter, Authenticator, Billing, Limiter, Router, Services, UsageSink};
use relay_events::UsageSource;
use relay_proto::clients::{GrpcAdapter, GrpcAuth, GrpcRouter, channel};
use relay_runtime::admin::Readiness;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Where this process listens (after binding, so port 0 shows the real port).
#[derive(Debug, Clone, Serialize)]
pub struct Bound {
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub admin: SocketAddr,
}

struct Local {
    auth: Option<Arc<dyn Authenticator>>,
    keys: Option<relay_auth::store::KeyStore>,
    router: Option<Arc<dyn Router>>,
    routing: Option<Arc<relay_routing::RoutingService>>,
    adapter: Option<Arc<dyn Adapter>>,
    billing: Option<relay_billing::BillingService>,
    /// Stored Responses state, served by the billing process.
    state: Option<relay_state::ResponsesStore>,
    db: Option<relay_db::Db>,
}

async fn build_local(cfg: &Config) -> anyhow::Result<Local> {
    // Auth (keys), routing (runtime changes) and billing (usage) share one database and one migration
    // timeline.
    let db = match cfg.runs("auth") || cfg.runs("billing") || cfg.runs("routing") {
        true => {
            let db = relay_db::Db::connect(&cfg.database.url).await.context("connecting to the database")?;
            if cfg.database.migrate_on_start {
                db.migrate().await.context("applying migrations")?;
            }
            Some(db)
        }
        false => None,
    };
    let keys = db.clone().filter(|_| cfg.runs("auth")).map(relay_auth::store::KeyStore::new);
    let auth: Option<Arc<dyn Authenticator>> = match cfg.runs("auth") {
        true => Some(Arc::new(relay_auth::AuthService::new(&cfg.auth, keys.clone())?)),
        false => None,
    };
    let routing = match db.clone().filter(|_| cfg.runs("routing")) {
        Some(db) => Some(Arc::new(
            relay_routing::RoutingService::with_store(&cfg.routing, db)
                .await
                .context("loading routing overrides")?,
        )),
        None => None,
    };
    let router = routing.clone().map(|r| r as Arc<dyn Router>);
    let adapter: Option<Arc<dyn Adapter>> = match cfg.runs("adapter") {
        true => Some(Arc::new(adapter_service(cfg)?)),
        false => None,
    };
    let billing = match db.clone().filter(|_| cfg.runs("billing")) {
        Some(db) => Some(
            relay_billing::BillingService::new(relay_billing::UsageStore::new(db), cfg.billing.clone())
                .await
                .context("loading the price catalog")?,
        ),
        None => None,
    };
    let state = db.clone().filter(|_| cfg.runs("billing") && cfg.state.enabled).map(|db| {
        let secret = cfg.state.encryption_key.as_ref().unwrap_or(&cfg.auth.pepper);
        relay_state::ResponsesStore::new(
            db,
            relay_state::Sealer::from_secret(secret.expose()),
            cfg.state.retention_days,
        )
    });
    Ok(Local { auth, keys, router, routing, adapter, billing, state, db })
}

/// `ledger`: billing, where budget counters are rebuilt from (none: counters start at zero). With the
/// limiter, the response cache's store: Redis when the limits are there, else this process's memory.
async fn limiter(
    cfg: &relay_limits::LimitsConfig,
    ledger: Option<Arc<dyn Billing>>,
    cache_memory: usize,
) -> anyhow::Result<(Arc<dyn Limiter>, Arc<dyn relay_core::contracts::AnswerCache>)> {
    Ok(match &cfg.redis_url {
        Some(url) => {
            let l = relay_limits::RedisLimiter::connect_with_timeout(
                url,
                &cfg.key_prefix,
                cfg.on_redis_error,
                std::time::Duration::from_millis(cfg.redis_timeout_ms),
            )
            .await
            .context("connecting to Redis")?;
            let cache = Arc::new(l.answer_cache());
            let l = match ledger {
                Some(b) => l.with_ledger(b),
                None => l,
            };
            (Arc::new(l), cache)
        }
        None => {
            let l = relay_limits::MemoryLimiter::new();
            let l = match ledger {
                Some(b) => l.with_ledger(b),
                None => l,
            };
            (Arc::new(l), Arc::new(relay_edge::MemoryAnswerCache::new(cache_memory)))
        }
    })
}

/// Admin-API invalidations go out on the bus (edges in this process hear them there too).
struct BusInvalidate(relay_events::InvalidationBus);

impl relay_auth::admin::Invalidate for BusInvalidate {
    fn invalidate(&self, level: relay_auth::store::Level, id: &str) {
        let kind = match level {
            relay_auth::store::Level::Org => "org",
            relay_auth::store::Level::Team => "team",
            relay_auth::store::Level::Key => "key",
        };
        let bus = self.0.clone();
        let target = format!("{kind}:{id}");
        tokio::spawn(async move { bus.publish(target).await });
    }
}

/// The adapter, serving exactly the deployments of the routing config in this file (provider, upstream
/// model and output limit by id, never the caller's). A file without routing models (an adapter
/// configured on its own) serves what it is asked, within its providers.
fn adapter_service(cfg: &Config) -> anyhow::Result<relay_adapter::AdapterService> {
    let service = relay_adapter::AdapterService::new(&cfg.adapter)?;
    if cfg.routing.models.is_empty() {
        if !cfg.runs("routing") {
            tracing::warn!("no routing models in this config: the adapter trusts the deployments it is sent");
        }
        return Ok(service);
    }
    let deployments = cfg.routing.models.iter().flat_map(|m| &m.deployments).map(|d| {
        relay_core::pb::routing::v1::Deployment {
            id: d.id(),
            provider: d.provider.clone(),
            upstream_model: d.model.clone(),
            max_output_tokens: d.max_output_tokens,
            ..Default::default()
        }
    });
    Ok(service.restrict_to(deployments))
}

/// Billing for the edge's limiter: in this process, or at `remote.billing`.
fn ledger(local: &Local, cfg: &Config) -> anyhow::Result<Option<Arc<dyn Billing>>> {
    if let Some(b) = &local.billing {
        return Ok(Some(Arc::new(b.clone())));
    }
    match &cfg.remote.billing {
        Some(addr) => Ok(Some(Arc::new(relay_proto::clients::GrpcBilling::new(channel(
            addr,
            cfg.server.service_token.as_ref(),
        )?)))),
        None => Ok(None),
    }
}

/// The Responses state store for the edge: in this process, or billing's at `remote.billing` (none:
/// the Responses API is stateless and says so when asked for state).
fn response_store(
    local: &Local,
    cfg: &Config,
) -> anyhow::Result<Option<Arc<dyn relay_core::contracts::ResponseStore>>> {
    if !cfg.state.enabled {
        return Ok(None);
    }
    if let Some(s) = &local.state {
        return Ok(Some(Arc::new(s.clone())));
    }
    match &cfg.remote.billing {
        Some(addr) => Ok(Some(Arc::new(relay_proto::clients::GrpcState::new(channel(
            addr,
            cfg.server.service_token.as_ref(),
        )?)))),
        None => Ok(None),
    }
}

fn remote<T: ?Sized>(
    local: Option<Arc<T>>,
    addr: &Option<String>,
    make: impl FnOnce(&str) -> anyhow::Result<Arc<T>>,
) -> anyhow::Result<Arc<T>> {
    match (local, addr) {
        (Some(l), _) => Ok(l),
        (None, Some(a)) => make(a),
        (None, None) => anyhow::bail!("no local service and no remote address"),
    }
}

/// Runs until `shutdown` is cancelled; `on_bound` learns the listening addresses first.
pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(&Bound),
) -> anyhow::Result<()> {
    let local = build_local(&cfg).await?;
    let readiness = Readiness::default();

    // The bus: JetStream when configured, else an in-process channel between edge and billing. Access
    // invalidations ride NATS core pub/sub, or a broadcast channel in process.
    let mut invalidations = relay_events::InvalidationBus::local();
    let (sink, source): (Option<Arc<dyn UsageSink>>, Option<UsageSource>) = match &cfg.bus.nats_url {
        Some(url) => {
            let js = relay_events::connect_jetstream(url, &cfg.bus.jetstream)
                .await
                .context("connecting to NATS")?;
            invalidations = relay_events::InvalidationBus::nats(js.client(), &cfg.bus.invalidation_subject);
            let sink = cfg.runs("edge").then(|| {
                Arc::new(relay_events::NatsSink::new(js.clone(), &cfg.bus.jetstream)) as Arc<dyn UsageSink>
            });
            let source = cfg.runs("billing").then(|| {
                UsageSource::Nats(Box::new(relay_events::NatsSource::new(js, cfg.bus.jetstream.clone())))
            });
            (sink, source)
        }
        None => {
            let (sink, source) = relay_events::in_process_bus(64);
            (Some(Arc::new(sink) as Arc<dyn UsageSink>), Some(UsageSource::InProcess(source)))
        }
    };

    // The edge hands usage events to a durable outbox, which publishes them to the bus until acked.
    let outbox = match (&sink, cfg.runs("edge")) {
        (Some(bus), true) => Some(
            relay_events::outbox::Outbox::open(
                std::path::Path::new(&cfg.bus.outbox_dir),
                bus.clone(),
                cfg.bus.outbox_max_in_flight,
                cfg.bus.outbox_fsync,
            )
            .context("opening the usage outbox")?,
        ),
        _ => None,
    };

    // Listeners first, so a bad address fails before anything runs.
    let http = match cfg.runs("edge") {
        true => Some(bind(&cfg.server.http_listen).await?),
        false => None,
    };
    // gRPC only when this process serves a backend to other processes.
    let serves_backend = ["auth", "routing", "adapter", "billing"].iter().any(|s| cfg.runs(s));
    let grpc = match &cfg.server.grpc_listen {
        Some(a) if serves_backend => Some(bind(a).await?),
        _ => None,
    };
    let admin = bind(&cfg.server.admin_listen).await?;
    let bound = Bound {
        http: http.as_ref().map(TcpListener::local_addr).transpose()?,
        grpc: grpc.as_ref().map(TcpListener::local_addr).transpose()?,
        admin: admin.local_addr()?,
    };

    let mut servers = Vec::new();
    let mut edge_handle = None;
    let mut edge_admin = None;
    if let Some(listener) = http {
        let limiter_and_cache =
            limiter(&cfg.limits, ledger(&local, &cfg)?, cfg.edge.response_cache_memory_bytes).await?;
        let services = Services {
            auth: remote(local.auth.clone(), &cfg.remote.auth, |a| {
                Ok(Arc::new(GrpcAuth::new(channel(a, cfg.server.service_token.as_ref())?)) as _)
            })?,
            router: remote(local.router.clone(), &cfg.remote.routing, |a| {
                Ok(Arc::new(GrpcRouter::new(channel(a, cfg.server.service_token.as_ref())?)) as _)
            })?,
            adapter: remote(local.adapter.clone(), &cfg.remote.adapter, |a| {
                Ok(Arc::new(GrpcAdapter::new(channel(a, cfg.server.service_token.as_ref())?)) as _)
            })?,
            usage: outbox
                .clone()
                .map(|o| Arc::new(o) as Arc<dyn UsageSink>)
                .context("edge without a usage sink")?,
            limiter: limiter_and_cache.0,
            state: response_store(&local, &cfg)?,
            cache: Some(limiter_and_cache.1),
        };
        // Breaker changes ride the invalidation bus, so every edge replica isolates a failing deployment.
        let bus = invalidations.clone();
        let announce: relay_edge::Announce = Arc::new(move |msg| {
            let bus = bus.clone();
            tokio::spawn(async move { bus.publish(msg).await });
        });
        let edge = relay_edge::Edge::with_announce(cfg.edge.clone(), services, Some(announce));
        relay_limits::register_metrics();
        if let Some(api) = relay_edge::admin::router(edge.clone(), cfg.auth.admin_token.clone()) {
            edge_admin = Some(api);
        }
        let mut announcements =
            invalidations.subscribe().await.context("subscribing to key invalidations")?;
        let listener_edge = edge.clone();
        tokio::spawn(async move {
            while let Some(target) = announcements.next().await {
                listener_edge.invalidate(&target);
            }
        });
        tokio::spawn(edge.batch_runner(shutdown.clone()));
        let app = relay_edge::router(edge.clone());
        let (stop, limits) = (shutdown.clone(), cfg.edge.connections());
        let tls = match &cfg.server.tls {
            Some(files) => {
                let tls = relay_runtime::tls::ReloadingTls::load(files).context("server.tls")?;
                tokio::spawn(tls.clone().watch(shutdown.clone()));
                Some(tls)
            }
            None => None,
        };
        servers.push(tokio::spawn(async move {
            relay_runtime::http::serve(listener, app, limits, tls, stop).await;
            Ok(())
        }));
        edge_handle = Some(edge);
    }
    if let Some(listener) = grpc {
        // Every call must carry the service token (unless the operator opted out, e.g. behind a mesh
        // that authenticates peers with mTLS).
        let require = relay_proto::credentials::RequireToken::new(cfg.server.service_token.as_ref());
        let mut builder = tonic::transport::Server::builder()
            .trace_fn(relay_proto::trace::server_span)
            .layer(relay_proto::metered::MetricsLayer)
            .layer(tonic::service::InterceptorLayer::new(require));
        let billing: Option<Arc<dyn Billing>> = local.billing.as_ref().map(|b| Arc::new(b.clone()) as _);
        let routes = builder
            .add_optional_service(local.auth.clone().map(relay_proto::servers::auth))
            .add_optional_service(local.router.clone().map(relay_proto::servers::routing))
            .add_optional_service(local.adapter.clone().map(|a| {
                relay_proto::servers::adapter(a)
                    .max_decoding_message_size(256 << 20)
                    .max_encoding_message_size(256 << 20)
            }))
            .add_optional_service(billing.map(relay_proto::servers::billing))
            .add_optional_service(local.state.clone().map(|s| relay_proto::servers::state(Arc::new(s))));
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move {
            // Small frames (stream chunks, unary answers) go out at once: without TCP_NODELAY, Nagle's
            // algorithm meets the peer's delayed ACK and each answer can stall ~40 ms.
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            routes.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await.context("gRPC server")
        }));
    }
    let admin_stop = CancellationToken::new();
    let mut admin_app = relay_runtime::admin::router(readiness.clone());
    if let Some(keys) = local.keys.clone() {
        let invalidate = Arc::new(BusInvalidate(invalidations.clone()));
        if let Some(api) =
            relay_auth::admin::router(keys, cfg.auth.admin_token.clone(), cfg.auth.pepper.clone(), invalidate)
        {
            admin_app = admin_app.merge(api);
        }
    }
    if let Some(billing) = local.billing.clone()
        && let Some(api) = relay_billing::admin::router(billing, cfg.auth.admin_token.clone())
    {
        admin_app = admin_app.merge(api);
    }
    if let Some(routing) = local.routing.clone()
        && let Some(api) = relay_routing::admin::router(routing, cfg.auth.admin_token.clone())
    {
        admin_app = admin_app.merge(api);
    }
    if let Some(api) = edge_admin {
        admin_app = admin_app.merge(api);
    }
    // Runtime routing changes reach this routing replica within `routing.refresh_ms`.
    let routing_task = local.routing.clone().map(|r| tokio::spawn(r.follow(admin_stop.clone())));
    // Expired Responses state goes hourly.
    let purge_task = local.state.clone().map(|s| tokio::spawn(s.purge_forever(admin_stop.clone())));
    let admin_task = {
        let stop = admin_stop.clone();
        tokio::spawn(async move {
            relay_runtime::http::serve(admin, admin_app, Default::default(), None, stop).await;
        })
    };

    let consumer_stop = CancellationToken::new();
    let consumer = match (source, &local.billing) {
        (Some(source), Some(billing)) => {
            let recorder = billing.recorder();
            let stop = consumer_stop.clone();
            Some(tokio::spawn(async move { source.run(recorder, stop).await }))
        }
        _ => None,
    };

    readiness.set(true);
    tracing::info!(?bound, services = ?cfg.server.services, "relay started");
    on_bound(&bound);

    // Run until asked to stop, or until a server fails (then stop everything).
    let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
    let failed = tokio::select! {
        () = shutdown.cancelled() => None,
        r = wait_first(&mut servers) => Some(r),
    };
    let stopping_requested = shutdown.is_cancelled();
    shutdown.cancel();
    let stop_by = tokio::time::Instant::now();
    readiness.set(false);
    let drained = relay_runtime::shutdown::drain_within(grace, async {
        for s in servers.drain(..) {
            if let Ok(Err(e)) = s.await {
                tracing::error!(error = %e, "server ended with an error");
            }
        }
    })
    .await;
    if !drained {
        tracing::warn!(grace_secs = grace.as_secs(), "grace period over; in-flight requests were cut");
    }
    if let Some(edge) = &edge_handle {
        edge.flush().await;
    }
    drop(edge_handle);
    // Deliver what the outbox holds while the consumer still runs; whatever the bus does not take within
    // the grace stays on disk for the next start.
    if let Some(outbox) = &outbox {
        let left = (stop_by + grace).saturating_duration_since(tokio::time::Instant::now());
        outbox.shutdown(left.max(Duration::from_secs(1))).await;
    }
    consumer_stop.cancel();
    if let Some(c) = consumer {
        let _ = c.await;
    }
    if let Some(db) = &local.db {
        db.close().await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    if let Some(t) = routing_task {
        let _ = t.await;
    }
    if let Some(t) = purge_task {
        let _ = t.await;
    }
    match failed {
        Some(Err(e)) => Err(e),
        // A server that ended by itself before any shutdown request is a failure too.
        Some(Ok(())) if !stopping_requested => Err(anyhow::anyhow!("a server stopped unexpectedly")),
        _ => Ok(()),
    }
}

/// Waits for the first server task to end; it is removed from `servers` (the rest stay to be drained).
async fn wait_first(servers: &mut Vec<tokio::task::JoinHandle<anyhow::Result<()>>>) -> anyhow::Result<()> {
    if servers.is_empty() {
        return std::future::pending().await;
    }
    let (res, _, rest) = futures_util::future::select_all(servers.drain(..)).await;
    *servers = rest;
    match res {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("a server task panicked: {e}")),
    }
}

async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))
}
