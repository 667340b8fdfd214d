//! What the routing decision costs per request: ordering a model group's deployments (weighted draw,
//! breaker checks) and recording the attempt's outcome. `cargo bench -p relay-select --bench select`
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use relay_core::pb::routing::v1::{Deployment, Price};
use relay_select::{Outcome, Selector, Strategy};

fn main() {
    let s = Selector::default();
    let deps: Vec<Deployment> = (0..4)
        .map(|i| Deployment {
            id: format!("model@provider-{i}"),
            weight: i + 1,
            price: Some(Price {
                input_per_mtok_micros: 1_000_000 * i64::from(i + 1),
                output_per_mtok_micros: 2_000_000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    for strategy in [
        Strategy::Weighted,
        Strategy::CostFirst,
        Strategy::LeastLatency,
        Strategy::Balanced,
        Strategy::Headroom,
    ] {
        let n = 1_000_000;
        let t = Instant::now();
        for _ in 0..n {
            let order = s.order_by(&deps, strategy, (1200, 300));
            let _ = s.record(&order[0].id, Outcome::Answered { latency: Duration::from_millis(5) });
        }
        println!(
            "{strategy:?}: {:.0} ns per request (order 4 deployments + record)",
            t.elapsed().as_nanos() as f64 / f64::from(n)
        );
    }
}
