//! The key store: orgs, teams and keys in Postgres (or SQLite when embedded). Secrets are never stored,
//! only their HMAC; rows read back never carry the hash.

use relay_db::{Db, db_query};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{Decode, Row, Type};

/// Limits and budget of one scope; 0 = unlimited / no budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub rpm: i64,
    pub tpm: i64,
    pub max_concurrent: i64,
    pub budget_micros: i64,
    /// `daily`, `monthly`, `total`, or `prepaid` (the limit is the scope's top-ups in the ledger).
    pub budget_period: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub enabled: bool,
    pub policy: Policy,
    pub metadata: Value,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Team {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub enabled: bool,
    pub policy: Policy,
    pub metadata: Value,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Key {
    pub id: String,
    pub team_id: String,
    pub org_id: String,
    pub name: String,
    pub allowed_models: Vec<String>,
    pub ip_allowlist: Vec<String>,
    pub enabled: bool,
    pub expires_at_ms: i64,
    pub revoked_at_ms: i64,
    pub policy: Policy,
    pub metadata: Value,
    pub created_at_ms: i64,
    pub allowed_regions: Vec<String>,
    /// Routing strategy override; empty = the model group's.
    pub routing_strategy: String,
    /// Store none of this key's content.
    pub zero_retention: bool,
    /// Response cache seconds for this key's answers (0 = the model group's).
    pub response_cache_ttl_secs: i64,
}

/// What authentication needs, in one read.
pub struct KeyForAuth {
    pub key: Key,
    pub secret_hash: Vec<u8>,
    pub team: Team,
    pub org: Org,
}

#[derive(Clone, Debug)]
pub struct KeyStore {
    db: Db,
}

const ORG_COLS: &str = "o.id, o.name, o.enabled, o.rpm, o.tpm, o.max_concurrent, o.budget_micros, o.budget_period, o.metadata, o.created_at_ms";
const TEAM_COLS: &str = "t.id, t.org_id, t.name, t.enabled, t.rpm, t.tpm, t.max_concurrent, t.budget_micros, t.budget_period, t.metadata, t.created_at_ms";
const KEY_COLS: &str = "k.id, k.team_id, t.org_id, k.name, k.allowed_models, k.ip_allowlist, k.enabled, k.expires_at_ms, k.revoked_at_ms, k.rpm, k.tpm, k.max_concurrent, k.budget_micros, k.budget_period, k.metadata, k.created_at_ms, k.allowed_regions, k.routing_strategy, k.zero_retention, k.response_cache_ttl_secs";

/// Reads columns left to right from a row of either backend.
struct Cols<'r, R> {
    r: &'r R,
    i: usize,
}

impl<'r, R> Cols<'r, R>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    fn new(r: &'r R) -> Self {
        Self { r, i: 0 }
    }

    fn next<T: Decode<'r, R::Database> + Type<R::Database>>(&mut self) -> anyhow::Result<T> {
        let v = self.r.try_get(self.i)?;
        self.i += 1;
        Ok(v)
    }

    fn json<T: serde::de::DeserializeOwned>(&mut self) -> anyhow::Result<T> {
        Ok(serde_json::from_str(&self.next::<String>()?)?)
    }

    fn policy(&mut self) -> anyhow::Result<Policy> {
        Ok(Policy {
            rpm: self.next()?,
            tpm: self.next()?,
            max_concurrent: self.next()?,
            budget_micros: self.next()?,
            budget_period: self.next()?,
        })
    }

    fn org(&mut self) -> anyhow::Result<Org> {
        Ok(Org {
            id: self.next()?,
            name: self.next()?,
            enabled: self.next()?,
            policy: self.policy()?,
            metadata: self.json()?,
            created_at_ms: self.next()?,
        })
    }

    fn team(&mut self) -> anyhow::Result<Team> {
        Ok(Team {
            id: self.next()?,
            org_id: self.next()?,
            name: self.next()?,
            enabled: self.next()?,
            policy: self.policy()?,
            metadata: self.json()?,
            created_at_ms: self.next()?,
        })
    }

    fn key(&mut self) -> anyhow::Result<Key> {
        Ok(Key {
            id: self.next()?,
            team_id: self.next()?,
            org_id: self.next()?,
            name: self.next()?,
            allowed_models: self.json()?,
            ip_allowlist: self.json()?,
            enabled: self.next()?,
            expires_at_ms: self.next()?,
            revoked_at_ms: self.next()?,
            policy: self.policy()?,
            metadata: self.json()?,
            created_at_ms: self.next()?,
            allowed_regions: self.json()?,
            routing_strategy: self.next()?,
            zero_retention: self.next()?,
            response_cache_ttl_secs: self.next()?,
        })
    }

    fn key_for_auth(&mut self) -> anyhow::Result<KeyForAuth> {
        Ok(KeyForAuth { key: self.key()?, secret_hash: self.next()?, team: self.team()?, org: self.org()? })
    }
}

