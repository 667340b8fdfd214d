//! The response cache's shared store: answers in Redis under the limiter's prefix, with their TTL, on the
//! limiter's connection. Every replica of the edge sees the same entries. A Redis that is slow or down
//! is a miss (the request goes upstream), never an error.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;

/// Largest answer kept (bigger ones go upstream every time).
const MAX_ENTRY: usize = 4 << 20;

#[derive(Clone)]
pub struct RedisAnswerCache {
    pub(crate) conn: ConnectionManager,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
}

#[async_trait::async_trait]
impl relay_core::contracts::AnswerCache for RedisAnswerCache {
    async fn get(&self, key: &str) -> Option<Bytes> {
        let mut conn = self.conn.clone();
        let key = format!("{}:answer:{key}", self.prefix);
        let mut cmd = redis::cmd("GET");
        cmd.arg(&key);
        match tokio::time::timeout(self.timeout, cmd.query_async::<Option<Vec<u8>>>(&mut conn)).await {
            Ok(Ok(v)) => v.map(Bytes::from),
            _ => {
                metrics::counter!("relay_limits_redis_errors_total").increment(1);
                None
            }
        }
    }

    async fn put(&self, key: &str, value: Bytes, ttl: Duration) {
        if value.len() > MAX_ENTRY || ttl.is_zero() {
            return;
        }
        let mut conn = self.conn.clone();
        let key = format!("{}:answer:{key}", self.prefix);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(value.as_ref()).arg("EX").arg(ttl.as_secs().max(1));
        if !matches!(tokio::time::timeout(self.timeout, cmd.query_async::<()>(&mut conn)).await, Ok(Ok(()))) {
            metrics::counter!("relay_limits_redis_errors_total").increment(1);
        }
    }
}
