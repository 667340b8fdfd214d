//! `usage_records` queries, for Postgres and SQLite. Same SQL text; SQLite gets `?N` placeholders.

use prost::Message as _;
use relay_core::pb::billing::v1::UsageSummaryResponse;
use relay_core::pb::common::v1::{ErrorCode as PbErrorCode, Protocol, TokenUsage};
use relay_core::pb::events::v1::{Outcome, UsageEvent};
use relay_db::Db;
use sqlx::Row;

#[derive(Clone, Debug)]
pub struct UsageStore {
    db: Db,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    Inserted,
    Duplicate,
}

impl RecordOutcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Inserted => "inserted",
            Self::Duplicate => "duplicate",
        }
    }
}

const INSERT: &str = "INSERT INTO usage_records (request_id, schema_version, key_id, team_id, org_id, end_user, \
    model, deployment_id, provider, upstream_model, protocol, stream, input_tokens, output_tokens, \
    cached_input_tokens, cache_write_tokens, reasoning_tokens, outcome, error_code, http_status, started_at_ms, \
    duration_ms, ttfb_ms, attempts, recorded_at_ms, event, cost_micros, currency) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
    $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28) ON CONFLICT (request_id) DO NOTHING";

const GET: &str = "SELECT event FROM usage_records WHERE request_id = $1";

// Postgres sums BIGINT into NUMERIC; the casts keep every column an i64 on both backends.
const SUMMARY: &str = "SELECT COUNT(*) AS requests, \
    CAST(COALESCE(SUM(CASE WHEN outcome = 'success' THEN 0 ELSE 1 END), 0) AS BIGINT) AS failed, \
    CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens, \
    CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens, \
    CAST(COALESCE(SUM(cached_input_tokens), 0) AS BIGINT) AS cached, \
    CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT) AS cache_write, \
    CAST(COALESCE(SUM(reasoning_tokens), 0) AS BIGINT) AS reasoning \
    FROM usage_records WHERE key_id = $1 AND started_at_ms >= $2 AND started_at_ms < $3";

fn outcome_label(o: i32) -> &'static str {
    match Outcome::try_from(o).unwrap_or(Outcome::Unspecified) {
        Outcome::Success => "success",
        Outcome::Error => "error",
        Outcome::Cancelled => "cancelled",
        Outcome::Unspecified => "unspecified",
    }
}

fn protocol_label(p: i32) -> &'static str {
    match Protocol::try_from(p).unwrap_or(Protocol::Unspecified) {
        Protocol::OpenaiChat => "openai_chat",
        Protocol::OpenaiEmbeddings => "openai_embeddings",
        Protocol::AnthropicMessages => "anthropic_messages",
        Protocol::OpenaiResponses => "openai_responses",
        Protocol::Unspecified => "unspecified",
    }
}

fn error_label(code: i32) -> &'static str {
    if code == PbErrorCode::Unspecified as i32 { "" } else { relay_core::ErrorCode::from_pb(code).as_str() }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Binds the 26 insert parameters in order, for either backend's query type.
macro_rules! bind_insert {
    ($q:expr, $e:expr, $u:expr, $now:expr, $blob:expr) => {
        $q.bind(&$e.request_id)
            .bind(i64::from($e.schema_version))
            .bind(&$e.key_id)
            .bind(&$e.team_id)
            .bind(&$e.org_id)
            .bind(&$e.end_user)
            .bind(&$e.model)
            .bind(&$e.deployment_id)
            .bind(&$e.provider)
            .bind(&$e.upstream_model)
            .bind(protocol_label($e.protocol))
            .bind($e.stream)
            .bind(i64_of($u.input_tokens))
            .bind(i64_of($u.output_tokens))
            .bind(i64_of($u.cached_input_tokens))
            .bind(i64_of($u.cache_write_tokens))
            .bind(i64_of($u.reasoning_tokens))
            .bind(outcome_label($e.outcome))
            .bind(error_label($e.error_code))
            .bind(i64::from($e.http_status))
            .bind($e.started_at_unix_ms)
            .bind(i64_of($e.duration_ms))
            .bind(i64_of($e.time_to_first_byte_ms))
            .bind(i64::from($e.attempts))
            .bind($now)
            .bind($blob)
            .bind($e.cost.as_ref().map_or(0, |c| c.micros))
            .bind($e.cost.as_ref().map_or("USD", |c| c.currency.as_str()))
    };
}

/// The seven integer columns of a summary row; a type mismatch is an error, never a silent zero.
fn columns<R: Row>(r: &R) -> anyhow::Result<[i64; 7]>
where
    usize: sqlx::ColumnIndex<R>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let mut out = [0i64; 7];
    for (i, v) in out.iter_mut().enumerate() {
        *v = r.try_get(i)?;
    }
    Ok(out)
}

