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

use crate::{Handled, STREAM_NAME, USAGE_SUBJECT, UsageHandler, consumer_span, retry_delay};

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
    /// First redelivery delay after a handler failure (doubling per attempt, at most 30 s).
    pub retry_delay_ms: u64,
    /// Events the consumer takes (and billing records in one transaction) at a time.
    pub batch_size: usize,
    /// How long a delivered event may stay unacknowledged (a consumer that died) before redelivery.
    pub ack_wait_secs: u64,
    /// How long the consumer gathers events after the first of a batch before recording it (unless the
    /// batch fills first): a few milliseconds of billing lag buy transactions of many events instead of
    /// one or two, which is most of billing's and Postgres' work per event at moderate load.
    pub gather_ms: u64,
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
            batch_size: 1024,
            ack_wait_secs: 30,
            gather_ms: 5,
        }
    }
}

/// Connects (in the background when the server is not up yet) and makes sure the stream exists. A process
/// may start during a NATS outage: until the stream can be created, a background task keeps trying, the
/// edge's outbox holds events, and the consumer retries.
pub async fn connect_jetstream(url: &str, cfg: &NatsConfig) -> anyhow::Result<jetstream::Context> {
    let client =
        async_nats::ConnectOptions::new().name("relay").retry_on_initial_connect().connect(url).await?;
    let js = jetstream::new(client);
    // At most briefly on the start-up path: a process must come up (and its outbox take events) during
    // an outage; then the stream is made in the background.
    if matches!(tokio::time::timeout(Duration::from_secs(2), ensure_stream(&js, cfg)).await, Ok(Ok(_))) {
        return Ok(js);
    }
    let (bg, cfg) = (js.clone(), cfg.clone());
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        while let Err(e) = ensure_stream(&bg, &cfg).await {
            tracing::warn!(error = %e, "usage stream not reachable yet; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    });
    Ok(js)
}

async fn ensure_stream(js: &jetstream::Context, cfg: &NatsConfig) -> anyhow::Result<stream::Stream> {
    let stream = js
        .get_or_create_stream(stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![cfg.subject.clone()],
            duplicate_window: Duration::from_secs(cfg.dedupe_window_secs),
            max_age: Duration::from_secs(cfg.max_age_hours * 3600),
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    Ok(stream)
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

    /// Every event is sent before any acknowledgement is awaited: one round trip for the batch, not one
    /// per event.
    async fn publish_batch(&self, events: Vec<UsageEvent>) -> Vec<bool> {
        let mut acks = Vec::with_capacity(events.len());
        for event in &events {
            let msg =
                PublishMessage::build().payload(event.encode_to_vec().into()).message_id(&event.request_id);
            acks.push(self.js.send_publish(self.subject.clone(), msg).await.ok());
        }
        futures_util::future::join_all(acks.into_iter().map(|ack| async move {
            match ack {
                Some(ack) => ack.await.is_ok(),
                None => false,
            }
        }))
        .await
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
        let stream = ensure_stream(&self.js, &self.cfg).await?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                &self.cfg.consumer,
                pull::Config {
                    durable_name: Some(self.cfg.consumer.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    filter_subject: self.cfg.subject.clone(),
                    ack_wait: Duration::from_secs(self.cfg.ack_wait_secs.max(1)),
                    // A batch is taken whole: let enough be in flight for one.
                    max_ack_pending: i64::try_from(self.cfg.batch_size.max(1) * 4).unwrap_or(1024),
                    ..Default::default()
                },
            )
            .await?;
        let lag = tokio::spawn(report_lag(consumer.clone()));
        let _lag = AbortOnDrop(lag);
        let batch = self.cfg.batch_size.max(1);
        let messages = consumer
            .stream()
            .heartbeat(Duration::from_secs(15))
            .max_messages_per_batch(batch)
            .messages()
            .await?;
        let mut batches =
            std::pin::pin!(gathered(messages.fuse(), batch, Duration::from_millis(self.cfg.gather_ms)));
        // Several batches are recorded at once: under load a transaction mostly waits (round trips to a
        // database that shares the machine), and one at a time billing fell behind the edge.
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                Some(done) = in_flight.next(), if !in_flight.is_empty() => done?,
                m = batches.next(), if in_flight.len() < BATCHES_IN_FLIGHT => match m {
                    Some(b) => in_flight.push(self.process(handler, b)),
                    None => return Err(anyhow::anyhow!("message stream ended")),
                },
                () = stop.cancelled() => {
                    // What is being recorded finishes (and is acked); the rest is redelivered.
                    while let Some(done) = in_flight.next().await {
                        done?;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Records one batch and acknowledges each event (or asks for its redelivery).
    async fn process<H: UsageHandler>(
        &self,
        handler: &H,
        batch: Vec<std::result::Result<jetstream::Message, pull::MessagesError>>,
    ) -> anyhow::Result<()> {
        let base = Duration::from_millis(self.cfg.retry_delay_ms);
        let mut msgs = Vec::with_capacity(batch.len());
        for m in batch {
            msgs.push(m.map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        let (mut events, mut attempts, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        for msg in msgs {
            let delivered = msg.info().map_or(1, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX));
            match UsageEvent::decode(msg.payload.clone()) {
                Ok(ev) => {
                    events.push(ev);
                    attempts.push(delivered);
                    kept.push(msg);
                }
                Err(e) => {
                    // Poison: never decodable. Kept as a dead letter, then acknowledged.
                    metrics::counter!("relay_usage_events_poison_total").increment(1);
                    let stored =
                        handler.reject(msg.payload.to_vec(), format!("undecodable usage event: {e}")).await;
                    let kind =
                        if stored { AckKind::Ack } else { AckKind::Nak(Some(retry_delay(base, delivered))) };
                    let _ = msg.ack_with(kind).await;
                }
            }
        }
        if events.is_empty() {
            return Ok(());
        }
        let span = consumer_span(&events[0]);
        let verdicts = handler.handle_batch(&events, &attempts).instrument(span.clone()).await;
        for ((msg, verdict), attempt) in kept.iter().zip(verdicts).zip(&attempts) {
            let result = match verdict {
                // Not acked: it will be redelivered and the idempotent handler ignores it.
                Handled::Stored => msg.ack().await,
                Handled::Retry(why) => {
                    tracing::warn!(parent: &span, reason = %why, attempt, "usage event not recorded; will be redelivered");
                    msg.ack_with(AckKind::Nak(Some(retry_delay(base, *attempt)))).await
                }
            };
            if let Err(e) = result {
                tracing::warn!(parent: &span, error = %e, "ack failed");
            }
        }
        Ok(())
    }
}

/// Batches of at most `max` messages: each starts with the next message and takes what arrives within
/// `window` after it (what is already there is taken without waiting).
fn gathered<S, T>(messages: S, max: usize, window: Duration) -> impl futures_util::Stream<Item = Vec<T>>
where
    S: futures_util::Stream<Item = T> + Unpin,
{
    futures_util::stream::unfold(messages, move |mut messages| async move {
        let first = messages.next().await?;
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + window;
        while batch.len() < max {
            let next = match futures_util::FutureExt::now_or_never(messages.next()) {
                Some(ready) => ready,
                None => match tokio::time::timeout_at(until, messages.next()).await {
                    Ok(arrived) => arrived,
                    Err(_) => break,
                },
            };
            // The end of the messages is seen again (and reported) at the next batch.
            let Some(m) = next else { break };
            batch.push(m);
        }
        Some((batch, messages))
    })
}

/// Batches being recorded at once by one consumer.
const BATCHES_IN_FLIGHT: usize = 3;

/// How often the consumer's lag is read from the server.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Exports the durable consumer's lag (`relay_bus_consumer_pending_events`: events not yet delivered plus
/// delivered and not yet acknowledged), as the server counts it, so every billing replica reports the same.
async fn report_lag(consumer: jetstream::consumer::Consumer<pull::Config>) {
    loop {
        if let Ok(info) = consumer.get_info().await {
            let pending = info.num_pending.saturating_add(u64::try_from(info.num_ack_pending).unwrap_or(0));
            metrics::gauge!("relay_bus_consumer_pending_events").set(pending as f64);
        }
        tokio::time::sleep(LAG_EVERY).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
