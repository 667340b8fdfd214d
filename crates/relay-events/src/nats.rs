//! NATS JetStream transport for usage events.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, message::PublishMessage, stream};
use futures_util::StreamExt;
use prost::Message as _;
use relay_core::contracts::{Result, UsageSink};
use relay_core::pb::events::v1::UsageEvent;
use relay_core::{ErrorCode, RelayError};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{STREAM_NAME, USAGE_SUBJECT, UsageHandler, consumer_span};

/// `[bus]` settings for NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// JetStream stream holding usage events.
    pub stream: String,
    /// Subject usage events are published on.
    pub subject: String,
    /// Durable consumer name billing binds to (one per billing deployment; replicas share it).
    pub consumer: String,
    /// Publishes with the same request id inside this window are dropped by the server.
    pub dedupe_window_secs: u64,
    /// How long events stay in the stream after they are acked (for replay).
    pub max_age_hours: u64,
    /// Redelivery delay after a handler failure.
    pub retry_delay_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            stream: STREAM_NAME.into(),
            subject: USAGE_SUBJECT.into(),
            consumer: "billing".into(),
            dedupe_window_secs: 600,
            max_age_hours: 72,
            retry_delay_ms: 1000,
        }
    }
}

/// Connects and makes sure the stream exists with our settings.
pub async fn connect_jetstream(url: &str, cfg: &NatsConfig) -> anyhow::Result<jetstream::Context> {
    let client =
        async_nats::ConnectOptions::new().name("relay").retry_on_initial_connect().connect(url).await?;
    let js = jetstream::new(client);
    js.get_or_create_stream(stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![cfg.subject.clone()],
        duplicate_window: Duration::from_secs(cfg.dedupe_window_secs),
        max_age: Duration::from_secs(cfg.max_age_hours * 3600),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    Ok(js)
}

// === impl NatsSink ===

#[derive(Clone)]
pub struct NatsSink {
    js: jetstream::Context,
    subject: String,
}

impl NatsSink {
    pub fn new(js: jetstream::Context, cfg: &NatsConfig) -> Self {
        Self { js, subject: cfg.subject.clone() }
    }
}

#[async_trait::async_trait]
impl UsageSink for NatsSink {
    async fn publish(&self, event: UsageEvent) -> Result<()> {
        let unavailable = |what: &str| RelayError::new(ErrorCode::Unavailable, format!("usage bus: {what}"));
        let msg = PublishMessage::build().payload(event.encode_to_vec().into()).message_id(&event.request_id);
        let ack = self
            .js
            .send_publish(self.subject.clone(), msg)
            .await
            .map_err(|_| unavailable("publish failed"))?;
        ack.await.map_err(|_| unavailable("no acknowledgement"))?;
        Ok(())
    }
}

// === impl NatsSource ===

pub struct NatsSource {
    js: jetstream::Context,
    cfg: NatsConfig,
}

impl NatsSource {
    pub fn new(js: jetstream::Context, cfg: NatsConfig) -> Self {
        Self { js, cfg }
    }

    pub(crate) async fn run<H: UsageHandler>(self, handler: H, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        while !stop.is_cancelled() {
            match self.consume(&handler, &stop).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "usage consumer interrupted; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {},
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn consume<H: UsageHandler>(&self, handler: &H, stop: &CancellationToken) -> anyhow::Result<()> {
        let stream = self.js.get_stream(&self.cfg.stream).await?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                &self.cfg.consumer,
                pull::Config {
                    durable_name: Some(self.cfg.consumer.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    filter_subject: self.cfg.subject.clone(),
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let msg = tokio::select! {
                m = messages.next() => match m {
                    Some(m) => m?,
                    None => return Err(anyhow::anyhow!("message stream ended")),
                },
                () = stop.cancelled() => return Ok(()),
            };
            let event = match UsageEvent::decode(msg.payload.clone()) {
                Ok(ev) => ev,
                Err(e) => {
                    // Poison message: never decodable, so never redeliver it.
                    tracing::error!(error = %e, "undecodable usage event terminated");
                    metrics::counter!("relay_usage_events_poison_total").increment(1);
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            let span = consumer_span(&event);
            match handler.handle(event).instrument(span.clone()).await {
                Ok(()) => {
                    if let Err(e) = msg.ack().await {
                        // Not acked: it will be redelivered and the idempotent handler ignores it.
                        tracing::warn!(parent: &span, error = %e, "ack failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(parent: &span, error = %e, "usage event not recorded; will be redelivered");
                    let delay = Duration::from_millis(self.cfg.retry_delay_ms);
                    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                }
            }
        }
    }
}
