//! The embedded bus: a bounded channel of batches. Publishing waits for room (backpressure, never drops)
//! and then for the handler's verdicts, so `publish` returning Ok means the event is recorded (the outbox
//! in front of it deletes its copy only then).

use relay_core::contracts::{Result, UsageSink};
use relay_core::pb::events::v1::UsageEvent;
use relay_core::{ErrorCode, RelayError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Handled, UsageHandler, consumer_span};

/// Events published together and where their verdicts go (one per event, in order).
type Delivery = (Vec<UsageEvent>, oneshot::Sender<Vec<bool>>);

#[derive(Clone)]
pub struct InProcessSink(mpsc::Sender<Delivery>);

pub struct InProcessSource(mpsc::Receiver<Delivery>);

/// `capacity` deliveries (each one event or a publisher's batch) wait at most; past that publishers wait.
pub fn in_process_bus(capacity: usize) -> (InProcessSink, InProcessSource) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (InProcessSink(tx), InProcessSource(rx))
}

impl InProcessSink {
    async fn deliver(&self, events: Vec<UsageEvent>) -> Option<Vec<bool>> {
        let (ack, stored) = oneshot::channel();
        self.0.send((events, ack)).await.ok()?;
        stored.await.ok()
    }
}

#[async_trait::async_trait]
impl UsageSink for InProcessSink {
    async fn publish(&self, event: UsageEvent) -> Result<()> {
        match self.deliver(vec![event]).await.as_deref() {
            Some([true]) => Ok(()),
            Some(_) => Err(RelayError::new(ErrorCode::Unavailable, "usage event not recorded yet")),
            None => Err(RelayError::new(ErrorCode::Unavailable, "usage bus closed")),
        }
    }

    async fn publish_batch(&self, events: Vec<UsageEvent>) -> Vec<bool> {
        let n = events.len();
        self.deliver(events).await.unwrap_or_else(|| vec![false; n])
    }
}

/// Most events handled in one batch (one transaction).
const BATCH: usize = 1024;

impl InProcessSource {
    pub(crate) async fn run<H: UsageHandler>(mut self, handler: H, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                biased;
                d = self.0.recv() => d,
                () = stop.cancelled() => break,
            };
            let Some(first) = first else { return };
            // Whatever else is waiting joins this batch, up to BATCH events.
            let mut batch = vec![first];
            let mut events = batch[0].0.len();
            while events < BATCH {
                match self.0.try_recv() {
                    Ok(d) => {
                        events += d.0.len();
                        batch.push(d);
                    }
                    Err(_) => break,
                }
            }
            // The consumer's lag: what is still queued behind this batch.
            metrics::gauge!("relay_bus_consumer_pending_events").set(self.0.len() as f64);
            handle(&handler, batch).await;
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
    let mut sizes = Vec::with_capacity(batch.len());
    let mut acks = Vec::with_capacity(batch.len());
    let mut events = Vec::with_capacity(batch.iter().map(|d| d.0.len()).sum());
    for (evs, ack) in batch {
        sizes.push(evs.len());
        acks.push(ack);
        events.extend(evs);
    }
    let span = events.first().map_or_else(tracing::Span::none, consumer_span);
    let attempts = vec![1; events.len()];
    let verdicts = handler.handle_batch(&events, &attempts).instrument(span.clone()).await;
    let mut stored = Vec::with_capacity(events.len());
    for (verdict, event) in verdicts.into_iter().zip(&events) {
        if let Handled::Retry(why) = &verdict {
            tracing::warn!(parent: &span, request_id = %event.request_id, reason = %why, "usage event not recorded yet");
        }
        stored.push(verdict == Handled::Stored);
    }
    // A handler that answered fewer verdicts than events recorded none of the rest.
    stored.resize(events.len(), false);
    let mut rest = stored.into_iter();
    for (ack, n) in acks.into_iter().zip(sizes) {
        let _ = ack.send(rest.by_ref().take(n).collect());
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
        *h.1.lock().unwrap() = 1;
        let verdicts = sink.publish_batch(vec![ev(2), ev(3), ev(4)]).await;
        assert_eq!(verdicts, vec![false, true, true], "one verdict per event, in order");
        stop.cancel();
        task.await.unwrap();
        assert_eq!(*h.0.lock().unwrap(), vec!["r0", "r1", "r3", "r4"]);
    }
}
