//! Against a real NATS JetStream (NATS_URL): dedupe on request id, explicit acks, redelivery after a
//! failed handler, poison messages terminated, and a durable consumer that resumes where it stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_core::contracts::UsageSink;
use relay_core::pb::events::v1::UsageEvent;
use relay_events::{Handled, NatsConfig, NatsSink, NatsSource, UsageHandler, UsageSource, connect_jetstream};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
struct Flaky {
    seen: Arc<Mutex<Vec<String>>>,
    fail_once: Arc<Mutex<Vec<String>>>,
    rejected: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl UsageHandler for Flaky {
    async fn handle_batch(&self, events: &[UsageEvent], _: &[u32]) -> Vec<Handled> {
        let mut fail = self.fail_once.lock().unwrap();
        events
            .iter()
            .map(|event| {
                if let Some(i) = fail.iter().position(|id| *id == event.request_id) {
                    fail.remove(i);
                    return Handled::Retry("transient failure".into());
                }
                self.seen.lock().unwrap().push(event.request_id.clone());
                Handled::Stored
            })
            .collect()
    }
    async fn reject(&self, payload: Vec<u8>, _: String) -> bool {
        self.rejected.lock().unwrap().push(payload);
        true
    }
}

fn event(id: &str) -> UsageEvent {
    UsageEvent { schema_version: 1, request_id: id.into(), ..Default::default() }
}

async fn wait_for(seen: &Arc<Mutex<Vec<String>>>, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while seen.lock().unwrap().len() < n {
        assert!(tokio::time::Instant::now() < deadline, "only {:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `cfg` on a stream, subject and consumer of its own, redelivering after 100 ms.
fn fresh(cfg: NatsConfig) -> NatsConfig {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    NatsConfig {
        stream: format!("T_{tag}"),
        subject: format!("t.{tag}"),
        consumer: format!("c{tag}"),
        retry_delay_ms: 100,
        ..cfg
    }
}

#[tokio::test]
async fn dedupes_acks_redelivers_and_resumes() {
    let Some(url) = relay_test_support::env_service("NATS_URL") else {
        return;
    };
    let cfg = fresh(NatsConfig::default());
    let js = connect_jetstream(&url, &cfg).await.unwrap();
    let sink = NatsSink::new(js.clone(), &cfg);
    sink.publish(event("a")).await.unwrap();
    sink.publish(event("a")).await.unwrap(); // same Nats-Msg-Id: dropped by the server
    sink.publish(event("b")).await.unwrap();
    js.publish(cfg.subject.clone(), "not protobuf \u{1}\u{2}".into()).await.unwrap().await.unwrap();
    sink.publish(event("c")).await.unwrap();

    let h = Flaky::default();
    h.fail_once.lock().unwrap().push("b".into());
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        UsageSource::Nats(Box::new(NatsSource::new(js.clone(), cfg.clone()))).run(h.clone(), stop.clone()),
    );
    wait_for(&h.seen, 3).await;
    stop.cancel();
    task.await.unwrap();
    let mut seen = h.seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, ["a", "b", "c"], "each event handled exactly once after success");

    // The durable consumer resumes: only new events are delivered to the next run.
    sink.publish(event("d")).await.unwrap();
    let h2 = Flaky::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        UsageSource::Nats(Box::new(NatsSource::new(js.clone(), cfg.clone()))).run(h2.clone(), stop.clone()),
    );
    wait_for(&h2.seen, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(*h2.seen.lock().unwrap(), ["d"]);
    js.delete_stream(&cfg.stream).await.unwrap();
}

#[tokio::test]
async fn batches_publish_pipelined_and_are_recorded_several_at_once() {
    let Some(url) = relay_test_support::env_service("NATS_URL") else {
        return;
    };
    // Small batches: the consumer has several in flight while more arrive.
    let cfg = fresh(NatsConfig { batch_size: 25, ..Default::default() });
    let js = connect_jetstream(&url, &cfg).await.unwrap();
    let sink = NatsSink::new(js.clone(), &cfg);
    let mut events: Vec<UsageEvent> = (0..600).map(|i| event(&format!("e{i}"))).collect();
    events.push(event("e7")); // a duplicate inside the batch: dropped by the server
    let verdicts = sink.publish_batch(events).await;
    assert_eq!(verdicts.len(), 601);
    assert!(verdicts.iter().all(|v| *v), "every publish acknowledged");

    let h = Flaky::default();
    h.fail_once.lock().unwrap().extend(["e3".to_owned(), "e333".to_owned(), "e599".to_owned()]);
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        UsageSource::Nats(Box::new(NatsSource::new(js.clone(), cfg.clone()))).run(h.clone(), stop.clone()),
    );
    wait_for(&h.seen, 600).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    task.await.unwrap();
    let mut seen = h.seen.lock().unwrap().clone();
    seen.sort();
    let mut want: Vec<String> = (0..600).map(|i| format!("e{i}")).collect();
    want.sort();
    assert_eq!(seen, want, "each event recorded exactly once, the failed ones after their redelivery");
    js.delete_stream(&cfg.stream).await.unwrap();
}
