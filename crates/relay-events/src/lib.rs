//! relay-events: moving usage events from the edge to billing.
//!
//! Production: NATS JetStream stream `RELAY_USAGE`, subject `relay.usage.v1`, protobuf payload,
//! `Nats-Msg-Id` = request id (the server drops duplicates inside the dedupe window), a durable pull
//! consumer with explicit acks. Embedded: a bounded in-process channel with the same interfaces.
//! Handlers must be idempotent on request id: delivery is at-least-once. Producers hand events to the
//! [`outbox`] first: a local append-only log that survives bus outages, restarts and crashes.

mod inprocess;
mod invalidation;
mod nats;
pub mod outbox;

use std::future::Future;

use relay_core::pb::events::v1::UsageEvent;

pub use inprocess::{InProcessSink, InProcessSource, in_process_bus};
pub use invalidation::{INVALIDATION_SUBJECT, InvalidationBus};
pub use nats::{NatsConfig, NatsSink, NatsSource, connect_jetstream};

pub const STREAM_NAME: &str = "RELAY_USAGE";
pub const USAGE_SUBJECT: &str = "relay.usage.v1";

/// What became of one event a handler was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Recorded (or already recorded, or kept as a dead letter): acknowledge it.
    Stored,
    /// Not recorded yet (an outage, or a retry before dead-lettering): deliver it again later.
    Retry(String),
}

/// What a consumer does with events, a batch at a time. Handlers must be idempotent on request id.
pub trait UsageHandler: Send + Sync + 'static {
    /// One verdict per event, in order. `attempts[i]` counts deliveries of `events[i]`, this one included.
    fn handle_batch(
        &self,
        events: &[UsageEvent],
        attempts: &[u32],
    ) -> impl Future<Output = Vec<Handled>> + Send;
    /// A payload that is not a usage event at all: keep it where an operator can see it. `true` = kept.
    fn reject(&self, payload: Vec<u8>, reason: String) -> impl Future<Output = bool> + Send;
}

/// Redelivery delay after the `attempt`-th failed delivery: doubling from `base`, at most 30 s.
pub fn retry_delay(base: std::time::Duration, attempt: u32) -> std::time::Duration {
    (base * 2u32.saturating_pow(attempt.saturating_sub(1).min(8))).min(std::time::Duration::from_secs(30))
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
