//! What the durable outbox costs per usage event: 64 tasks publish 100,000 events through it (each
//! `publish` returns once the event is on disk), a no-op sink acknowledges them. Prints events per second
//! and process CPU per event (writer thread, relay task and callers together), with and without fsync.
//! `cargo bench -p relay-events --bench outbox`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_core::contracts::{Result, UsageSink};
use relay_core::pb::common::v1::TokenUsage;
use relay_core::pb::events::v1::UsageEvent;
use relay_events::outbox::Outbox;

struct Acks;

#[async_trait::async_trait]
impl UsageSink for Acks {
    async fn publish(&self, _: UsageEvent) -> Result<()> {
        Ok(())
    }
}

/// User + system CPU of this process so far (from /proc: clock ticks of 10 ms).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn event(i: u64) -> UsageEvent {
    UsageEvent {
        schema_version: 1,
        request_id: format!("0193a0e4-{i:012}-7000-8000-000000000000"),
        key_id: "key-bench".into(),
        team_id: "team-bench".into(),
        org_id: "org-bench".into(),
        model: "gpt-4o".into(),
        deployment_id: "gpt-4o@openai".into(),
        provider: "openai".into(),
        upstream_model: "gpt-4o-2024-08-06".into(),
        usage: Some(TokenUsage { input_tokens: 1200, output_tokens: 300, ..Default::default() }),
        started_at_unix_ms: 1_764_000_000_000,
        ..Default::default()
    }
}

async fn run(fsync: bool, n: u64) {
    let dir = std::env::temp_dir().join(format!("relay-outbox-bench-{}", uuid::Uuid::now_v7().simple()));
    let outbox = Outbox::open(&dir, Arc::new(Acks), 256, fsync).unwrap();
    let (t, c) = (Instant::now(), cpu());
    let mut tasks = Vec::new();
    for w in 0..64 {
        let o = outbox.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(64) {
                o.publish(event(i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(outbox.shutdown(Duration::from_secs(30)).await, 0);
    let (wall, used) = (t.elapsed(), cpu() - c);
    println!(
        "outbox fsync={fsync:<5} {n} events: {:>8.0} events/s, {:>5.1} µs CPU per event",
        n as f64 / wall.as_secs_f64(),
        used.as_secs_f64() * 1e6 / n as f64
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        run(false, 100_000).await;
        run(true, 100_000).await;
    });
}
