//! relay-select: the per-request half of routing. Routing decides which deployments may serve a model and
//! with what weight; this crate orders them for one request, in the process that sends it (no network hop:
//! the decision costs well under a microsecond), and keeps each deployment's health from the outcomes of
//! the attempts made through it.
//!
//! - **Weighted order**: healthy deployments in weighted-random order (weight 3 gets three times the first
//!   attempts of weight 1), so cached routes still spread load; failover takes the rest in the same order.
//!   When no candidate has a weight (all 0), they keep the order routing gave: priority, then fallbacks.
//! - **Circuit breakers**: a deployment failing `failures_to_open` times in a row (timeouts, 5xx, 429,
//!   unreachable), or refusing Relay's credential once, is isolated for a cool-down that doubles on each
//!   relapse (up to `max_cooldown`); after it, one request at a time probes it (half-open): a success
//!   closes the breaker, a failure re-opens it. Isolated deployments are tried only when nothing else is
//!   left. Caller errors (400s) say nothing about a deployment's health.
//!
//! What does not belong here: IO, which deployments exist (routing), credentials (adapter).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use relay_core::ErrorCode;
use relay_core::pb::routing::v1::Deployment;

/// Breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub failures_to_open: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failures_to_open: 3, cooldown: Duration::from_secs(2), max_cooldown: Duration::from_secs(60) }
    }
}

/// How a model group orders its healthy deployments for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Weighted random by `weight` (the order given when no candidate has a weight).
    #[default]
    Weighted,
    /// The order given: the first is the primary, the rest fallbacks.
    Priority,
    /// Cheapest first for this request's token estimate (unpriced deployments last).
    CostFirst,
    /// Fastest first: lowest moving average of time to accept (untried deployments first, to learn).
    LeastLatency,
}

impl Strategy {
    /// `weighted`, `priority`, `cost`, `latency` (the `x-relay-strategy` header and the config).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "weighted" => Self::Weighted,
            "priority" => Self::Priority,
            "cost" | "cost-first" => Self::CostFirst,
            "latency" | "least-latency" => Self::LeastLatency,
            _ => return None,
        })
    }
}

/// How one attempt through a deployment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream accepted the request, after `latency`.
    Answered { latency: Duration },
    /// The upstream (or the way to it) failed; `code` classifies it.
    Failed { code: ErrorCode, upstream_status: Option<u16> },
}

/// How long a probe may take before another request may probe instead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// Cool-down over: one probe in flight since then (a probe that never reports, e.g. its client left,
    /// is replaced after [`PROBE_TIMEOUT`]).
    HalfOpen {
        since: Instant,
    },
}

#[derive(Debug, Clone, Copy)]
struct Health {
    state: State,
    consecutive_failures: u32,
    cooldown: Duration,
}

/// Weighted rendezvous score of a deployment for a session: stable per (session, deployment), and a
/// deployment with twice the weight wins twice as many sessions.
fn rendezvous(session: u64, d: &Deployment) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ session;
    for b in d.id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    let unit = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(d.weight.max(1)) / -unit.ln()
}

/// FNV-1a of a session key, for [`Selector::order_for`].
pub fn session_hash(key: &[u8]) -> u64 {
    key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// What `d` would charge for `tokens` (input, output), in micro-units × 1M; unpriced = last.
fn cost_of(d: &Deployment, (input, output): (u64, u64)) -> i128 {
    d.price.as_ref().map_or(i128::MAX, |p| {
        i128::from(input) * i128::from(p.input_per_mtok_micros)
            + i128::from(output) * i128::from(p.output_per_mtok_micros)
    })
}

/// Failovers allowed on top of first attempts: every first attempt earns `RETRY_RATIO` of a retry, up to
/// `RETRY_BURST` saved; a retry spends one. During a full outage upstream attempts stay within ~20 % over
/// the requests instead of multiplying by the number of deployments.
const RETRY_RATIO: f64 = 0.2;
const RETRY_BURST: f64 = 20.0;

/// The health of every deployment this process sends to, and the order it tries them in.
#[derive(Debug)]
pub struct Selector {
    cfg: BreakerConfig,
    health: Mutex<HashMap<String, Health>>,
    /// Moving average of time to accept, per deployment (milliseconds).
    latency: Mutex<HashMap<String, f64>>,
    seed: AtomicU64,
    /// Retries left in the budget, in thousandths (lock-free).
    retry_budget: AtomicU64,
}

impl Default for Selector {
    fn default() -> Self {
        Self::new(BreakerConfig::default())
    }
}

/// A breaker changing state, for other replicas to apply ([`Selector::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened { cooldown: Duration },
    Closed,
}

