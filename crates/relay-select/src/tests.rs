use super::*;

fn dep(id: &str, weight: u32) -> Deployment {
    Deployment { id: id.into(), weight, ..Default::default() }
}

fn fail(s: &Selector, id: &str) {
    let _ =
        s.record(id, Outcome::Failed { code: ErrorCode::UpstreamServerError, upstream_status: Some(500) });
}

#[test]
fn cost_first_and_least_latency_follow_prices_and_latency() {
    use relay_core::pb::routing::v1::Price;
    let priced = |id: &str, input: i64, output: i64| Deployment {
        price: Some(Price {
            input_per_mtok_micros: input,
            output_per_mtok_micros: output,
            ..Default::default()
        }),
        ..dep(id, 1)
    };
    let s = Selector::default();
    let c = [priced("dear", 10, 10), priced("cheap-in", 1, 30), dep("unpriced", 1)];
    let ids = |v: Vec<Deployment>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(ids(s.order_by(&c, Strategy::CostFirst, (1000, 10))), ["cheap-in", "dear", "unpriced"]);
    assert_eq!(ids(s.order_by(&c, Strategy::CostFirst, (10, 1000))), ["dear", "cheap-in", "unpriced"]);
    let answered = |id, ms| s.record(id, Outcome::Answered { latency: Duration::from_millis(ms) });
    let (a, b) = (dep("a", 1), dep("b", 1));
    let _ = (answered("a", 100), answered("b", 300));
    assert_eq!(s.order_by(&[a.clone(), b.clone()], Strategy::LeastLatency, (0, 0))[0].id, "a");
    for _ in 0..10 {
        let _ = answered("a", 900); // a slows down
    }
    assert_eq!(s.order_by(&[a, b], Strategy::LeastLatency, (0, 0))[0].id, "b", "follows the change");
    assert_eq!(Strategy::parse("cost"), Some(Strategy::CostFirst));
    assert_eq!(Strategy::parse("fastest"), None);
}

#[test]
fn a_session_sticks_to_one_healthy_deployment() {
    let s = Selector::default();
    let c = [dep("a", 1), dep("b", 1), dep("c", 1)];
    let firsts = |key: &str| {
        let h = session_hash(key.as_bytes());
        (0..100)
            .map(|_| s.order_for(&c, Strategy::Weighted, (0, 0), Some(h))[0].id.clone())
            .collect::<Vec<_>>()
    };
    let one = firsts("conversation-1");
    assert!(one.iter().all(|id| *id == one[0]), "100 requests, one deployment");
    let spread: std::collections::HashSet<String> =
        (0..60).map(|i| firsts(&format!("s{i}"))[0].clone()).collect();
    assert_eq!(spread.len(), 3, "sessions spread over the deployments");
    // Its deployment fails: the session moves, and stays where it moved.
    for _ in 0..3 {
        fail(&s, &one[0]);
    }
    let moved = firsts("conversation-1");
    assert!(moved.iter().all(|id| *id == moved[0] && *id != one[0]), "{moved:?}");
}

#[test]
fn the_retry_budget_bounds_failovers_to_a_fifth_of_requests() {
    let s = Selector::default();
    let mut retries = 0;
    for _ in 0..1000 {
        s.first_attempt();
        // A full outage: every request would like to fail over twice.
        for _ in 0..2 {
            if s.may_retry() {
                retries += 1;
            }
        }
    }
    assert!((200..=221).contains(&retries), "{retries} retries for 1000 requests");
}

