//! The embedded bus: a bounded channel. Publishing waits for room (backpressure, never drops).

use relay_core::contracts::{Result, UsageSink};
use relay_core::pb::events::v1::UsageEvent;
use relay_core::{ErrorCode, RelayError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{UsageHandler, consumer_span};

#[derive(Clone)]
pub struct InProcessSink(mpsc::Sender<UsageEvent>);

pub struct InProcessSource(mpsc::Receiver<UsageEvent>);

pub fn in_process_bus(capacity: usize) -> (InProcessSink, InProcessSource) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (InProcessSink(tx), InProcessSource(rx))
}

#[async_trait::async_trait]
impl UsageSink for InProcessSink {
    async fn publish(&self, event: UsageEvent) -> Result<()> {
        self.0.send(event).await.map_err(|_| RelayError::new(ErrorCode::Unavailable, "usage bus closed"))
    }
}

impl InProcessSource {
    pub(crate) async fn run<H: UsageHandler>(mut self, handler: H, stop: CancellationToken) {
        loop {
            let event = tokio::select! {
                biased;
                ev = self.0.recv() => match ev { Some(ev) => ev, None => return },
                () = stop.cancelled() => break,
            };
            handle_with_retry(&handler, event).await;
        }
        // Drain what was published before the stop.
        while let Ok(event) = self.0.try_recv() {
            handle_with_retry(&handler, event).await;
        }
    }
}

/// In process there is no redelivery, so a failing handler is retried here (bounded, with backoff).
async fn handle_with_retry<H: UsageHandler>(handler: &H, event: UsageEvent) {
    let span = consumer_span(&event);
    let mut delay = std::time::Duration::from_millis(50);
    for attempt in 1..=8 {
        match handler.handle(event.clone()).instrument(span.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(parent: &span, attempt, error = %e, "usage event not recorded; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
    metrics::counter!("relay_usage_events_dropped_total").increment(1);
    tracing::error!(parent: &span, request_id = %event.request_id, "usage event dropped after 8 attempts");
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<String>>>, Arc<Mutex<u32>>);

    impl UsageHandler for Collect {
        async fn handle(&self, event: UsageEvent) -> anyhow::Result<()> {
            let mut fails = self.1.lock().unwrap();
            if *fails > 0 {
                *fails -= 1;
                anyhow::bail!("transient");
            }
            self.0.lock().unwrap().push(event.request_id);
            Ok(())
        }
    }

    #[tokio::test]
    async fn delivers_in_order_retries_and_drains_on_stop() {
        let (sink, source) = in_process_bus(16);
        let h = Collect::default();
        *h.1.lock().unwrap() = 2;
        for i in 0..5 {
            sink.publish(UsageEvent { request_id: format!("r{i}"), ..Default::default() }).await.unwrap();
        }
        let stop = CancellationToken::new();
        stop.cancel();
        source.run(h.clone(), stop).await;
        assert_eq!(*h.0.lock().unwrap(), vec!["r0", "r1", "r2", "r3", "r4"]);
    }
}
