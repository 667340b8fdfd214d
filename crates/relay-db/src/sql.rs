//! One SQL style for both backends: statements written with Postgres `$n` placeholders, arguments as
//! [`Arg`]s, rows read back as typed [`Val`]s, inside a [`Tx`] that commits atomically on either backend.

use sqlx::Row as _;

use crate::{Db, sqlite_sql};

/// One bound argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    I64(i64),
    Text(String),
    Bool(bool),
    Bytes(Vec<u8>),
}

impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Self::I64(v)
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<String> for Arg {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Self {
        Self::Text(v.clone())
    }
}
impl From<bool> for Arg {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}
impl From<Vec<u8>> for Arg {
    fn from(v: Vec<u8>) -> Self {
        Self::Bytes(v)
    }
}

/// The type a result column is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    I64,
    Text,
    Bytes,
}

/// One value read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    I64(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Val {
    pub fn i64(&self) -> i64 {
        if let Self::I64(v) = self { *v } else { 0 }
    }
    pub fn text(&self) -> &str {
        if let Self::Text(v) = self { v } else { "" }
    }
    pub fn into_text(self) -> String {
        if let Self::Text(v) = self { v } else { String::new() }
    }
    pub fn into_bytes(self) -> Vec<u8> {
        if let Self::Bytes(v) = self { v } else { Vec::new() }
    }
}

macro_rules! bind_all {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a {
                Arg::I64(v) => q.bind(*v),
                Arg::Text(v) => q.bind(v.clone()),
                Arg::Bool(v) => q.bind(*v),
                Arg::Bytes(v) => q.bind(v.clone()),
            };
        }
        q
    }};
}

macro_rules! read_row {
    ($row:expr, $cols:expr) => {{
        let mut out = Vec::with_capacity($cols.len());
        for (i, c) in $cols.iter().enumerate() {
            out.push(match c {
                Col::I64 => Val::I64($row.try_get::<i64, _>(i)?),
                Col::Text => Val::Text($row.try_get::<String, _>(i)?),
                Col::Bytes => Val::Bytes($row.try_get::<Vec<u8>, _>(i)?),
            });
        }
        out
    }};
}

/// An open transaction on either backend. Dropped without [`Tx::commit`], it rolls back.
pub enum Tx {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl Tx {
    /// Parameters worth binding in one statement: Postgres takes up to 65,535; SQLite up to 32,766, and
    /// with anonymous placeholders ([`crate::sqlite_sql`]) binding stays linear, so a few thousand.
    pub fn max_params(&self) -> usize {
        match self {
            Self::Postgres(_) => 65_535,
            Self::Sqlite(_) => 1024,
        }
    }

    /// The row counts, in order, of the statements a multi-row insert of `rows` rows of `cols` columns is
    /// split into: as many full statements as fit, then the rest. SQLite: the rest in powers of two, so
    /// every statement's text repeats and its prepared form comes from the statement cache (preparing a
    /// multi-row insert of a new size cost more than running it, and SQLite has no round trip to save).
    /// Postgres: the rest in one statement (each is a round trip).
    pub fn row_chunks(&self, rows: usize, cols: usize) -> Vec<usize> {
        row_chunks(matches!(self, Self::Sqlite(_)), self.max_params(), rows, cols)
    }

    /// Runs one statement; returns the rows it affected.
    pub async fn execute(&mut self, sql: &str, args: &[Arg]) -> anyhow::Result<u64> {
        Ok(match self {
            Self::Postgres(tx) => bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())), args)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            Self::Sqlite(tx) => {
                bind_all!(sqlx::query(sqlite_sql(sql)), args).execute(&mut **tx).await?.rows_affected()
            }
        })
    }

    /// Runs one query and reads every row as `cols`.
    pub async fn fetch(&mut self, sql: &str, args: &[Arg], cols: &[Col]) -> anyhow::Result<Vec<Vec<Val>>> {
        let mut out = Vec::new();
        match self {
            Self::Postgres(tx) => {
                for r in bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())), args)
                    .fetch_all(&mut **tx)
                    .await?
                {
                    out.push(read_row!(r, cols));
                }
            }
            Self::Sqlite(tx) => {
                for r in bind_all!(sqlx::query(sqlite_sql(sql)), args).fetch_all(&mut **tx).await? {
                    out.push(read_row!(r, cols));
                }
            }
        }
        Ok(out)
    }

    pub async fn commit(self) -> anyhow::Result<()> {
        match self {
            Self::Postgres(tx) => tx.commit().await?,
            Self::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }
}