#[test]
fn transitions_travel_to_other_replicas() {
    let (a, b) = (Selector::default(), Selector::default());
    let c = [dep("x", 100), dep("y", 1)];
    let ok = |s: &Selector, id| s.record(id, Outcome::Answered { latency: Duration::ZERO });
    let f = || Outcome::Failed { code: ErrorCode::UpstreamTimeout, upstream_status: None };
    assert_eq!((a.record("x", f()), a.record("x", f())), (None, None));
    let t = a.record("x", f()).expect("opened");
    assert_eq!(a.record("x", f()), None, "already open: announced once");
    let msg = t.message("x@p:1");
    let (id, t2) = Transition::parse(&msg).unwrap();
    assert_eq!((id, t2), ("x@p:1", t));
    b.apply("x", t2);
    assert!((0..50).all(|_| b.order(&c)[0].id == "y"), "the other replica isolates it too");
    assert_eq!(ok(&a, "x"), Some(Transition::Closed));
    b.apply("x", Transition::Closed);
    assert!((0..200).any(|_| b.order(&c)[0].id == "x"));
    assert_eq!(Transition::parse("key:abc"), None);
}

#[test]
fn weights_share_first_attempts() {
    let s = Selector::default();
    let c = [dep("a", 3), dep("b", 1)];
    let n = 40_000;
    let a = (0..n).filter(|_| s.order(&c)[0].id == "a").count();
    let share = a as f64 / f64::from(n);
    assert!((share - 0.75).abs() < 0.02, "weight 3 of 4 got {share}");
    assert_eq!(s.order(&c).len(), 2, "the rest stay as fallbacks");
}

#[test]
fn a_failing_deployment_is_isolated_then_probed_back() {
    let s = Selector::new(BreakerConfig {
        failures_to_open: 3,
        cooldown: Duration::from_millis(50),
        max_cooldown: Duration::from_secs(1),
    });
    let c = [dep("bad", 100), dep("good", 1)];
    for _ in 0..3 {
        fail(&s, "bad");
    }
    for _ in 0..50 {
        assert_eq!(s.order(&c)[0].id, "good", "isolated: tried last");
    }
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(s.order(&c)[0].id, "bad", "cool-down over: one probe");
    assert_eq!(s.order(&c)[0].id, "good", "one probe at a time");
    fail(&s, "bad");
    assert_eq!(s.order(&c)[0].id, "good", "relapse: isolated again, longer");
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(s.order(&c)[0].id, "good", "the cool-down doubled");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.order(&c)[0].id, "bad");
    let _ = s.record("bad", Outcome::Answered { latency: Duration::ZERO });
    let firsts = (0..200).filter(|_| s.order(&c)[0].id == "bad").count();
    assert!(firsts > 150, "closed again: back to its weight ({firsts}/200)");
}

#[test]
fn without_weights_the_given_order_is_priority() {
    let s = Selector::default();
    let c = [dep("primary", 0), dep("fallback", 0)];
    assert!((0..100).all(|_| s.order(&c)[0].id == "primary"));
    for _ in 0..3 {
        fail(&s, "primary");
    }
    assert_eq!(s.order(&c)[0].id, "fallback", "an isolated primary waits behind its fallback");
}

#[test]
fn caller_errors_do_not_count_and_refused_credentials_isolate_at_once() {
    let s = Selector::default();
    let c = [dep("a", u32::MAX / 2), dep("b", 1)];
    for _ in 0..10 {
        s.record("a", Outcome::Failed { code: ErrorCode::UpstreamClientError, upstream_status: Some(400) });
    }
    assert!((0..20).all(|_| s.order(&c)[0].id == "a"), "a 400 is the caller's fault: still first");
    s.record("a", Outcome::Failed { code: ErrorCode::Unavailable, upstream_status: Some(401) });
    assert_eq!(s.order(&c)[0].id, "b");
    assert_eq!(s.order(&[dep("a", 1)])[0].id, "a", "alone, an isolated deployment is still tried");
}

#[test]
fn a_slowing_deployment_loses_traffic_before_it_fails() {
    let s = Selector::default();
    let c = [dep("a", 1), dep("b", 1)];
    let answered = |id, ms| s.record(id, Outcome::Answered { latency: Duration::from_millis(ms) });
    for _ in 0..20 {
        let _ = (answered("a", 10), answered("b", 10));
    }
    let share = |s: &Selector| (0..4000).filter(|_| s.order(&c)[0].id == "a").count() as f64 / 4000.0;
    assert!((share(&s) - 0.5).abs() < 0.05, "equal health, equal weight");
    for _ in 0..64 {
        let _ = answered("a", 1000); // a's p95 rises 100×
    }
    assert!(share(&s) < 0.05, "a kept {}", share(&s));
    // Without weights (config order), the slow primary goes behind its fallback.
    let p = [dep("a", 0), dep("b", 0)];
    assert_eq!(s.order(&p)[0].id, "b");
    assert_eq!(s.order_by(&p, Strategy::Priority, (0, 0))[0].id, "a", "strict priority keeps it");
}

