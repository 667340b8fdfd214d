//! relay-db: one database handle for both deployment modes, and the one migration timeline.
//!
//! `postgres://…` in production, `sqlite://…` (or `sqlite::memory:`) when embedded. Migrations live in
//! `migrations/{postgres,sqlite}` at the repository root and are compiled into the binary. Queries do not live
//! here: each service owns its tables and its SQL.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

mod sql;

pub use sql::{Arg, Col, Tx, Val, is_transient};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
}

/// A connected database of either kind.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Db {
    /// Connects to `url`; for SQLite files the file is created if missing.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)?.statement_cache_capacity(16);
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts)
                .await?;
            Ok(Self::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                // Multi-row inserts come in a few fixed row counts (`Tx::row_chunks`: about ten per
                // table), each prepared once per connection; a prepared statement of thousands of
                // parameters is large, so the cache stays bounded (a hundred of them per connection was
                // most of an idle relay's memory).
                .statement_cache_capacity(48)
                // 1 MB of page cache per connection (SQLite's default is 2 MB): the ledger's writes touch
                // the right-hand edge of each index, reads fall back on the OS page cache, and four
                // connections' caches were a sixth of a loaded relay's memory.
                .pragma("cache_size", "-1024");
            // In-memory databases are per connection: keep exactly one.
            let max = if url.contains(":memory:") { 1 } else { 4 };
            let pool = SqlitePoolOptions::new().max_connections(max).connect_with(opts).await?;
            Ok(Self::Sqlite(pool))
        } else {
            anyhow::bail!("database url must start with postgres:// or sqlite:")
        }
    }

    /// Applies every pending migration of this backend.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self {
            Self::Postgres(p) => migrator(embedded::POSTGRES).run(p).await?,
            Self::Sqlite(p) => migrator(embedded::SQLITE).run(p).await?,
        }
        Ok(())
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }

    pub async fn close(&self) {
        match self {
            Self::Postgres(p) => p.close().await,
            Self::Sqlite(p) => p.close().await,
        }
    }
}

fn migrator(files: &'static [(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|(version, desc, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*desc),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// The SQLite form of a query written with Postgres placeholders. When they run `$1, $2, …` in order,
/// each once (every insert does), they become anonymous `?`s: SQLite looks a named parameter up by a
/// linear scan, so binding the hundreds of a multi-row insert by name costs O(n²) (it was the largest
/// item of an embedded relay's CPU profile). Otherwise `$n` → `?n` (both positional).
///
/// The rewrite of each distinct statement is kept (up to [`REWRITES_KEPT`] of them): the same text comes
/// back for every batch of the same size, and rewriting a multi-row insert cost as much as binding it.
pub fn sqlite_sql(sql: &str) -> sqlx::AssertSqlSafe<std::sync::Arc<str>> {
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock, Mutex};
    static KEPT: LazyLock<Mutex<HashMap<Box<str>, Arc<str>>>> = LazyLock::new(Default::default);
    let lock = || KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(hit) = lock().get(sql) {
        return sqlx::AssertSqlSafe(hit.clone());
    }
    let rewritten: Arc<str> = rewrite_placeholders(sql).into();
    let mut kept = lock();
    if kept.len() < REWRITES_KEPT {
        kept.insert(sql.into(), rewritten.clone());
    }
    sqlx::AssertSqlSafe(rewritten)
}

/// Distinct statements whose SQLite rewrite is kept (statements are constants and a few fixed batch
/// sizes, so this is never reached in practice; past it, statements are rewritten each time).
pub const REWRITES_KEPT: usize = 512;

fn rewrite_placeholders(sql: &str) -> String {
    let (mut anon, mut expected, mut in_order) = (String::with_capacity(sql.len()), 1u64, true);
    let mut chars = sql.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '$' || !chars.peek().is_some_and(|(_, d)| d.is_ascii_digit()) {
            anon.push(c);
            continue;
        }
        let mut n = 0u64;
        while let Some((_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
            n = n.saturating_mul(10).saturating_add(u64::from(*d as u8 - b'0'));
            chars.next();
        }
        in_order &= n == expected;
        expected += 1;
        anon.push('?');
    }
    if in_order { anon } else { sql.replace('$', "?") }
}

/// Runs one query on either backend: `db_query!(db, SQL, [binds..], fetch_optional, map_fn)`. `SQL` uses
/// `$n` placeholders; `map_fn` is a function generic over the row type, called with the method's result.
#[macro_export]
macro_rules! db_query {
    ($db:expr, $sql:expr, [$($b:expr),* $(,)?], $method:ident, $map:expr) => {
        {
            let sql: &str = &$sql;
            match $db {
                $crate::Db::Postgres(pool) => {
                    let r = ::sqlx::query(::sqlx::AssertSqlSafe(sql.to_owned()))$(.bind($b))*.$method(pool).await?;
                    $map(r)
                }
                $crate::Db::Sqlite(pool) => {
                    let r = ::sqlx::query($crate::sqlite_sql(sql))$(.bind($b))*.$method(pool).await?;
                    $map(r)
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_inserts_split_into_full_statements_then_powers_of_two_on_sqlite() {
        use crate::sql::row_chunks;
        // 4096 parameters / 33 columns: 124 rows per statement.
        assert_eq!(row_chunks(true, 4096, 1023, 33), [vec![124; 8], vec![16, 8, 4, 2, 1]].concat());
        assert_eq!(row_chunks(true, 4096, 5, 33), [4, 1]);
        assert_eq!(row_chunks(true, 4096, 0, 33), Vec::<usize>::new());
        assert_eq!(row_chunks(false, 65_535, 1500, 33), [1000, 500]);
        assert_eq!(row_chunks(false, 65_535, 7, 33), [7]);
        for n in 0..600 {
            let sizes = row_chunks(true, 4096, n, 5);
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(sizes.iter().all(|s| *s == 819 || s.is_power_of_two()), "{sizes:?}");
        }
    }

    #[test]
    fn placeholders_in_order_become_anonymous() {
        let q = |s: &str| sqlite_sql(s).0.to_string();
        assert_eq!(q("INSERT INTO t VALUES ($1, $2), ($3, $4)"), "INSERT INTO t VALUES (?, ?), (?, ?)");
        assert_eq!(q("SELECT * FROM t WHERE a = $2 AND b = $1"), "SELECT * FROM t WHERE a = ?2 AND b = ?1");
        assert_eq!(q("UPDATE t SET a = $1 WHERE b = $1"), "UPDATE t SET a = ?1 WHERE b = ?1");
        assert_eq!(q("SELECT 1"), "SELECT 1");
    }

    #[test]
    fn both_backends_have_the_same_timeline() {
        let pg: Vec<_> = embedded::POSTGRES.iter().map(|(v, d, _)| (v, d)).collect();
        let lite: Vec<_> = embedded::SQLITE.iter().map(|(v, d, _)| (v, d)).collect();
        assert_eq!(pg, lite);
        assert!(!pg.is_empty());
    }

    #[tokio::test]
    async fn sqlite_migrates_twice_without_error() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        db.migrate().await.unwrap();
    }
}
