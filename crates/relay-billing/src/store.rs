//! `usage_records` queries, for Postgres and SQLite. Same SQL text; SQLite gets `?N` placeholders.

use prost::Message as _;
use relay_core::pb::billing::v1::UsageSummaryResponse;
use relay_core::pb::common::v1::{ErrorCode as PbErrorCode, Protocol, TokenUsage, UsageSource};
use relay_core::pb::events::v1::{Outcome, UsageEvent};
use relay_db::{Arg, Col, Db, Val};

use crate::ledger::Booking;
use crate::multi_row::{insert_rows, multi_row};
use crate::pricing::PriceRow;
use sqlx::Row;

#[derive(Clone, Debug)]
pub struct UsageStore {
    db: Db,
}

/// An event billing could not store, kept whole.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: String,
    pub request_id: String,
    pub reason: String,
    pub event: Vec<u8>,
    pub at_ms: i64,
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

// Each statement is written for a whole batch: `{rows}` becomes `($1, .., $n), (..)`, one group per row, so
// a batch of events costs four round trips, not ten per event.
const INSERT: &str = "INSERT INTO usage_records (request_id, schema_version, key_id, team_id, org_id, end_user, \
    model, deployment_id, provider, upstream_model, protocol, stream, input_tokens, output_tokens, \
    cached_input_tokens, cache_write_tokens, reasoning_tokens, outcome, error_code, http_status, started_at_ms, \
    duration_ms, ttfb_ms, attempts, recorded_at_ms, event, cost_micros, currency, client_request_id, \
    input_source, output_source, sell_micros, price_id) VALUES {rows} \
    ON CONFLICT (request_id) DO NOTHING RETURNING request_id";
const RECORD_COLUMNS: usize = 33;

const INSERT_TXN: &str = "INSERT INTO ledger_transactions (id, request_id, kind, price_id, memo, created_at_ms) \
    VALUES {rows}";
const INSERT_ACCOUNT: &str = "INSERT INTO ledger_accounts (id, kind, currency, created_at_ms) VALUES {rows} \
    ON CONFLICT (id) DO NOTHING";
const INSERT_ENTRY: &str = "INSERT INTO ledger_entries (txn_id, seq, account_id, amount_micros, currency) \
    VALUES {rows}";

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
        Protocol::OpenaiForwarded => "openai_forwarded",
        Protocol::GeminiGenerate => "gemini_generate",
        Protocol::OpenaiCompletions => "openai_completions",
        Protocol::Unspecified => "unspecified",
    }
}

fn error_label(code: i32) -> &'static str {
    if code == PbErrorCode::Unspecified as i32 { "" } else { relay_core::ErrorCode::from_pb(code).as_str() }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn source_label(s: i32) -> &'static str {
    match UsageSource::try_from(s).unwrap_or(UsageSource::Unspecified) {
        UsageSource::Unspecified | UsageSource::Provider => "provider",
        UsageSource::Counted => "counted",
        UsageSource::Estimated => "estimated",
    }
}