#[test]
fn fallback_groups_come_after_every_healthy_deployment_of_the_group_before() {
    let s = Selector::default();
    let g = |id: &str, group: &str, w| Deployment { group: group.into(), ..dep(id, w) };
    let c = [g("a1", "gpt", 1), g("a2", "gpt", 1), g("b1", "claude", 1000)];
    for _ in 0..200 {
        let o = s.order(&c);
        assert_eq!(o[2].id, "b1", "the fallback group is last, whatever its weight");
    }
    for _ in 0..3 {
        fail(&s, "a1");
        fail(&s, "a2");
    }
    let ids: Vec<String> = s.order(&c).into_iter().map(|d| d.id).collect();
    assert_eq!(ids[0], "b1", "isolated primaries wait behind the fallback group: {ids:?}");
}

#[test]
fn balanced_and_headroom_follow_their_scores() {
    use relay_core::pb::routing::v1::Price;
    let priced = |id: &str, p: i64| Deployment {
        price: Some(Price { input_per_mtok_micros: p, output_per_mtok_micros: p, ..Default::default() }),
        ..dep(id, 1)
    };
    let s = Selector::default();
    let c = [priced("cheap-slow", 1), priced("dear-fast", 10)];
    let answered = |id, ms| s.record(id, Outcome::Answered { latency: Duration::from_millis(ms) });
    for _ in 0..10 {
        let _ = (answered("cheap-slow", 110), answered("dear-fast", 100));
    }
    assert_eq!(
        s.order_by(&c, Strategy::Balanced, (1000, 100))[0].id,
        "cheap-slow",
        "about as fast, far cheaper"
    );
    for _ in 0..30 {
        let _ = answered("cheap-slow", 2000);
    }
    assert_eq!(s.order_by(&c, Strategy::Balanced, (1000, 100))[0].id, "dear-fast", "far slower now");
    s.note_headroom("dear-fast", 0.05);
    assert!((0..100).all(|_| s.order_by(&c, Strategy::Headroom, (0, 0))[0].id == "cheap-slow"));
    let h = s.health("cheap-slow");
    assert_eq!((h.breaker, h.attempts), ("closed", 40));
    assert!(h.p95_ms.unwrap() >= 2000.0);
}

#[test]
fn weights_hold_while_outcomes_are_recorded() {
    let s = Selector::default();
    let c = [dep("a", 3), dep("b", 1)];
    let mut a = 0;
    for i in 0..4000u64 {
        let o = s.order(&c);
        let _ = s
            .record(&o[0].id, Outcome::Answered { latency: Duration::from_micros(1000 + (i * 7919) % 3000) });
        a += usize::from(o[0].id == "a");
    }
    let share = a as f64 / 4000.0;
    assert!((share - 0.75).abs() < 0.03, "{share}");
}

#[test]
fn a_throttled_deployment_waits_out_its_retry_after() {
    let s = Selector::default();
    let c = [dep("busy", 1000), dep("spare", 1)];
    let t = s.record("busy", Outcome::Throttled { retry_after: Duration::from_secs(5) });
    assert_eq!(
        t,
        Some(Transition::Opened { cooldown: Duration::from_secs(5) }),
        "announced to the other replicas"
    );
    assert!((0..50).all(|_| s.order(&c)[0].id == "spare"));
    assert_eq!(
        s.record("busy", Outcome::Throttled { retry_after: Duration::from_secs(2) }),
        None,
        "already out longer"
    );
    assert_eq!(s.health("busy").breaker, "open");
}
