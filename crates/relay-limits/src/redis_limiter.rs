//! Limits shared by every replica through Redis: one atomic Lua script checks every scope and, only if all
//! pass, takes the request, the tokens, a concurrency slot and the budget reservation. Settlement is a
//! second script, run after the answer. When Redis fails, the configured policy decides.

use redis::aio::ConnectionManager;
use relay_core::contracts::{Admission, Denial, Limiter, RateHeaders};
use relay_core::{ErrorCode, RelayError};

use crate::{
    MemoryLimiter, OnRedisError, Refusal, Rules, SLOT_TTL_MS, active, denial, headers, i64_of, minute,
    period_key, scope_name,
};

/// KEYS per scope: requests window, tokens window, slots, reserved money, spent money (this period).
/// ARGV: now_ms, request_id, tokens, cost, slot_ttl_ms, then per scope: rpm, tpm, concurrent, budget.
/// Returns {0, requests, tokens} (the first scope's counts after admission) or {refusal, scope, requests, tokens}.
const ADMIT: &str = r#"
local now, rid, tokens, cost, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = (#ARGV - 5) / 4
local first_req, first_tok = 0, 0
for i = 0, n - 1 do
  local rpm, tpm, conc, budget = tonumber(ARGV[6+i*4]), tonumber(ARGV[7+i*4]), tonumber(ARGV[8+i*4]), tonumber(ARGV[9+i*4])
  local k = i * 5
  local req = tonumber(redis.call('GET', KEYS[k+1]) or '0')
  local tok = tonumber(redis.call('GET', KEYS[k+2]) or '0')
  if i == 0 then first_req, first_tok = req, tok end
  if rpm > 0 and req + 1 > rpm then return {1, i, req, tok} end
  if tpm > 0 and tok + tokens > tpm then return {2, i, req, tok} end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k+3], '-inf', now - ttl)
    if redis.call('ZCARD', KEYS[k+3]) + 1 > conc then return {3, i, req, tok} end
  end
  if budget > 0 then
    local committed = tonumber(redis.call('GET', KEYS[k+4]) or '0') + tonumber(redis.call('GET', KEYS[k+5]) or '0')
    if committed + cost > budget then return {4, i, req, tok} end
  end
end
for i = 0, n - 1 do
  local rpm, tpm, conc, budget = tonumber(ARGV[6+i*4]), tonumber(ARGV[7+i*4]), tonumber(ARGV[8+i*4]), tonumber(ARGV[9+i*4])
  local k = i * 5
  local req = redis.call('INCR', KEYS[k+1]); redis.call('PEXPIRE', KEYS[k+1], 120000)
  local tok = redis.call('INCRBY', KEYS[k+2], tokens); redis.call('PEXPIRE', KEYS[k+2], 120000)
  if i == 0 then first_req, first_tok = req, tok end
  if conc > 0 then redis.call('ZADD', KEYS[k+3], now, rid); redis.call('PEXPIRE', KEYS[k+3], ttl) end
  if budget > 0 then redis.call('INCRBY', KEYS[k+4], cost); redis.call('PEXPIRE', KEYS[k+4], 900000) end
end
return {0, first_req, first_tok}
"#;