impl Db {
    /// Starts a transaction: every statement run through it commits together or not at all.
    pub async fn begin(&self) -> anyhow::Result<Tx> {
        Ok(match self {
            Self::Postgres(p) => Tx::Postgres(p.begin().await?),
            Self::Sqlite(p) => Tx::Sqlite(p.begin().await?),
        })
    }

    /// Runs one statement outside a transaction.
    pub async fn execute(&self, sql: &str, args: &[Arg]) -> anyhow::Result<u64> {
        Ok(match self {
            Self::Postgres(p) => bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())), args)
                .execute(p)
                .await?
                .rows_affected(),
            Self::Sqlite(p) => {
                bind_all!(sqlx::query(sqlite_sql(sql)), args).execute(p).await?.rows_affected()
            }
        })
    }

    /// Runs one query outside a transaction and reads every row as `cols`.
    pub async fn fetch(&self, sql: &str, args: &[Arg], cols: &[Col]) -> anyhow::Result<Vec<Vec<Val>>> {
        let mut out = Vec::new();
        match self {
            Self::Postgres(p) => {
                for r in
                    bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())), args).fetch_all(p).await?
                {
                    out.push(read_row!(r, cols));
                }
            }
            Self::Sqlite(p) => {
                for r in bind_all!(sqlx::query(sqlite_sql(sql)), args).fetch_all(p).await? {
                    out.push(read_row!(r, cols));
                }
            }
        }
        Ok(out)
    }
}

/// [`Tx::row_chunks`] for a backend that takes `max_params` parameters per statement.
pub(crate) fn row_chunks(fixed_sizes: bool, max_params: usize, rows: usize, cols: usize) -> Vec<usize> {
    let fit = (max_params / cols.max(1)).clamp(1, 1000);
    let mut out = vec![fit; rows / fit];
    let mut left = rows % fit;
    if !fixed_sizes {
        if left > 0 {
            out.push(left);
        }
        return out;
    }
    // The rest in powers of two, largest first.
    while left > 0 {
        let size = 1 << left.ilog2();
        out.push(size);
        left -= size;
    }
    out
}

/// Is this error the database being unreachable or overloaded (worth retrying as is), rather than a
/// statement the database refuses (which no retry fixes)?
pub fn is_transient(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            // Postgres: class 08 connection, 40 serialization/deadlock, 53 resources, 57 shutdown.
            // SQLite: 5 busy, 6 locked.
            let code = db.code().unwrap_or_default();
            ["08", "40", "53", "57"].iter().any(|c| code.starts_with(c)) || code == "5" || code == "6"
        }
        Some(
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_),
        ) => true,
        Some(sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed) => true,
        Some(_) => false,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn transactions_commit_together_or_not_at_all() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, n BIGINT NOT NULL)", &[]).await.unwrap();
        let mut tx = db.begin().await.unwrap();
        tx.execute("INSERT INTO t (id, n) VALUES ($1, $2)", &["a".into(), 1i64.into()]).await.unwrap();
        tx.execute("INSERT INTO t (id, n) VALUES ($1, $2)", &["b".into(), 2i64.into()]).await.unwrap();
        drop(tx);
        let rows = db.fetch("SELECT id, n FROM t", &[], &[Col::Text, Col::I64]).await.unwrap();
        assert!(rows.is_empty(), "dropped transaction rolled back");
        let mut tx = db.begin().await.unwrap();
        tx.execute("INSERT INTO t (id, n) VALUES ($1, $2)", &["a".into(), 1i64.into()]).await.unwrap();
        assert!(
            tx.execute("INSERT INTO t (id, n) VALUES ($1, $2)", &["a".into(), 2i64.into()]).await.is_err()
        );
        tx.commit().await.unwrap();
        let rows = db.fetch("SELECT id, n FROM t", &[], &[Col::Text, Col::I64]).await.unwrap();
        assert_eq!(rows, vec![vec![Val::Text("a".into()), Val::I64(1)]]);
    }
}
