//! relay-test-support: what Relay's tests share.
//!
//! [`MockOpenAi`] is a deterministic OpenAI-compatible upstream on `127.0.0.1:0` that records every request;
//! [`env_service`] reads NATS/Redis/Postgres URLs from the environment (skip, or fail with
//! `REQUIRE_SERVICES=1`); [`fresh_postgres`] gives each test its own migrated database; [`tls`] issues
//! throwaway certificates and puts HTTPS in front of a test server.
//! Only ever a dev-dependency.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod books;
pub mod fuzz;
mod mock_openai;
pub mod tls;

pub use books::Books;
pub use mock_openai::{MockOpenAi, Recorded, echo};

/// The URL in env var `name`. Missing: `None` (the test skips) unless `REQUIRE_SERVICES=1`, then a panic.
pub fn env_service(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!("{name} is not set and REQUIRE_SERVICES=1: start services with .ci/services.sh");
            }
            eprintln!("SKIP: {name} is not set");
            None
        }
    }
}

/// A new, empty, migrated database on the server of `url`, unique to this call.
pub async fn fresh_postgres(url: &str) -> relay_db::Db {
    let url = fresh_postgres_url(url).await;
    let db = relay_db::Db::connect(&url).await.expect("connect to fresh database");
    db.migrate().await.expect("migrate fresh database");
    db
}

/// Creates a new database next to the one in `url` and returns its URL (not migrated).
pub async fn fresh_postgres_url(url: &str) -> String {
    use sqlx::Connection as _;
    let name = format!("relay_test_{}", uuid::Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(url).await.expect("connect to DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    let (base, _) = url.rsplit_once('/').expect("DATABASE_URL has a database path");
    format!("{base}/{name}")
}

/// A free TCP port on loopback (for processes that must be told their port up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// xorshift64*: deterministic, dependency-free randomness for generated test cases.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift never leaves it).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// An index in `0..len`.
    pub fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).unwrap_or(0)
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }
    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.index(100) < percent
    }
}
