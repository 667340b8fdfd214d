//! Passive health of one deployment, from the attempts made through it: a moving average and the p95 of
//! time to answer over a sliding window, a moving error rate, and the headroom its upstream account
//! reported last (shared limits, so every replica sees the same).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Latency samples kept per deployment, and how long one counts.
const WINDOW_SAMPLES: usize = 64;
pub const WINDOW: Duration = Duration::from_secs(30);
/// Samples needed before latency judges a deployment.
const MIN_SAMPLES: usize = 5;
/// Weight of the newest sample in the moving averages.
const LATENCY_ALPHA: f64 = 0.3;
const ERROR_ALPHA: f64 = 0.2;

#[derive(Debug, Clone)]
pub struct Stats {
    /// Moving average of time to answer, ms (`None` until the first answer).
    pub ewma_ms: Option<f64>,
    window: VecDeque<(Instant, f32)>,
    /// p95 of the window (its median under 20 samples), ms (0 = too few samples).
    p95_ms: f64,
    /// Moving share of failed attempts (0..1).
    pub error_rate: f64,
    /// Share of the upstream account's limits left after the latest admission (1 = plenty or none).
    pub headroom: f64,
    pub requests: u64,
    pub failures: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            ewma_ms: None,
            window: VecDeque::new(),
            p95_ms: 0.0,
            error_rate: 0.0,
            headroom: 1.0,
            requests: 0,
            failures: 0,
        }
    }
}

impl Stats {
    pub fn answered(&mut self, latency: Duration, now: Instant) {
        let ms = latency.as_secs_f64() * 1000.0;
        self.ewma_ms = Some(self.ewma_ms.map_or(ms, |e| LATENCY_ALPHA * ms + (1.0 - LATENCY_ALPHA) * e));
        if self.window.len() == WINDOW_SAMPLES {
            self.window.pop_front();
        }
        self.window.push_back((now, ms as f32));
        self.p95_ms = self.recompute_p95(now);
        self.error_rate *= 1.0 - ERROR_ALPHA;
        self.requests += 1;
    }

    pub fn failed(&mut self) {
        self.error_rate = ERROR_ALPHA + (1.0 - ERROR_ALPHA) * self.error_rate;
        self.requests += 1;
        self.failures += 1;
    }

    fn recompute_p95(&mut self, now: Instant) -> f64 {
        while self.window.front().is_some_and(|(at, _)| now.duration_since(*at) > WINDOW) {
            self.window.pop_front();
        }
        // Too few samples say nothing (one cold connection is not a trend); under 20, the median
        // stands in for the p95, so one outlier does not condemn a deployment for a whole window.
        if self.window.len() < MIN_SAMPLES {
            return 0.0;
        }
        // On the stack: this runs once per answer, on the request path.
        let mut buf = [0f32; WINDOW_SAMPLES];
        let n = self.window.len();
        for (slot, (_, ms)) in buf.iter_mut().zip(&self.window) {
            *slot = *ms;
        }
        let v = &mut buf[..n];
        let q = if n < 20 { 50 } else { 95 };
        let rank = (n * q).div_ceil(100).saturating_sub(1);
        let (_, p, _) = v.select_nth_unstable_by(rank, f32::total_cmp);
        f64::from(*p)
    }

    /// The p95 of recent answers, ms, or `None` when the newest sample is older than the window (a
    /// deployment that lost its traffic for being slow is judged afresh).
    pub fn p95(&self, now: Instant) -> Option<f64> {
        let newest = self.window.back()?;
        (now.duration_since(newest.0) <= WINDOW && self.p95_ms > 0.0).then_some(self.p95_ms)
    }

    /// What the latency strategy compares: the mean of the moving average and the recent p95.
    pub fn latency_score(&self, now: Instant) -> Option<f64> {
        let e = self.ewma_ms?;
        Some(self.p95(now).map_or(e, |p| 0.5 * e + 0.5 * p))
    }
}

/// Latencies this close are noise, not a health difference: the reference p95 is at least this.
const LATENCY_FLOOR_MS: f64 = 50.0;

/// How much of its weight a deployment keeps for its health, relative to the group's best p95 (at least
/// 50 ms): full weight up to twice that reference, then falling with the square of the ratio (4× slower
/// keeps 1/4, 10× keeps 1/25), times the square of its success rate; never below 2 % while it is not
/// isolated, so a recovery is seen. A deployment whose p95 rises thus loses traffic before it fails.
pub fn health_factor(p95: Option<f64>, best_p95: Option<f64>, error_rate: f64) -> f64 {
    let latency = match (p95, best_p95) {
        (Some(p), Some(best)) => {
            let reference = 2.0 * best.max(LATENCY_FLOOR_MS);
            if p > reference { (reference / p).powi(2) } else { 1.0 }
        }
        _ => 1.0,
    };
    (latency * (1.0 - error_rate).powi(2)).clamp(0.02, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_follows_the_window() {
        let mut s = Stats::default();
        let t = Instant::now();
        for i in 1..=100u64 {
            s.answered(Duration::from_millis(i), t);
        }
        // The window keeps the newest 64 (37..=100): its p95 is the 61st of them.
        assert_eq!(s.p95(t), Some(97.0));
        assert!(s.p95(t + WINDOW + Duration::from_secs(1)).is_none(), "stale samples say nothing");
        assert_eq!(health_factor(Some(97.0), Some(97.0), 0.0), 1.0);
        assert!((health_factor(Some(400.0), Some(100.0), 0.0) - 0.25).abs() < 1e-9);
        assert_eq!(health_factor(Some(100_000.0), Some(1.0), 0.0), 0.02);
        for _ in 0..10 {
            s.failed();
        }
        assert!(s.error_rate > 0.85 && health_factor(None, None, s.error_rate) < 0.03);
    }
}