impl UsageStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Inserts the record unless one with this request id exists (then nothing changes).
    pub async fn record(&self, e: &UsageEvent) -> anyhow::Result<RecordOutcome> {
        let u = e.usage.unwrap_or_default();
        let now = chrono::Utc::now().timestamp_millis();
        let blob = e.encode_to_vec();
        let rows = match &self.db {
            Db::Postgres(p) => {
                bind_insert!(sqlx::query(INSERT), e, u, now, &blob).execute(p).await?.rows_affected()
            }
            Db::Sqlite(p) => bind_insert!(sqlx::query(relay_db::sqlite_sql(INSERT)), e, u, now, &blob)
                .execute(p)
                .await?
                .rows_affected(),
        };
        Ok(if rows == 1 { RecordOutcome::Inserted } else { RecordOutcome::Duplicate })
    }

    pub async fn get(&self, request_id: &str) -> anyhow::Result<Option<UsageEvent>> {
        let blob: Option<Vec<u8>> = match &self.db {
            Db::Postgres(p) => sqlx::query(GET)
                .bind(request_id)
                .fetch_optional(p)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?,
            Db::Sqlite(p) => sqlx::query(relay_db::sqlite_sql(GET))
                .bind(request_id)
                .fetch_optional(p)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?,
        };
        Ok(blob.map(|b| UsageEvent::decode(b.as_slice())).transpose()?)
    }

    pub async fn summary(
        &self,
        key_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> anyhow::Result<UsageSummaryResponse> {
        let cols: [i64; 7] = match &self.db {
            Db::Postgres(p) => {
                let r = sqlx::query(SUMMARY).bind(key_id).bind(from_ms).bind(to_ms).fetch_one(p).await?;
                columns(&r)?
            }
            Db::Sqlite(p) => {
                let r = sqlx::query(relay_db::sqlite_sql(SUMMARY))
                    .bind(key_id)
                    .bind(from_ms)
                    .bind(to_ms)
                    .fetch_one(p)
                    .await?;
                columns(&r)?
            }
        };
        let n = |i: usize| u64::try_from(cols[i]).unwrap_or(0);
        Ok(UsageSummaryResponse {
            requests: n(0),
            failed_requests: n(1),
            usage: Some(TokenUsage {
                input_tokens: n(2),
                output_tokens: n(3),
                cached_input_tokens: n(4),
                cache_write_tokens: n(5),
                reasoning_tokens: n(6),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn event(
        id: &str,
        key: &str,
        outcome: Outcome,
        input: u64,
        output: u64,
        at: i64,
    ) -> UsageEvent {
        UsageEvent {
            schema_version: 1,
            request_id: id.into(),
            key_id: key.into(),
            model: "m".into(),
            usage: Some(TokenUsage { input_tokens: input, output_tokens: output, ..Default::default() }),
            outcome: outcome as i32,
            started_at_unix_ms: at,
            ..Default::default()
        }
    }

    async fn exercise(store: UsageStore) {
        let a = event("req-a", "k1", Outcome::Success, 10, 5, 1000);
        assert_eq!(store.record(&a).await.unwrap(), RecordOutcome::Inserted);
        assert_eq!(store.record(&a).await.unwrap(), RecordOutcome::Duplicate);
        let mut changed = a.clone();
        changed.usage = Some(TokenUsage { input_tokens: 999, ..Default::default() });
        assert_eq!(store.record(&changed).await.unwrap(), RecordOutcome::Duplicate);
        store.record(&event("req-b", "k1", Outcome::Error, 3, 0, 2000)).await.unwrap();
        store.record(&event("req-c", "k2", Outcome::Success, 7, 7, 2000)).await.unwrap();
        assert_eq!(store.get("req-a").await.unwrap().unwrap(), a);
        assert_eq!(store.get("nope").await.unwrap(), None);
        let s = store.summary("k1", 0, i64::MAX).await.unwrap();
        assert_eq!((s.requests, s.failed_requests), (2, 1));
        assert_eq!(s.usage.unwrap().input_tokens, 13);
        let s = store.summary("k1", 1500, i64::MAX).await.unwrap();
        assert_eq!(s.requests, 1);
    }

    #[tokio::test]
    async fn sqlite_records_once_and_sums() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        exercise(UsageStore::new(db)).await;
    }

    #[tokio::test]
    async fn postgres_records_once_and_sums() {
        let Some(url) = relay_test_support::env_service("DATABASE_URL") else {
            return;
        };
        let db = relay_test_support::fresh_postgres(&url).await;
        exercise(UsageStore::new(db)).await;
    }
}
