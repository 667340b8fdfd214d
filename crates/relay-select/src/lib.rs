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
//! - **Passive health** ([`stats`]): every answer's time and every failure feed a moving average, a
//!   sliding-window p95 and an error rate per deployment; in the default strategy a deployment keeps
//!   its weight up to twice the group's best p95 and loses it with the square of the ratio beyond (and
//!   with its error rate), so a slowing deployment loses traffic before it fails.
//! - **Model groups**: candidates arrive grouped (the requested group, then its fallback groups); each
//!   group is ordered on its own and a fallback group is tried only after the healthy deployments of the
//!   groups before it.
//!
//! What does not belong here: IO, which deployments exist (routing), credentials (adapter).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use relay_core::ErrorCode;
use relay_core::pb::routing::v1::Deployment;

pub mod stats;
use stats::{Stats, health_factor};

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
    /// Weighted random by `weight` scaled by health (the order given when no candidate has a weight,
    /// with markedly slow or failing deployments moved behind the others).
    #[default]
    Weighted,
    /// The order given, strictly: the first is the primary, the rest fallbacks (breakers still apply).
    Priority,
    /// Cheapest first for this request's token estimate (unpriced deployments last).
    CostFirst,
    /// Fastest first: mean of the moving average and the p95 of time to answer (untried first, to learn).
    LeastLatency,
    /// Lowest score first: `0.35 × cost + 0.35 × latency + 0.2 × error rate + 0.1 × (1 − headroom)`, cost
    /// and latency as shares of the group's highest (unknown latency = 0, unpriced = 1).
    Balanced,
    /// Most headroom on the upstream account's RPM/TPM first (in tenths; weighted among equals).
    Headroom,
}

impl Strategy {
    /// Every name [`Self::parse`] accepts, for error messages.
    pub const NAMES: &'static str = "weighted, priority, cost, latency, balanced, headroom";

    /// `weighted`, `priority`, `cost`, `latency`, `balanced`, `headroom` (the `x-relay-strategy` header,
    /// a key's strategy and the config).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "weighted" => Self::Weighted,
            "priority" => Self::Priority,
            "cost" | "cost-first" => Self::CostFirst,
            "latency" | "least-latency" => Self::LeastLatency,
            "balanced" => Self::Balanced,
            "headroom" => Self::Headroom,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Weighted => "weighted",
            Self::Priority => "priority",
            Self::CostFirst => "cost",
            Self::LeastLatency => "latency",
            Self::Balanced => "balanced",
            Self::Headroom => "headroom",
        }
    }
}

/// How one attempt through a deployment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream accepted the request, after `latency`.
    Answered { latency: Duration },
    /// The upstream (or the way to it) failed; `code` classifies it.
    Failed { code: ErrorCode, upstream_status: Option<u16> },
    /// The upstream answered 429 and said when to come back: isolated until then (at most
    /// `max_cooldown`), on every replica, instead of being hammered through its cool-down.
    Throttled { retry_after: Duration },
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
    /// Passive health per deployment.
    stats: Mutex<HashMap<String, Stats>>,
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

/// One deployment's health as this process sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthView {
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    pub consecutive_failures: u32,
    pub latency_ewma_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub error_rate: f64,
    pub headroom: f64,
    pub attempts: u64,
    pub failures: u64,
}

