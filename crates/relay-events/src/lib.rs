//! relay-events: moving usage events from the edge to billing.
//!
//! Production: NATS JetStream stream `RELAY_USAGE`, subject `relay.usage.v1`, protobuf payload,
//! `Nats-Msg-Id` = request id (the server drops duplicates inside the dedupe window), a durable pull
//! consumer with explicit acks. Embedded: a bounded in-process channel with the same interfaces.
//! Handlers must be idempotent on request id: delivery is at-least-once.

mod inprocess;
mod invalidation;
mod nats;

use std::future::Future;

use relay_core::pb::events::v1::UsageEvent;

pub use inprocess::{InProcessSink, InProcessSource, in_process_bus};
pub use invalidation::{INVALIDATION_SUBJECT, InvalidationBus};
pub use nats::{NatsConfig, NatsSink, NatsSource, connect_jetstream};

pub const STREAM_NAME: &str = "RELAY_USAGE";
pub const USAGE_SUBJECT: &str = "relay.usage.v1";

/// What a consumer does with one event. `Err` = not recorded: the event will be delivered again.
pub trait UsageHandler: Send + Sync + 'static {
    fn handle(&self, event: UsageEvent) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Where a consumer reads events from.
pub enum UsageSource {
    Nats(Box<NatsSource>),
    InProcess(InProcessSource),
}

impl UsageSource {
    /// Consumes until `stop` is cancelled (in-process: then drains what is already queued).
    pub async fn run<H: UsageHandler>(self, handler: H, stop: tokio_util::sync::CancellationToken) {
        match self {
            Self::Nats(s) => s.run(handler, stop).await,
            Self::InProcess(s) => s.run(handler, stop).await,
        }
    }
}

/// Starts a span for handling `event`, parented on the trace of the request that produced it.
pub fn consumer_span(event: &UsageEvent) -> tracing::Span {
    let span = tracing::info_span!("usage.consume", request_id = %event.request_id, otel.kind = "consumer");
    relay_telemetry::set_parent(&span, relay_telemetry::context_from_map(&event.trace_context));
    span
}