/// Text as the database can always store it: no NUL (Postgres refuses it in TEXT), at most `max` bytes
/// (cut on a character boundary). The event blob keeps the original bytes for audits.
pub fn storable(s: &str, max: usize) -> String {
    let mut out: String = s.chars().map(|c| if c == '\0' { '\u{FFFD}' } else { c }).collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

fn record_args(e: &UsageEvent, b: &Booking, now: i64) -> Vec<Arg> {
    let u = e.usage.unwrap_or_default();
    let t = |s: &str| Arg::Text(storable(s, 1024));
    vec![
        t(&e.request_id),
        Arg::I64(i64::from(e.schema_version)),
        t(&e.key_id),
        t(&e.team_id),
        t(&e.org_id),
        t(&e.end_user),
        t(&e.model),
        t(&e.deployment_id),
        t(&e.provider),
        t(&e.upstream_model),
        t(protocol_label(e.protocol)),
        Arg::Bool(e.stream),
        Arg::I64(i64_of(u.input_tokens)),
        Arg::I64(i64_of(u.output_tokens)),
        Arg::I64(i64_of(u.cached_input_tokens)),
        Arg::I64(i64_of(u.cache_write_tokens)),
        Arg::I64(i64_of(u.reasoning_tokens)),
        t(outcome_label(e.outcome)),
        t(error_label(e.error_code)),
        Arg::I64(i64::from(e.http_status)),
        Arg::I64(e.started_at_unix_ms),
        Arg::I64(i64_of(e.duration_ms)),
        Arg::I64(i64_of(e.time_to_first_byte_ms)),
        Arg::I64(i64::from(e.attempts)),
        Arg::I64(now),
        Arg::Bytes(e.encode_to_vec()),
        Arg::I64(b.cost),
        t(&b.currency),
        t(&e.client_request_id),
        t(source_label(u.input_source)),
        t(source_label(u.output_source)),
        Arg::I64(b.sell),
        t(&b.price_id),
    ]
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

    /// Inserts the record and its posting set unless one with this request id exists (then nothing
    /// changes): one transaction, so a record never exists without its postings.
    pub async fn record(&self, e: &UsageEvent, b: &Booking) -> anyhow::Result<RecordOutcome> {
        let out = self.record_batch(&[(e, b)]).await?;
        Ok(out.first().copied().unwrap_or(RecordOutcome::Duplicate))
    }

    /// Records a batch in one transaction (all or nothing): the records that are new, then their posting
    /// sets, accounts and entries, each as one multi-row statement.
    pub async fn record_batch(
        &self,
        items: &[(&UsageEvent, &Booking)],
    ) -> anyhow::Result<Vec<RecordOutcome>> {
        let now = relay_core::ids::now_ms();
        let ids: Vec<String> = items.iter().map(|(e, _)| storable(&e.request_id, 1024)).collect();
        // The first of several copies in one batch is the one recorded.
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<usize> = (0..items.len()).filter(|&i| seen.insert(ids[i].as_str())).collect();
        for &i in &firsts {
            let (e, b) = items[i];
            anyhow::ensure!(b.balanced(), "posting set for {} does not balance", e.request_id);
        }
        let mut tx = self.db.begin().await?;
        let mut inserted = std::collections::HashSet::new();
        let mut rest = &firsts[..];
        for size in tx.row_chunks(firsts.len(), RECORD_COLUMNS) {
            let (chunk, later) = rest.split_at(size);
            rest = later;
            let args: Vec<Arg> =
                chunk.iter().flat_map(|&i| record_args(items[i].0, items[i].1, now)).collect();
            let sql = multi_row(INSERT, size, RECORD_COLUMNS);
            for row in tx.fetch(&sql, &args, &[Col::Text]).await? {
                inserted.insert(row.into_iter().next().map(Val::into_text).unwrap_or_default());
            }
        }
        let new: Vec<usize> = firsts.iter().copied().filter(|&i| inserted.contains(&ids[i])).collect();
        let (mut txns, mut accounts, mut entries) =
            (Vec::new(), std::collections::BTreeMap::new(), Vec::new());
        for &i in &new {
            let b = items[i].1;
            let txn = storable(&b.txn_id, 1100);
            txns.push(vec![
                txn.clone().into(),
                ids[i].clone().into(),
                "usage".into(),
                b.price_id.clone().into(),
                "".into(),
                now.into(),
            ]);
            for (seq, entry) in b.entries.iter().enumerate() {
                let account = storable(&entry.account, 1100);
                accounts.entry(account.clone()).or_insert((entry.kind, b.currency.clone()));
                let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                entries.push(vec![
                    txn.clone().into(),
                    seq.into(),
                    account.into(),
                    entry.amount.into(),
                    b.currency.clone().into(),
                ]);
            }
        }
        let accounts: Vec<Vec<Arg>> = accounts
            .into_iter()
            .map(|(id, (kind, currency))| vec![id.into(), kind.into(), currency.into(), now.into()])
            .collect();
        insert_rows(&mut tx, INSERT_ACCOUNT, 4, accounts).await?;
        insert_rows(&mut tx, INSERT_TXN, 6, txns).await?;
        insert_rows(&mut tx, INSERT_ENTRY, 5, entries).await?;
        tx.commit().await?;
        let new: std::collections::HashSet<usize> = new.into_iter().collect();
        Ok((0..items.len())
            .map(|i| if new.contains(&i) { RecordOutcome::Inserted } else { RecordOutcome::Duplicate })
            .collect())
    }

    /// Keeps an event billing cannot store (bad data, not an outage) for inspection and replay.
    pub async fn dead_letter(&self, request_id: &str, reason: &str, event: Vec<u8>) -> anyhow::Result<()> {
        let sql = "INSERT INTO usage_dead_letters (id, request_id, reason, event, created_at_ms) \
            VALUES ($1, $2, $3, $4, $5)";
        let args = [
            relay_core::ids::new_request_id().into(),
            storable(request_id, 1024).into(),
            storable(reason, 2000).into(),
            Arg::Bytes(event),
            relay_core::ids::now_ms().into(),
        ];
        self.db.execute(sql, &args).await?;
        Ok(())
    }

    /// Dead letters, oldest first.
    pub async fn dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        let sql = "SELECT id, request_id, reason, event, created_at_ms FROM usage_dead_letters ORDER BY id";
        let rows = self.db.fetch(sql, &[], &[Col::Text, Col::Text, Col::Text, Col::Bytes, Col::I64]).await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                let mut next = || it.next().unwrap_or(Val::I64(0));
                let (id, request_id, reason, event, at) = (next(), next(), next(), next(), next());
                DeadLetter {
                    id: id.into_text(),
                    request_id: request_id.into_text(),
                    reason: reason.into_text(),
                    event: event.into_bytes(),
                    at_ms: at.i64(),
                }
            })
            .collect())
    }

    pub async fn delete_dead_letter(&self, id: &str) -> anyhow::Result<()> {
        self.db.execute("DELETE FROM usage_dead_letters WHERE id = $1", &[id.into()]).await?;
        Ok(())
    }

    /// What `column` (`key_id`, `team_id` or `org_id`, never client input) = `id` was charged in the window.
    pub async fn spent(
        &self,
        column: &'static str,
        id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> anyhow::Result<i64> {
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(sell_micros), 0) AS BIGINT) FROM usage_records \
             WHERE {column} = $1 AND started_at_ms >= $2 AND started_at_ms < $3"
        );
        let rows = self.db.fetch(&sql, &[id.into(), from_ms.into(), to_ms.into()], &[Col::I64]).await?;
        Ok(rows.first().and_then(|r| r.first()).map_or(0, Val::i64))
    }

    /// Posts a top-up (`kind` = `topup`: money received) or a credit (`adjustment`: given, e.g. to make up
    /// for an outage) of `amount` micros to a scope's prepaid balance, as its own balanced transaction:
    /// `funds` (top-up) or `adjustments` (credit) debited, `prepaid:<scope>` credited. Returns its id.
    pub async fn credit(
        &self,
        scope: &str,
        amount: i64,
        kind: &'static str,
        memo: &str,
    ) -> anyhow::Result<String> {
        anyhow::ensure!(
            amount > 0 && amount <= i64::MAX / 4,
            "amount must be a positive number of micro-units"
        );
        anyhow::ensure!(
            ["key:", "team:", "org:"].iter().any(|p| scope.starts_with(p)) && scope.len() <= 300,
            "scope must be key:<id>, team:<id> or org:<id>"
        );
        let source = match kind {
            "topup" => ("funds", "funds"),
            _ => ("adjustments", "adjustment"),
        };
        let txn = relay_core::ids::new_request_id();
        let now = relay_core::ids::now_ms();
        let prepaid = storable(&format!("prepaid:{scope}"), 1100);
        let mut tx = self.db.begin().await?;
        for (account, kind) in [(source.0.to_owned(), source.1), (prepaid.clone(), "prepaid")] {
            tx.execute(
                &multi_row(INSERT_ACCOUNT, 1, 4),
                &[account.into(), kind.into(), "USD".into(), now.into()],
            )
            .await?;
        }
        let memo = storable(memo, 500);
        let args: Vec<Arg> =
            vec![txn.clone().into(), "".into(), kind.into(), "".into(), memo.into(), now.into()];
        // NULL request id: not a request's posting set.
        let sql = "INSERT INTO ledger_transactions (id, request_id, kind, price_id, memo, created_at_ms) \
            VALUES ($1, NULLIF($2, ''), $3, $4, $5, $6)";
        tx.execute(sql, &args).await?;
        let entries = vec![
            vec![txn.clone().into(), 0i64.into(), source.0.into(), amount.into(), "USD".into()],
            vec![txn.clone().into(), 1i64.into(), prepaid.into(), (-amount).into(), "USD".into()],
        ];
        insert_rows(&mut tx, INSERT_ENTRY, 5, entries).await?;
        tx.commit().await?;
        Ok(txn)
    }

    /// Everything topped up or credited to a scope's prepaid balance.
    pub async fn prepaid(&self, scope: &str) -> anyhow::Result<i64> {
        let sql = "SELECT CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT) FROM ledger_entries WHERE account_id = $1";
        let rows = self.db.fetch(sql, &[format!("prepaid:{scope}").into()], &[Col::I64]).await?;
        Ok(-rows.first().and_then(|r| r.first()).map_or(0, Val::i64))
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Adds price versions; an id already stored is kept as it is (versions are immutable once used).
    pub async fn save_prices(&self, rows: &[PriceRow]) -> anyhow::Result<()> {
        let sql = "INSERT INTO prices (id, provider, model, currency, input_per_mtok, output_per_mtok, \
            cached_input_per_mtok, cache_write_per_mtok, reasoning_per_mtok, per_request, valid_from_ms, \
            valid_to_ms, source, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
            ON CONFLICT (id) DO NOTHING";
        let now = relay_core::ids::now_ms();
        let mut tx = self.db.begin().await?;
        for r in rows {
            let args: Vec<Arg> = vec![
                r.id.clone().into(),
                r.provider.clone().into(),
                r.model.clone().into(),
                r.currency.clone().into(),
                r.input.into(),
                r.output.into(),
                r.cached_input.into(),
                r.cache_write.into(),
                r.reasoning.into(),
                r.per_request.into(),
                r.valid_from_ms.into(),
                r.valid_to_ms.into(),
                r.source.clone().into(),
                now.into(),
            ];
            tx.execute(sql, &args).await?;
        }
        tx.commit().await
    }

    pub async fn load_prices(&self) -> anyhow::Result<Vec<PriceRow>> {
        let sql = "SELECT id, provider, model, currency, input_per_mtok, output_per_mtok, cached_input_per_mtok, \
            cache_write_per_mtok, reasoning_per_mtok, per_request, valid_from_ms, valid_to_ms, source FROM prices";
        use Col::{I64, Text};
        let cols = [Text, Text, Text, Text, I64, I64, I64, I64, I64, I64, I64, I64, Text];
        let rows = self.db.fetch(sql, &[], &cols).await?;
        Ok(rows
            .into_iter()
            .map(|r| PriceRow {
                id: r[0].text().to_owned(),
                provider: r[1].text().to_owned(),
                model: r[2].text().to_owned(),
                currency: r[3].text().to_owned(),
                input: r[4].i64(),
                output: r[5].i64(),
                cached_input: r[6].i64(),
                cache_write: r[7].i64(),
                reasoning: r[8].i64(),
                per_request: r[9].i64(),
                valid_from_ms: r[10].i64(),
                valid_to_ms: r[11].i64(),
                source: r[12].text().to_owned(),
            })
            .collect())
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
                ..Default::default()
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

    fn booked(e: &UsageEvent) -> crate::ledger::Booking {
        crate::ledger::book(e, &crate::pricing::PriceBook::default(), &[], 0)
    }

    async fn exercise(store: UsageStore) {
        let a = event("req-a", "k1", Outcome::Success, 10, 5, 1000);
        assert_eq!(store.record(&a, &booked(&a)).await.unwrap(), RecordOutcome::Inserted);
        assert_eq!(store.record(&a, &booked(&a)).await.unwrap(), RecordOutcome::Duplicate);
        let mut changed = a.clone();
        changed.usage = Some(TokenUsage { input_tokens: 999, ..Default::default() });
        assert_eq!(store.record(&changed, &booked(&changed)).await.unwrap(), RecordOutcome::Duplicate);
        store
            .record(
                &event("req-b", "k1", Outcome::Error, 3, 0, 2000),
                &booked(&event("req-b", "k1", Outcome::Error, 3, 0, 2000)),
            )
            .await
            .unwrap();
        store
            .record(
                &event("req-c", "k2", Outcome::Success, 7, 7, 2000),
                &booked(&event("req-c", "k2", Outcome::Success, 7, 7, 2000)),
            )
            .await
            .unwrap();
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