struct GroupOrder<'a> {
    stats: &'a HashMap<String, Stats>,
    now: Instant,
    strategy: Strategy,
    tokens: (u64, u64),
    out: &'a mut Vec<Deployment>,
    isolated: &'a mut Vec<Deployment>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
            stats: Mutex::new(HashMap::new()),
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
        let group = candidates.first().map(|d| d.group.as_str()).unwrap_or_default();
        let best = out[..healthy]
            .iter()
            .enumerate()
            .filter(|(_, d)| d.group == group)
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
        let availability: Vec<Availability> = {
            let mut health = lock(&self.health);
            candidates.iter().map(|d| self.availability(&mut health, &d.id, now)).collect()
        };
        let stats = lock(&self.stats);
        let (mut out, mut isolated) = (Vec::with_capacity(candidates.len()), Vec::new());
        // Each model group on its own, in the order routing gave the groups.
        let mut start = 0;
        while start < candidates.len() {
            let group = &candidates[start].group;
            let len = candidates[start..].iter().take_while(|d| d.group == *group).count();
            let end = start + len;
            let mut ctx =
                GroupOrder { stats: &stats, now, strategy, tokens, out: &mut out, isolated: &mut isolated };
            self.order_group(&candidates[start..end], &availability[start..end], &mut ctx);
            start = end;
        }
        drop(stats);
        let healthy = out.len();
        out.extend(isolated);
        (out, healthy)
    }

    fn order_group(&self, group: &[Deployment], availability: &[Availability], ctx: &mut GroupOrder<'_>) {
        let mut available: Vec<(&Deployment, &Stats)> = Vec::with_capacity(group.len());
        let fresh = Stats::default();
        for (d, a) in group.iter().zip(availability) {
            match a {
                Availability::Probe => ctx.out.push(d.clone()),
                Availability::Isolated => ctx.isolated.push(d.clone()),
                Availability::Healthy => available.push((d, ctx.stats.get(&d.id).unwrap_or(&fresh))),
            }
        }
        let now = ctx.now;
        let best_p95 = available.iter().filter_map(|(_, s)| s.p95(now)).min_by(f64::total_cmp);
        let factor = |s: &Stats| health_factor(s.p95(now), best_p95, s.error_rate);
        match ctx.strategy {
            Strategy::Priority => {}
            Strategy::CostFirst => available.sort_by_key(|(d, _)| cost_of(d, ctx.tokens)),
            Strategy::LeastLatency => available.sort_by(|(_, a), (_, b)| {
                a.latency_score(now).unwrap_or(0.0).total_cmp(&b.latency_score(now).unwrap_or(0.0))
            }),
            Strategy::Balanced => {
                let max_cost =
                    available.iter().map(|(d, _)| cost_of(d, ctx.tokens)).filter(|c| *c < i128::MAX).max();
                let max_lat = available.iter().filter_map(|(_, s)| s.latency_score(now)).fold(0.0, f64::max);
                let score = |d: &Deployment, s: &Stats| {
                    let cost = match (cost_of(d, ctx.tokens), max_cost) {
                        (i128::MAX, _) => 1.0,
                        (c, Some(m)) if m > 0 => c as f64 / m as f64,
                        _ => 0.0,
                    };
                    let lat = match s.latency_score(now) {
                        Some(l) if max_lat > 0.0 => l / max_lat,
                        _ => 0.0,
                    };
                    0.35 * cost + 0.35 * lat + 0.2 * s.error_rate + 0.1 * (1.0 - s.headroom)
                };
                available.sort_by(|(a, sa), (b, sb)| score(a, sa).total_cmp(&score(b, sb)));
            }
            Strategy::Headroom => {
                let drawn = self.weighted_draw(
                    available.iter().map(|(d, s)| (*d, *s, f64::from(d.weight.max(1)))).collect(),
                );
                available = drawn;
                available.sort_by_key(|(_, s)| std::cmp::Reverse((s.headroom * 10.0).round() as i64));
            }
            Strategy::Weighted if group.iter().all(|d| d.weight == 0) => {
                // Config order, but a deployment that kept under a quarter of its weight goes last.
                available.sort_by_key(|(_, s)| factor(s) < 0.25);
            }
            Strategy::Weighted => {
                available = self.weighted_draw(
                    available.iter().map(|(d, s)| (*d, *s, f64::from(d.weight.max(1)) * factor(s))).collect(),
                );
            }
        }
        ctx.out.extend(available.into_iter().map(|(d, _)| d.clone()));
    }

    /// Weighted draw without replacement.
    fn weighted_draw<'a>(
        &self,
        mut left: Vec<(&'a Deployment, &'a Stats, f64)>,
    ) -> Vec<(&'a Deployment, &'a Stats)> {
        let mut out = Vec::with_capacity(left.len());
        while !left.is_empty() {
            let total: f64 = left.iter().map(|(_, _, w)| w).sum();
            let mut at = self.unit() * total;
            let mut pick = left.len() - 1;
            for (i, (_, _, w)) in left.iter().enumerate() {
                at -= w;
                if at < 0.0 {
                    pick = i;
                    break;
                }
            }
            let (d, s, _) = left.swap_remove(pick);
            out.push((d, s));
        }
        out
    }

    /// Feeds one attempt's outcome into the deployment's breaker; returns the state change, if any, for
    /// the other replicas.
    pub fn record(&self, deployment_id: &str, outcome: Outcome) -> Option<Transition> {
        let mut health = lock(&self.health);
        match outcome {
            Outcome::Answered { latency } => {
                self.with_stats(deployment_id, |s| s.answered(latency, Instant::now()));
                let was_open = health.remove(deployment_id).is_some_and(|h| h.state != State::Closed);
                was_open.then_some(Transition::Closed)
            }
            Outcome::Throttled { retry_after } => {
                self.with_stats(deployment_id, Stats::failed);
                let cooldown = retry_after.clamp(Duration::from_secs(1), self.cfg.max_cooldown);
                let h = health.entry(deployment_id.to_owned()).or_insert(Health {
                    state: State::Closed,
                    consecutive_failures: 0,
                    cooldown,
                });
                h.consecutive_failures += 1;
                let until = Instant::now() + cooldown;
                let was_open_longer = matches!(h.state, State::Open { until: u } if u >= until);
                if was_open_longer {
                    return None;
                }
                h.state = State::Open { until };
                Some(Transition::Opened { cooldown })
            }
            Outcome::Failed { code, upstream_status } => {
                let credential = matches!(upstream_status, Some(401 | 403));
                if !(code.is_retryable() || credential) {
                    return None;
                }
                self.with_stats(deployment_id, Stats::failed);
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

    fn with_stats(&self, id: &str, f: impl FnOnce(&mut Stats)) {
        let mut stats = lock(&self.stats);
        match stats.get_mut(id) {
            Some(s) => f(s),
            None => f(stats.entry(id.to_owned()).or_default()),
        }
    }

    /// The share of a deployment's upstream RPM/TPM left after an admission (0..1), for `headroom`.
    pub fn note_headroom(&self, deployment_id: &str, left: f64) {
        self.with_stats(deployment_id, |s| s.headroom = left.clamp(0.0, 1.0));
    }

    /// What this process knows about a deployment's health, for the admin API.
    pub fn health(&self, deployment_id: &str) -> HealthView {
        let now = Instant::now();
        let breaker = match lock(&self.health).get(deployment_id).map(|h| (h.state, h.consecutive_failures)) {
            None => ("closed", 0),
            Some((State::Closed, n)) => ("closed", n),
            Some((State::Open { until }, n)) if now < until => ("open", n),
            Some((_, n)) => ("half_open", n),
        };
        let stats = lock(&self.stats);
        let s = stats.get(deployment_id).cloned().unwrap_or_default();
        HealthView {
            breaker: breaker.0,
            consecutive_failures: breaker.1,
            latency_ewma_ms: s.ewma_ms,
            p95_ms: s.p95(now),
            error_rate: s.error_rate,
            headroom: s.headroom,
            attempts: s.requests,
            failures: s.failures,
        }
    }

    /// The lowest recent p95 among `candidates` (ms), for load-aware rules; `None` until known.
    pub fn best_p95(&self, candidates: &[Deployment]) -> Option<f64> {
        let now = Instant::now();
        let stats = lock(&self.stats);
        candidates.iter().filter_map(|d| stats.get(&d.id)?.p95(now)).min_by(f64::total_cmp)
    }

    /// A uniform value in `[0, 1)`, for backoff jitter.
    pub fn jitter(&self) -> f64 {
        self.unit()
    }

    /// Failovers the retry budget allows right now.
    pub fn retry_budget_left(&self) -> f64 {
        self.retry_budget.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Applies a state change another replica saw, so every replica isolates (and readmits) together.
    pub fn apply(&self, deployment_id: &str, t: Transition) {
        let mut health = lock(&self.health);
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
mod tests;
