//! Limits shared by every replica through Redis: one atomic Lua script checks every scope and, only if all
//! pass, takes the request, the tokens, a concurrency slot and the budget reservation. Settlement is a
//! second script, run after the answer. When Redis fails, the configured policy decides.

use redis::aio::ConnectionManager;
use relay_core::contracts::{Admission, Denial, Limiter, RateHeaders};
use relay_core::pb::auth::v1::Scope;
use relay_core::{ErrorCode, RelayError};

use crate::{
    LEASE_TTL_MS, MemoryLimiter, OnRedisError, Refusal, Rules, active, denial, headers, i64_of, minute,
    period_key, scope_name,
};

/// KEYS per scope (all of one admission in one Redis Cluster slot, see [`RedisLimiter::keys`]): requests
/// window, tokens window, slots, reserved money, spent money (this period), reservation leases (zset rid →
/// admitted at), reservation amounts (hash rid → cost); then the admission's lease.
/// ARGV: now_ms, request_id, tokens, cost, lease_ttl_ms, then per scope: rpm, tpm, concurrent, budget.
/// Returns {0, requests, tokens} (the first scope's counts after admission) or {refusal, scope, requests, tokens}.
const ADMIT: &str = r#"
local now, rid, tokens, cost, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = (#ARGV - 5) / 4
local first_req, first_tok = 0, 0
for i = 0, n - 1 do
  local rpm, tpm, conc, budget = tonumber(ARGV[6+i*4]), tonumber(ARGV[7+i*4]), tonumber(ARGV[8+i*4]), tonumber(ARGV[9+i*4])
  local k = i * 7
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
    -- Reservations whose settlement never came (a crashed replica) give their money back.
    local stale = redis.call('ZRANGEBYSCORE', KEYS[k+6], '-inf', now - ttl, 'LIMIT', 0, 256)
    for _, r in ipairs(stale) do
      local c = tonumber(redis.call('HGET', KEYS[k+7], r) or '0')
      redis.call('HDEL', KEYS[k+7], r)
      redis.call('ZREM', KEYS[k+6], r)
      if redis.call('DECRBY', KEYS[k+4], c) < 0 then redis.call('SET', KEYS[k+4], 0) end
    end
    local committed = tonumber(redis.call('GET', KEYS[k+4]) or '0') + tonumber(redis.call('GET', KEYS[k+5]) or '0')
    if committed + cost > budget then return {4, i, req, tok} end
  end
end
for i = 0, n - 1 do
  local rpm, tpm, conc, budget = tonumber(ARGV[6+i*4]), tonumber(ARGV[7+i*4]), tonumber(ARGV[8+i*4]), tonumber(ARGV[9+i*4])
  local k = i * 7
  local req = redis.call('INCR', KEYS[k+1]); redis.call('PEXPIRE', KEYS[k+1], 120000)
  local tok = redis.call('INCRBY', KEYS[k+2], tokens); redis.call('PEXPIRE', KEYS[k+2], 120000)
  if i == 0 then first_req, first_tok = req, tok end
  if conc > 0 then redis.call('ZADD', KEYS[k+3], now, rid); redis.call('PEXPIRE', KEYS[k+3], ttl) end
  if budget > 0 then
    redis.call('INCRBY', KEYS[k+4], cost); redis.call('PEXPIRE', KEYS[k+4], ttl)
    redis.call('ZADD', KEYS[k+6], now, rid); redis.call('PEXPIRE', KEYS[k+6], ttl)
    redis.call('HSET', KEYS[k+7], rid, cost); redis.call('PEXPIRE', KEYS[k+7], ttl)
  end
end
redis.call('SET', KEYS[n*7+1], '1', 'PX', ttl)
return {0, first_req, first_tok}
"#;

/// KEYS as ADMIT. ARGV: request_id, reserved tokens, used tokens, real cost, spent ttl ms, then per
/// scope: budget (0 = none). Returns 1 when settled, 0 when Redis holds no lease for the request
/// (settled already, expired, or admitted elsewhere): nothing is given back twice.
const SETTLE: &str = r#"
local rid, reserved, used, cost, spent_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = (#ARGV - 5)
if redis.call('DEL', KEYS[n*7+1]) == 0 then return 0 end
for i = 0, n - 1 do
  local k = i * 7
  if redis.call('EXISTS', KEYS[k+2]) == 1 then
    if redis.call('INCRBY', KEYS[k+2], used - reserved) < 0 then redis.call('SET', KEYS[k+2], 0, 'KEEPTTL') end
  end
  redis.call('ZREM', KEYS[k+3], rid)
  if tonumber(ARGV[6+i]) > 0 then
    if redis.call('ZREM', KEYS[k+6], rid) == 1 then
      local c = tonumber(redis.call('HGET', KEYS[k+7], rid) or '0')
      redis.call('HDEL', KEYS[k+7], rid)
      if redis.call('DECRBY', KEYS[k+4], c) < 0 then redis.call('SET', KEYS[k+4], 0, 'KEEPTTL') end
    end
    redis.call('INCRBY', KEYS[k+5], cost)
    if spent_ttl > 0 then redis.call('PEXPIRE', KEYS[k+5], spent_ttl) end
  end
end
return 1
"#;

/// How often a replica tells Redis it is alive (for fail-open shares), and how long it counts as live.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);
const LIVE_FOR_MS: i64 = 15_000;

pub struct RedisLimiter {
    conn: ConnectionManager,
    timeout: std::time::Duration,
    prefix: String,
    on_error: OnRedisError,
    /// Stands in while Redis is unreachable (fail-open), enforcing this replica's share of each limit.
    fallback: MemoryLimiter,
    /// Replicas seen alive through Redis lately (this one included): the fail-open share.
    replicas: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// This replica's name in the live set.
    me: String,
    admit: redis::Script,
    settle: redis::Script,
    seeder: Option<crate::seed::Seeder>,
}

impl RedisLimiter {
    /// The response cache's store, on this limiter's connection and prefix.
    pub fn answer_cache(&self) -> crate::answer_cache::RedisAnswerCache {
        crate::answer_cache::RedisAnswerCache {
            conn: self.conn.clone(),
            prefix: self.prefix.clone(),
            timeout: self.timeout,
        }
    }

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
        // The configured timeout is the one that applies: the connection manager's own response timeout
        // (500 ms by default) would otherwise fail calls a slow Redis still answers in time.
        let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(timeout));
        let conn = client.get_connection_manager_with_config(config).await?;
        let replicas = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1));
        let me = relay_core::ids::new_request_id();
        tokio::spawn(heartbeat_loop(
            conn.clone(),
            format!("{prefix}:replicas"),
            me.clone(),
            replicas.clone(),
        ));
        Ok(Self {
            conn,
            timeout,
            prefix: prefix.to_owned(),
            on_error,
            fallback: MemoryLimiter::new(),
            replicas,
            me,
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
        self.seeder = Some(crate::seed::Seeder::new(billing.clone(), Some(recheck)));
        // Standing in for Redis, budgets start from the books too, not from zero.
        self.fallback = MemoryLimiter::new().with_ledger(billing);
        self
    }

    /// Makes sure every budget counter of the admission exists, from the ledger where it does not.
    async fn seed(&self, a: &Admission, scopes: &[(&Scope, Rules)]) -> Result<(), Denial> {
        let Some(seeder) = &self.seeder else { return Ok(()) };
        for (s, r) in scopes.iter().filter(|(_, r)| r.budget > 0) {
            let name = scope_name(s);
            let [.., counter, _, _] = scope_keys(&self.prefix, &slot_tag(a), &name, r, a.at_ms);
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

    /// Registers this replica as alive now and refreshes the live count (the heartbeat task does this
    /// every few seconds; callers may too).
    pub async fn heartbeat(&self) {
        beat(&mut self.conn.clone(), &format!("{}:replicas", self.prefix), &self.me, &self.replicas).await;
    }

    fn redis_failed(&self, e: &redis::RedisError) {
        metrics::counter!("relay_limits_redis_errors_total").increment(1);
        tracing::warn!(error = %e, policy = ?self.on_error, "rate-limit store unreachable");
    }
}

/// The hash tag of an admission's keys: its org scope, else its first scope (a deployment's own limits).
fn slot_tag(a: &Admission) -> String {
    use relay_core::pb::auth::v1::ScopeKind;
    a.scopes
        .iter()
        .find(|s| s.kind == ScopeKind::Org as i32)
        .or_else(|| a.scopes.first())
        .map(scope_name)
        .unwrap_or_default()
}

/// Tells Redis every [`HEARTBEAT`] that this replica is alive, until the limiter is dropped.
async fn heartbeat_loop(
    mut conn: ConnectionManager,
    key: String,
    me: String,
    replicas: std::sync::Arc<std::sync::atomic::AtomicU32>,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    while std::sync::Arc::strong_count(&replicas) > 1 {
        tick.tick().await;
        beat(&mut conn, &key, &me, &replicas).await;
    }
}

/// One heartbeat: this replica alive now, the others seen within [`LIVE_FOR_MS`] counted.
async fn beat(conn: &mut ConnectionManager, key: &str, me: &str, replicas: &std::sync::atomic::AtomicU32) {
    let now = relay_core::ids::now_ms();
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD").arg(key).arg(now).arg(me).ignore();
    pipe.cmd("ZREMRANGEBYSCORE").arg(key).arg("-inf").arg(now - LIVE_FOR_MS).ignore();
    pipe.cmd("PEXPIRE").arg(key).arg(LIVE_FOR_MS * 2).ignore();
    pipe.cmd("ZCARD").arg(key);
    let call = tokio::time::timeout(HEARTBEAT, pipe.query_async::<(u32,)>(conn)).await;
    // While Redis is down the last count stands: that is the share each replica falls back to.
    if let Ok(Ok((n,))) = call {
        replicas.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }
}

/// A scope's keys. Every key of one admission carries the same hash tag ([`slot_tag`]), so a script's
/// keys share one Redis Cluster slot.
fn scope_keys(p: &str, tag: &str, name: &str, r: &Rules, at_ms: i64) -> [String; 7] {
    let m = minute(at_ms);
    [
        format!("{p}:rl:{{{tag}}}:{name}:req:{m}"),
        format!("{p}:rl:{{{tag}}}:{name}:tok:{m}"),
        format!("{p}:rl:{{{tag}}}:{name}:slots"),
        format!("{p}:bg:{{{tag}}}:{name}:reserved"),
        format!("{p}:bg:{{{tag}}}:{name}:spent:{}", period_key(r.period, at_ms)),
        format!("{p}:bg:{{{tag}}}:{name}:leases"),
        format!("{p}:bg:{{{tag}}}:{name}:held"),
    ]
}

/// Every key one admission's scripts touch, in script order: each scope's, then the admission's lease.
fn script_keys(prefix: &str, a: &Admission, scopes: &[(&Scope, Rules)]) -> Vec<String> {
    let tag = slot_tag(a);
    let mut keys: Vec<String> =
        scopes.iter().flat_map(|(s, r)| scope_keys(prefix, &tag, &scope_name(s), r, a.at_ms)).collect();
    keys.push(format!("{prefix}:lease:{{{tag}}}:{}", a.request_id));
    keys
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
        for k in script_keys(&self.prefix, a, &scopes) {
            inv.key(k);
        }
        inv.arg(a.at_ms).arg(&a.request_id).arg(i64_of(a.tokens)).arg(a.cost_micros.max(0)).arg(LEASE_TTL_MS);
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
                    OnRedisError::FailOpen => {
                        self.fallback.set_share(self.replicas.load(std::sync::atomic::Ordering::Relaxed));
                        self.fallback.admit(a).await
                    }
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
            let [.., spent, _, _] = scope_keys(&self.prefix, &slot_tag(a), &scope_name(s), r, a.at_ms);
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
        // The store that admitted the request releases it: an admission made while Redis was down is
        // settled in memory even if Redis is back.
        if self.fallback.holds(&a.request_id) {
            return self.fallback.settle(a, tokens, cost_micros).await;
        }
        let scopes = active(a);
        if scopes.is_empty() {
            return;
        }
        let mut inv = self.settle.prepare_invoke();
        for k in script_keys(&self.prefix, a, &scopes) {
            inv.key(k);
        }
        let ttl = scopes.iter().map(|(_, r)| spent_ttl_ms(r)).max().unwrap_or(0);
        inv.arg(&a.request_id).arg(i64_of(a.tokens)).arg(i64_of(tokens)).arg(cost_micros.max(0)).arg(ttl);
        for (_, r) in &scopes {
            inv.arg(r.budget);
        }
        let mut conn = self.conn.clone();
        let call = tokio::time::timeout(self.timeout, inv.invoke_async::<i64>(&mut conn)).await;
        if let Err(e) = call.unwrap_or_else(|_| Err(timed_out())) {
            // The reservation stays in Redis and expires with its lease; the spend is booked by billing
            // and rebuilt into the counter from the ledger.
            self.redis_failed(&e);
        }
    }
}

#[cfg(test)]
mod tests {
    use relay_core::pb::auth::v1::{Budget, Limits, ScopeKind};

    use super::*;

    /// Redis Cluster's slot of a key: CRC16/XMODEM of its hash tag (or of the whole key), mod 16384.
    fn slot(key: &str) -> u16 {
        let tagged = key.find('{').and_then(|o| {
            let rest = &key[o + 1..];
            rest.find('}').filter(|c| *c > 0).map(|c| &rest[..c])
        });
        let mut crc: u16 = 0;
        for b in tagged.unwrap_or(key).bytes() {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            }
        }
        crc % 16384
    }

    fn scope(kind: ScopeKind, id: &str) -> Scope {
        let money = relay_core::pb::common::v1::Money { micros: 10, currency: "USD".into() };
        Scope {
            kind: kind as i32,
            id: id.into(),
            limits: Some(Limits { requests_per_minute: 5, tokens_per_minute: 100, max_concurrent: 2 }),
            budget: Some(Budget { limit: Some(money), period: 1 }),
        }
    }

    fn admission(scopes: Vec<Scope>) -> Admission {
        Admission { request_id: "r1".into(), at_ms: 1_800_000_000_000, scopes, tokens: 1, cost_micros: 1 }
    }

    #[test]
    fn every_key_of_one_script_call_is_in_one_cluster_slot() {
        assert_eq!(slot("123456789"), 0x31C3, "the CRC16 of the Redis Cluster spec");
        for scopes in [
            vec![scope(ScopeKind::Key, "k1"), scope(ScopeKind::Team, "t1"), scope(ScopeKind::Org, "o1")],
            vec![scope(ScopeKind::Org, "o2"), scope(ScopeKind::Key, "k2")],
            vec![scope(ScopeKind::Deployment, "gpt@openai")],
        ] {
            let a = admission(scopes);
            let rules = active(&a);
            let keys = script_keys("relay", &a, &rules);
            assert_eq!(keys.len(), rules.len() * 7 + 1);
            let slots: std::collections::BTreeSet<u16> = keys.iter().map(|k| slot(k)).collect();
            assert_eq!(slots.len(), 1, "{keys:?}");
        }
        // The same team scope reached through two keys of its org lands in the same counters.
        let team = |key: &str| {
            admission(vec![
                scope(ScopeKind::Key, key),
                scope(ScopeKind::Team, "t"),
                scope(ScopeKind::Org, "o"),
            ])
        };
        let (a1, a2) = (team("k1"), team("k2"));
        assert_eq!(script_keys("p", &a1, &active(&a1))[7], script_keys("p", &a2, &active(&a2))[7]);
    }
}