impl Transition {
    /// The bus form: `breaker:open:<cooldown ms>:<deployment>` or `breaker:closed:<deployment>`.
    pub fn message(self, deployment_id: &str) -> String {
        match self {
            Self::Opened { cooldown } => format!("breaker:open:{}:{deployment_id}", cooldown.as_millis()),
            Self::Closed => format!("breaker:closed:{deployment_id}"),
        }
    }

    /// Reads a bus message back: (deployment, transition), or `None` if it is not a breaker message.
    pub fn parse(msg: &str) -> Option<(&str, Self)> {
        let rest = msg.strip_prefix("breaker:")?;
        if let Some(id) = rest.strip_prefix("closed:") {
            return Some((id, Self::Closed));
        }
        let (ms, id) = rest.strip_prefix("open:")?.split_once(':')?;
        let cooldown = Duration::from_millis(ms.parse::<u64>().ok()?.min(3_600_000));
        Some((id, Self::Opened { cooldown }))
    }
}

/// What a breaker says about a deployment right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Healthy,
    /// Cool-down over; this request is the one probe.
    Probe,
    Isolated,
}

impl Selector {
    pub fn new(cfg: BreakerConfig) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
            | 1;
        let full = (RETRY_BURST * 1000.0) as u64;
        Self {
            cfg,
            health: Mutex::new(HashMap::new()),
            latency: Mutex::new(HashMap::new()),
            seed: AtomicU64::new(seed),
            retry_budget: AtomicU64::new(full),
        }
    }

    /// A request's first attempt: earns a fraction of a retry.
    pub fn first_attempt(&self) {
        let (earn, cap) = ((RETRY_RATIO * 1000.0) as u64, (RETRY_BURST * 1000.0) as u64);
        let _ = self
            .retry_budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some((v + earn).min(cap)));
    }

    /// May this request fail over once more? Spends one retry from the budget if so.
    pub fn may_retry(&self) -> bool {
        self.retry_budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1000)).is_ok()
    }

    /// A uniform value in `[0, 1)` (xorshift64*: fast, good enough to spread load, not for secrets).
    fn unit(&self) -> f64 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn availability(&self, health: &mut HashMap<String, Health>, id: &str, now: Instant) -> Availability {
        let Some(h) = health.get_mut(id) else { return Availability::Healthy };
        match h.state {
            State::Closed => Availability::Healthy,
            State::Open { until } if now < until => Availability::Isolated,
            State::HalfOpen { since } if now.duration_since(since) < PROBE_TIMEOUT => Availability::Isolated,
            State::Open { .. } | State::HalfOpen { .. } => {
                h.state = State::HalfOpen { since: now };
                Availability::Probe
            }
        }
    }

    /// The order to try `candidates` in for one request: available ones by weighted random draw (a
    /// deployment due for its probe goes first), then isolated ones (only when nothing else is left).
    pub fn order(&self, candidates: &[Deployment]) -> Vec<Deployment> {
        self.order_by(candidates, Strategy::Weighted, (0, 0))
    }

    /// As [`Self::order_by`], keeping one conversation (`session`, e.g. a hash of a session header) on the
    /// same healthy deployment, so provider prompt caches keep hitting: the first attempt goes to the
    /// deployment with the highest weighted rendezvous score for the session; the rest keep their order.
    pub fn order_for(
        &self,
        candidates: &[Deployment],
        strategy: Strategy,
        tokens: (u64, u64),
        session: Option<u64>,
    ) -> Vec<Deployment> {
        let (mut out, healthy) = self.ordered(candidates, strategy, tokens);
        let Some(session) = session else { return out };
        let best = out[..healthy]
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| rendezvous(session, a).total_cmp(&rendezvous(session, b)))
            .map(|(i, _)| i);
        if let Some(i) = best {
            let d = out.remove(i);
            out.insert(0, d);
        }
        out
    }

    /// As [`Self::order`] with a strategy; `tokens` = (input, output) estimate for cost-first.
    pub fn order_by(
        &self,
        candidates: &[Deployment],
        strategy: Strategy,
        tokens: (u64, u64),
    ) -> Vec<Deployment> {
        self.ordered(candidates, strategy, tokens).0
    }

    /// The order, and how many of its first entries are not isolated.
    fn ordered(
        &self,
        candidates: &[Deployment],
        strategy: Strategy,
        tokens: (u64, u64),
    ) -> (Vec<Deployment>, usize) {
        if candidates.len() <= 1 {
            return (candidates.to_vec(), candidates.len());
        }
        let now = Instant::now();
        let (mut probes, mut available, mut isolated) = (Vec::new(), Vec::new(), Vec::new());
        {
            let mut health = self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for d in candidates {
                match self.availability(&mut health, &d.id, now) {
                    Availability::Healthy => available.push(d),
                    Availability::Probe => probes.push(d),
                    Availability::Isolated => isolated.push(d),
                }
            }
        }
        let mut out: Vec<Deployment> = probes.into_iter().cloned().collect();
        match strategy {
            Strategy::Weighted => {}
            Strategy::Priority => {}
            Strategy::CostFirst => available.sort_by_key(|d| cost_of(d, tokens)),
            Strategy::LeastLatency => {
                let lat = self.latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                available.sort_by(|a, b| {
                    let (x, y) =
                        (lat.get(&a.id).copied().unwrap_or(0.0), lat.get(&b.id).copied().unwrap_or(0.0));
                    x.total_cmp(&y)
                });
            }
        }
        if strategy != Strategy::Weighted || candidates.iter().all(|d| d.weight == 0) {
            out.extend(available.into_iter().cloned());
            let healthy = out.len();
            out.extend(isolated.into_iter().cloned());
            return (out, healthy);
        }
        // Weighted draw without replacement (an unweighted candidate among weighted ones counts as 1).
        while !available.is_empty() {
            let total: f64 = available.iter().map(|d| f64::from(d.weight.max(1))).sum();
            let mut at = self.unit() * total;
            let mut pick = available.len() - 1;
            for (i, d) in available.iter().enumerate() {
                at -= f64::from(d.weight.max(1));
                if at < 0.0 {
                    pick = i;
                    break;
                }
            }
            out.push(available.swap_remove(pick).clone());
        }
        let healthy = out.len();
        out.extend(isolated.into_iter().cloned());
        (out, healthy)
    }

    /// Feeds one attempt's outcome into the deployment's breaker; returns the state change, if any, for
    /// the other replicas.
    pub fn record(&self, deployment_id: &str, outcome: Outcome) -> Option<Transition> {
        let mut health = self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match outcome {
            Outcome::Answered { latency } => {
                const ALPHA: f64 = 0.3;
                let ms = latency.as_secs_f64() * 1000.0;
                let mut lat = self.latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let e = lat.entry(deployment_id.to_owned()).or_insert(ms);
                *e = ALPHA * ms + (1.0 - ALPHA) * *e;
                drop(lat);
                let was_open = health.remove(deployment_id).is_some_and(|h| h.state != State::Closed);
                was_open.then_some(Transition::Closed)
            }
            Outcome::Failed { code, upstream_status } => {
                let credential = matches!(upstream_status, Some(401 | 403));
                if !(code.is_retryable() || credential) {
                    return None;
                }
                let h = health.entry(deployment_id.to_owned()).or_insert(Health {
                    state: State::Closed,
                    consecutive_failures: 0,
                    cooldown: self.cfg.cooldown,
                });
                h.consecutive_failures += 1;
                let relapse = matches!(h.state, State::HalfOpen { .. });
                let closed = h.state == State::Closed;
                if relapse || credential || h.consecutive_failures >= self.cfg.failures_to_open {
                    if relapse {
                        h.cooldown = (h.cooldown * 2).min(self.cfg.max_cooldown);
                    }
                    h.state = State::Open { until: Instant::now() + h.cooldown };
                    return (closed || relapse).then_some(Transition::Opened { cooldown: h.cooldown });
                }
                None
            }
        }
    }

    /// Applies a state change another replica saw, so every replica isolates (and readmits) together.
    pub fn apply(&self, deployment_id: &str, t: Transition) {
        let mut health = self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match t {
            Transition::Closed => {
                health.remove(deployment_id);
            }
            Transition::Opened { cooldown } => {
                let h = health.entry(deployment_id.to_owned()).or_insert(Health {
                    state: State::Closed,
                    consecutive_failures: 0,
                    cooldown,
                });
                h.cooldown = cooldown;
                h.consecutive_failures = h.consecutive_failures.max(self.cfg.failures_to_open);
                h.state = State::Open { until: Instant::now() + cooldown };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(id: &str, weight: u32) -> Deployment {
        Deployment { id: id.into(), weight, ..Default::default() }
    }

    fn fail(s: &Selector, id: &str) {
        let _ = s
            .record(id, Outcome::Failed { code: ErrorCode::UpstreamServerError, upstream_status: Some(500) });
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
            s.record(
                "a",
                Outcome::Failed { code: ErrorCode::UpstreamClientError, upstream_status: Some(400) },
            );
        }
        assert!((0..20).all(|_| s.order(&c)[0].id == "a"), "a 400 is the caller's fault: still first");
        s.record("a", Outcome::Failed { code: ErrorCode::Unavailable, upstream_status: Some(401) });
        assert_eq!(s.order(&c)[0].id, "b");
        assert_eq!(s.order(&[dep("a", 1)])[0].id, "a", "alone, an isolated deployment is still tried");
    }
}
