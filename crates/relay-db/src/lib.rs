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
use sqlx::postgres::{PgPool, PgPoolOptions};
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
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await?;
            Ok(Self::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
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

/// The SQLite form of a query written with Postgres placeholders (`$1` → `?1`; both are positional).
pub fn sqlite_sql(sql: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql.replace('$', "?"))
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