/// New org / team / key fields, as the admin API takes them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NewScope {
    pub id: Option<String>,
    pub name: String,
    #[serde(flatten)]
    pub policy: Policy,
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NewKey {
    pub team_id: String,
    pub name: String,
    pub allowed_models: Vec<String>,
    pub ip_allowlist: Vec<String>,
    /// Data residency: deployment region tags this key may be served in; empty = any.
    pub allowed_regions: Vec<String>,
    /// Routing strategy for the key's requests; empty = the model group's.
    pub routing_strategy: String,
    /// Store none of this key's content (Responses state, logged prompts and answers).
    pub zero_retention: bool,
    /// Cache this key's answers this many seconds (0 = the model group's setting).
    pub response_cache_ttl_secs: i64,
    pub expires_at_ms: i64,
    #[serde(flatten)]
    pub policy: Policy,
    pub metadata: Option<Value>,
}

/// Which level of the hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Org,
    Team,
    Key,
}

impl Level {
    fn table(self) -> &'static str {
        match self {
            Self::Org => "orgs",
            Self::Team => "teams",
            Self::Key => "api_keys",
        }
    }
}

impl KeyStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn create_org(&self, new: &NewScope) -> anyhow::Result<Org> {
        let id = new.id.clone().unwrap_or_else(|| format!("org_{}", uuid::Uuid::now_v7().simple()));
        let p = &new.policy;
        let meta = new.metadata.clone().unwrap_or_else(|| Value::Object(Default::default())).to_string();
        const SQL: &str = "INSERT INTO orgs (id, name, enabled, rpm, tpm, max_concurrent, budget_micros, budget_period, metadata, created_at_ms) \
            VALUES ($1, $2, TRUE, $3, $4, $5, $6, $7, $8, $9)";
        db_query!(
            &self.db,
            SQL,
            [
                &id,
                &new.name,
                p.rpm,
                p.tpm,
                p.max_concurrent,
                p.budget_micros,
                &p.budget_period,
                &meta,
                relay_core::ids::now_ms()
            ],
            execute,
            |_| ()
        );
        self.org(&id).await?.ok_or_else(|| anyhow::anyhow!("org vanished after insert"))
    }

    pub async fn create_team(&self, org_id: &str, new: &NewScope) -> anyhow::Result<Option<Team>> {
        if self.org(org_id).await?.is_none() {
            return Ok(None);
        }
        let id = new.id.clone().unwrap_or_else(|| format!("team_{}", uuid::Uuid::now_v7().simple()));
        let p = &new.policy;
        let meta = new.metadata.clone().unwrap_or_else(|| Value::Object(Default::default())).to_string();
        const SQL: &str = "INSERT INTO teams (id, org_id, name, enabled, rpm, tpm, max_concurrent, budget_micros, budget_period, metadata, created_at_ms) \
            VALUES ($1, $2, $3, TRUE, $4, $5, $6, $7, $8, $9, $10)";
        db_query!(
            &self.db,
            SQL,
            [
                &id,
                org_id,
                &new.name,
                p.rpm,
                p.tpm,
                p.max_concurrent,
                p.budget_micros,
                &p.budget_period,
                &meta,
                relay_core::ids::now_ms()
            ],
            execute,
            |_| ()
        );
        self.team(&id).await
    }

    /// Stores a key under `id` with its secret's hash. None if the team does not exist.
    pub async fn create_key(
        &self,
        id: &str,
        secret_hash: &[u8],
        new: &NewKey,
    ) -> anyhow::Result<Option<Key>> {
        if self.team(&new.team_id).await?.is_none() {
            return Ok(None);
        }
        let p = &new.policy;
        let meta = new.metadata.clone().unwrap_or_else(|| Value::Object(Default::default())).to_string();
        let models = serde_json::to_string(&new.allowed_models)?;
        let ips = serde_json::to_string(&new.ip_allowlist)?;
        let regions = serde_json::to_string(&new.allowed_regions)?;
        const SQL: &str = "INSERT INTO api_keys (id, team_id, name, secret_hash, allowed_models, ip_allowlist, enabled, expires_at_ms, revoked_at_ms, \
            rpm, tpm, max_concurrent, budget_micros, budget_period, metadata, created_at_ms, allowed_regions, routing_strategy, zero_retention, response_cache_ttl_secs) \
            VALUES ($1, $2, $3, $4, $5, $6, TRUE, $7, 0, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)";
        db_query!(
            &self.db,
            SQL,
            [
                id,
                &new.team_id,
                &new.name,
                secret_hash,
                &models,
                &ips,
                new.expires_at_ms,
                p.rpm,
                p.tpm,
                p.max_concurrent,
                p.budget_micros,
                &p.budget_period,
                &meta,
                relay_core::ids::now_ms(),
                &regions,
                &new.routing_strategy,
                new.zero_retention,
                new.response_cache_ttl_secs
            ],
            execute,
            |_| ()
        );
        self.key(id).await
    }

    pub async fn org(&self, id: &str) -> anyhow::Result<Option<Org>> {
        let sql = format!("SELECT {ORG_COLS} FROM orgs o WHERE o.id = $1");
        db_query!(&self.db, sql, [id], fetch_optional, |r: Option<_>| r
            .as_ref()
            .map(|r| Cols::new(r).org())
            .transpose())
    }

    pub async fn team(&self, id: &str) -> anyhow::Result<Option<Team>> {
        let sql = format!("SELECT {TEAM_COLS} FROM teams t WHERE t.id = $1");
        db_query!(&self.db, sql, [id], fetch_optional, |r: Option<_>| r
            .as_ref()
            .map(|r| Cols::new(r).team())
            .transpose())
    }

    pub async fn key(&self, id: &str) -> anyhow::Result<Option<Key>> {
        let sql =
            format!("SELECT {KEY_COLS} FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.id = $1");
        db_query!(&self.db, sql, [id], fetch_optional, |r: Option<_>| r
            .as_ref()
            .map(|r| Cols::new(r).key())
            .transpose())
    }

    pub async fn orgs(&self) -> anyhow::Result<Vec<Org>> {
        let sql = format!("SELECT {ORG_COLS} FROM orgs o ORDER BY o.created_at_ms, o.id");
        db_query!(&self.db, sql, [], fetch_all, |r: Vec<_>| r.iter().map(|r| Cols::new(r).org()).collect())
    }

    pub async fn teams(&self, org_id: &str) -> anyhow::Result<Vec<Team>> {
        let sql =
            format!("SELECT {TEAM_COLS} FROM teams t WHERE t.org_id = $1 ORDER BY t.created_at_ms, t.id");
        db_query!(&self.db, sql, [org_id], fetch_all, |r: Vec<_>| r
            .iter()
            .map(|r| Cols::new(r).team())
            .collect())
    }

    /// Keys of a team, or of every team of an org.
    pub async fn keys(&self, team_id: Option<&str>, org_id: Option<&str>) -> anyhow::Result<Vec<Key>> {
        let sql = format!(
            "SELECT {KEY_COLS} FROM api_keys k JOIN teams t ON t.id = k.team_id \
             WHERE ($1 = '' OR k.team_id = $1) AND ($2 = '' OR t.org_id = $2) ORDER BY k.created_at_ms, k.id"
        );
        let (team, org) = (team_id.unwrap_or(""), org_id.unwrap_or(""));
        db_query!(&self.db, sql, [team, org], fetch_all, |r: Vec<_>| r
            .iter()
            .map(|r| Cols::new(r).key())
            .collect())
    }

    /// The key, its secret's hash, its team and org, in one read.
    pub async fn for_auth(&self, id: &str) -> anyhow::Result<Option<KeyForAuth>> {
        let sql = format!(
            "SELECT {KEY_COLS}, k.secret_hash, {TEAM_COLS}, {ORG_COLS} FROM api_keys k \
             JOIN teams t ON t.id = k.team_id JOIN orgs o ON o.id = t.org_id WHERE k.id = $1"
        );
        db_query!(&self.db, sql, [id], fetch_optional, |r: Option<_>| r
            .as_ref()
            .map(|r| Cols::new(r).key_for_auth())
            .transpose())
    }

    /// Revokes a key for good. False if there is no such key.
    pub async fn revoke_key(&self, id: &str) -> anyhow::Result<bool> {
        const SQL: &str =
            "UPDATE api_keys SET revoked_at_ms = $1, enabled = FALSE WHERE id = $2 AND revoked_at_ms = 0";
        let n = db_query!(&self.db, SQL, [relay_core::ids::now_ms(), id], execute, sqlx_rows);
        Ok(n == 1 || self.key(id).await?.is_some())
    }

    /// Enables or disables an org, team or key. False if it does not exist.
    pub async fn set_enabled(&self, level: Level, id: &str, enabled: bool) -> anyhow::Result<bool> {
        let sql = format!("UPDATE {} SET enabled = $1 WHERE id = $2", level.table());
        let n = db_query!(&self.db, sql, [enabled, id], execute, sqlx_rows);
        Ok(n == 1)
    }
}

/// Rows affected, for either backend's query result.
fn sqlx_rows<T: RowsAffected>(r: T) -> u64 {
    r.rows()
}

trait RowsAffected {
    fn rows(&self) -> u64;
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}
