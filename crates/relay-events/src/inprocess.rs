//! The embedded bus: a bounded channel. Publishing waits for room (backpressure, never drops) and then for
//! the handler's verdict, so `publish` returning Ok means the event is recorded (the outbox in front of it
//! deletes its copy only then).

use relay_core::contracts::{Result, UsageSink};
use relay_core::pb::events::v1::UsageEvent;
use relay_core::{ErrorCode, RelayError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Handled, UsageHandler, consumer_span};

type Delivery = (UsageEvent, oneshot::Sender<bool>);

#[derive(Clone)]
pub struct InProcessSink(mpsc::Sender<Delivery>);

pub struct InProcessSource(mpsc::Receiver<Delivery>);

pub fn in_process_bus(capacity: usize) -> (InProcessSink, InProcessSource) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (InProcessSink(tx), InProcessSource(rx))
}

#[async_trait::async_trait]
impl UsageSink for InProcessSink {
    async fn publish(&self, event: UsageEvent) -> Result<()> {
        let closed = || RelayError::new(ErrorCode::Unavailable, "usage bus closed");
        let (ack, stored) = oneshot::channel();
        self.0.send((event, ack)).await.map_err(|_| closed())?;
        match stored.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(RelayError::new(ErrorCode::Unavailable, "usage event not recorded yet")),
            Err(_) => Err(closed()),
        }
    }
}

/// Most events handled in one batch (one transaction).
const BATCH: usize = 1024;

impl InProcessSource {
    pub(crate) async fn run<H: UsageHandler>(mut self, handler: H, stop: CancellationToken) {
        let mut buf = Vec::with_capacity(BATCH);
        loop {
            let n = tokio::select! {
                biased;
                n = self.0.recv_many(&mut buf, BATCH) => n,
                () = stop.cancelled() => break,
            };
            if n == 0 {
                return;
            }
            // The consumer's lag: what is still queued behind this batch.
            metrics::gauge!("relay_bus_consumer_pending_events").set(self.0.len() as f64);
            handle(&handler, std::mem::take(&mut buf)).await;
        }
        // Answer what was published before the stop.
        while let Ok(d) = self.0.try_recv() {
            handle(&handler, vec![d]).await;
        }
    }
}

/// Runs one batch. A retry is answered `false`: the publisher (the outbox) keeps the event and offers it
/// again later, so an outage never blocks this loop and never loses the event.
async fn handle<H: UsageHandler>(handler: &H, batch: Vec<Delivery>) {
    let (events, acks): (Vec<UsageEvent>, Vec<_>) = batch.into_iter().unzip();
    let span = events.first().map_or_else(tracing::Span::none, consumer_span);
    let attempts = vec![1; events.len()];
    let verdicts = handler.handle_batch(&events, &attempts).instrument(span.clone()).await;
    for ((ack, verdict), event) in acks.into_iter().zip(verdicts).zip(&events) {
        if let Handled::Retry(why) = &verdict {
            tracing::warn!(parent: &span, request_id = %event.request_id, reason = %why, "usage event not recorded yet");
        }
        let _ = ack.send(verdict == Handled::Stored);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<String>>>, Arc<Mutex<u32>>);

    impl UsageHandler for Collect {
        async fn handle_batch(&self, events: &[UsageEvent], _: &[u32]) -> Vec<Handled> {
            let mut fails = self.1.lock().unwrap();
            events
                .iter()
                .map(|e| {
                    if *fails > 0 {
                        *fails -= 1;
                        return Handled::Retry("transient".into());
                    }
                    self.0.lock().unwrap().push(e.request_id.clone());
                    Handled::Stored
                })
                .collect()
        }
        async fn reject(&self, _: Vec<u8>, _: String) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn publish_returns_the_handlers_verdict() {
        let (sink, source) = in_process_bus(16);
        let h = Collect::default();
        *h.1.lock().unwrap() = 1;
        let stop = CancellationToken::new();
        let task = tokio::spawn(source.run(h.clone(), stop.clone()));
        let ev = |i: u32| UsageEvent { request_id: format!("r{i}"), ..Default::default() };
        assert!(sink.publish(ev(0)).await.is_err(), "first try fails: not recorded");
        sink.publish(ev(0)).await.unwrap();
        sink.publish(ev(1)).await.unwrap();
        stop.cancel();
        task.await.unwrap();
        assert_eq!(*h.0.lock().unwrap(), vec!["r0", "r1"]);
    }
}