/// KEYS as ADMIT. ARGV: request_id, reserved tokens, used tokens, reserved cost, real cost, spent ttl ms,
/// then per scope: budget (0 = none).
const SETTLE: &str = r#"
local rid, reserved, used, rcost, cost, spent_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local n = (#ARGV - 6)
for i = 0, n - 1 do
  local k = i * 5
  if redis.call('EXISTS', KEYS[k+2]) == 1 then redis.call('INCRBY', KEYS[k+2], used - reserved) end
  redis.call('ZREM', KEYS[k+3], rid)
  if tonumber(ARGV[7+i]) > 0 then
    local left = redis.call('DECRBY', KEYS[k+4], rcost)
    if left < 0 then redis.call('SET', KEYS[k+4], 0) end
    redis.call('INCRBY', KEYS[k+5], cost)
    if spent_ttl > 0 then redis.call('PEXPIRE', KEYS[k+5], spent_ttl) end
  end
end
return 0
"#;

pub struct RedisLimiter {
    conn: ConnectionManager,
    timeout: std::time::Duration,
    prefix: String,
    on_error: OnRedisError,
    fallback: MemoryLimiter,
    admit: redis::Script,
    settle: redis::Script,
    seeder: Option<crate::seed::Seeder>,
}

impl RedisLimiter {
    pub async fn connect(url: &str, prefix: &str, on_error: OnRedisError) -> anyhow::Result<Self> {
        Self::connect_with_timeout(url, prefix, on_error, std::time::Duration::from_millis(250)).await
    }

    /// `timeout`: longest wait for one Redis call before the outage policy applies.
    pub async fn connect_with_timeout(
        url: &str,
        prefix: &str,
        on_error: OnRedisError,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Self> {
        // Admissions and settlements are small writes back to back on one multiplexed connection:
        // without TCP_NODELAY, Nagle holds one behind the other's ACK (~0.3 ms a request was measured).
        use redis::IntoConnectionInfo as _;
        let info = url
            .into_connection_info()?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info)?;
        let conn = client.get_connection_manager().await?;
        Ok(Self {
            conn,
            timeout,
            prefix: prefix.to_owned(),
            on_error,
            fallback: MemoryLimiter::new(),
            admit: redis::Script::new(ADMIT),
            settle: redis::Script::new(SETTLE),
            seeder: None,
        })
    }

    /// Rebuilds missing budget counters from billing's books (after a start, or Redis losing data).
    pub fn with_ledger(self, billing: std::sync::Arc<dyn relay_core::contracts::Billing>) -> Self {
        self.with_ledger_every(billing, crate::seed::RECHECK)
    }

    /// As [`Self::with_ledger`], looking again after `recheck` whether Redis still holds each counter.
    pub fn with_ledger_every(
        mut self,
        billing: std::sync::Arc<dyn relay_core::contracts::Billing>,
        recheck: std::time::Duration,
    ) -> Self {
        self.seeder = Some(crate::seed::Seeder::new(billing, Some(recheck)));
        self
    }

    /// Makes sure every budget counter of the admission exists, from the ledger where it does not.
    async fn seed(
        &self,
        a: &Admission,
        scopes: &[(&relay_core::pb::auth::v1::Scope, Rules)],
    ) -> Result<(), Denial> {
        let Some(seeder) = &self.seeder else { return Ok(()) };
        for (s, r) in scopes.iter().filter(|(_, r)| r.budget > 0) {
            let name = scope_name(s);
            let [.., counter] = self.keys(&name, r, a.at_ms);
            if !seeder.due(&counter) {
                continue;
            }
            let mut conn = self.conn.clone();
            let mut exists = redis::cmd("EXISTS");
            exists.arg(&counter);
            match tokio::time::timeout(self.timeout, exists.query_async::<i64>(&mut conn)).await {
                Ok(Ok(1)) => seeder.done(counter),
                Ok(Ok(_)) => match seeder.spent(&name, r.period, a.at_ms).await {
                    Ok(spent) => {
                        let mut set = redis::cmd("SET");
                        set.arg(&counter).arg(spent).arg("NX");
                        let ttl = spent_ttl_ms(r);
                        if ttl > 0 {
                            set.arg("PX").arg(ttl);
                        }
                        if let Ok(Ok(())) =
                            tokio::time::timeout(self.timeout, set.query_async::<()>(&mut conn)).await
                        {
                            metrics::counter!("relay_limits_budget_rebuilt_total").increment(1);
                            tracing::info!(scope = %name, spent, "budget counter rebuilt from the ledger");
                            seeder.done(counter);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(scope = %name, error = %e, "budget counter missing and the ledger unreadable");
                        if self.on_error == OnRedisError::FailClosed {
                            return Err(crate::seed::unavailable());
                        }
                    }
                },
                // Redis itself is failing: the admission below applies the outage policy.
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn keys(&self, name: &str, r: &Rules, at_ms: i64) -> [String; 5] {
        let (p, m) = (&self.prefix, minute(at_ms));
        // One hash tag per scope keeps a scope's keys in one Redis Cluster slot.
        [
            format!("{p}:rl:{{{name}}}:req:{m}"),
            format!("{p}:rl:{{{name}}}:tok:{m}"),
            format!("{p}:rl:{{{name}}}:slots"),
            format!("{p}:bg:{{{name}}}:reserved"),
            format!("{p}:bg:{{{name}}}:spent:{}", period_key(r.period, at_ms)),
        ]
    }

    fn redis_failed(&self, e: &redis::RedisError) {
        metrics::counter!("relay_limits_redis_errors_total").increment(1);
        tracing::warn!(error = %e, policy = ?self.on_error, "rate-limit store unreachable");
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "redis call timed out"))
}

fn spent_ttl_ms(r: &Rules) -> i64 {
    use relay_core::pb::auth::v1::BudgetPeriod;
    match r.period {
        BudgetPeriod::Daily => 2 * 86_400_000,
        BudgetPeriod::Monthly => 40 * 86_400_000,
        BudgetPeriod::Total | BudgetPeriod::Prepaid | BudgetPeriod::Unspecified => 0,
    }
}

impl RedisLimiter {
    async fn admit_once(&self, a: &Admission) -> Result<RateHeaders, Denial> {
        let mut scopes = active(a);
        if scopes.is_empty() {
            return Ok(Vec::new());
        }
        crate::seed::apply_prepaid(self.seeder.as_ref(), a, &mut scopes).await?;
        self.seed(a, &scopes).await?;
        let mut inv = self.admit.prepare_invoke();
        for (s, r) in &scopes {
            for k in self.keys(&scope_name(s), r, a.at_ms) {
                inv.key(k);
            }
        }
        inv.arg(a.at_ms).arg(&a.request_id).arg(i64_of(a.tokens)).arg(a.cost_micros).arg(SLOT_TTL_MS);
        for (_, r) in &scopes {
            inv.arg(r.rpm).arg(r.tpm).arg(r.concurrent).arg(r.budget);
        }
        let mut conn = self.conn.clone();
        let call = tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await;
        let out: Vec<i64> = match call.unwrap_or_else(|_| Err(timed_out())) {
            Ok(v) => v,
            Err(e) => {
                self.redis_failed(&e);
                return match self.on_error {
                    OnRedisError::FailOpen => self.fallback.admit(a).await,
                    OnRedisError::FailClosed => Err(Denial {
                        error: RelayError::new(
                            ErrorCode::Unavailable,
                            "Rate limiting is unavailable; try again shortly.",
                        ),
                        headers: Vec::new(),
                    }),
                };
            }
        };
        let first = &scopes[0].1;
        match out.as_slice() {
            [0, req, tok] => Ok(headers(first, *req, *tok, a.at_ms)),
            [why, i, req, tok] => {
                let why = match why {
                    1 => Refusal::Requests,
                    2 => Refusal::Tokens,
                    3 => Refusal::Concurrency,
                    _ => Refusal::Budget,
                };
                let (scope, rules) = scopes[usize::try_from(*i).unwrap_or(0).min(scopes.len() - 1)];
                Err(denial(scope, why, a.at_ms, headers(&rules, *req, *tok, a.at_ms)))
            }
            other => {
                tracing::error!(?other, "unexpected answer from the admission script");
                Err(Denial { error: RelayError::internal("rate limiting failed"), headers: Vec::new() })
            }
        }
    }
}

#[async_trait::async_trait]
impl Limiter for RedisLimiter {
    async fn admit(&self, a: &Admission) -> Result<RateHeaders, Denial> {
        let first = self.admit_once(a).await;
        if crate::seed::worth_retrying(self.seeder.as_ref(), a, &first) {
            self.admit_once(a).await
        } else {
            first
        }
    }

    async fn budget_used(&self, a: &Admission) -> Option<f64> {
        let scopes = crate::budgeted(self.seeder.as_ref(), a).await?;
        let mut get = redis::cmd("MGET");
        for (s, r) in &scopes {
            let [.., spent] = self.keys(&scope_name(s), r, a.at_ms);
            get.arg(spent);
        }
        let mut conn = self.conn.clone();
        let spent: Vec<Option<i64>> =
            match tokio::time::timeout(self.timeout, get.query_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    self.redis_failed(&e);
                    return self.fallback.budget_used(a).await;
                }
                Err(_) => return self.fallback.budget_used(a).await,
            };
        scopes.iter().zip(spent).map(|((_, r), s)| s.unwrap_or(0) as f64 / r.budget as f64).reduce(f64::max)
    }

    async fn settle(&self, a: &Admission, tokens: u64, cost_micros: i64) {
        let scopes = active(a);
        if scopes.is_empty() {
            return;
        }
        let mut inv = self.settle.prepare_invoke();
        for (s, r) in &scopes {
            for k in self.keys(&scope_name(s), r, a.at_ms) {
                inv.key(k);
            }
        }
        let ttl = scopes.iter().map(|(_, r)| spent_ttl_ms(r)).max().unwrap_or(0);
        inv.arg(&a.request_id)
            .arg(i64_of(a.tokens))
            .arg(i64_of(tokens))
            .arg(a.cost_micros)
            .arg(cost_micros)
            .arg(ttl);
        for (_, r) in &scopes {
            inv.arg(r.budget);
        }
        let mut conn = self.conn.clone();
        let call = tokio::time::timeout(self.timeout, inv.invoke_async::<i64>(&mut conn)).await;
        if let Err(e) = call.unwrap_or_else(|_| Err(timed_out())) {
            self.redis_failed(&e);
            // The fallback only knows what it admitted itself; settling there keeps it consistent.
            self.fallback.settle(a, tokens, cost_micros).await;
        }
    }
}
