//! Routing changes made at runtime: a deployment's weight, draining (disabling) it, a model group's
//! strategy and hedging delay. Stored in the database (`routing_overrides`), so every routing replica
//! applies the same ones; they are reloaded every `refresh_ms` and reach every edge within the route cache
//! TTL after that. The admin API and `relay routing` write them through [`OverrideStore`], which
//! checks every change with the same rules ([`Settings::validate`]).

use std::collections::HashMap;

use relay_db::{Arg, Col, Db};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What can change about one deployment. `None` = as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentOverride {
    /// Share of first attempts (1..=1,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// `false` drains it: no new request is sent there (requests in flight finish).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// What can change about one model group. `None` = as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOverride {
    /// One of relay-select's strategies (`weighted`, `priority`, `cost`, `latency`, `balanced`, `headroom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Hedge a request whose first attempt has not answered after this many ms (0 = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge_after_ms: Option<u32>,
}

pub const MAX_WEIGHT: u32 = 1_000_000;

/// The settings of one kind of target, as stored (JSON) and checked.
pub trait Settings: Serialize + serde::de::DeserializeOwned + Default + PartialEq {
    const KIND: Target;
    fn validate(&self) -> Result<(), String>;
}

impl Settings for DeploymentOverride {
    const KIND: Target = Target::Deployment;
    fn validate(&self) -> Result<(), String> {
        match self.weight {
            Some(w) if !(1..=MAX_WEIGHT).contains(&w) => Err(format!("weight must be 1..={MAX_WEIGHT}")),
            _ => Ok(()),
        }
    }
}

impl Settings for ModelOverride {
    const KIND: Target = Target::Model;
    fn validate(&self) -> Result<(), String> {
        if let Some(s) = &self.strategy
            && relay_select::Strategy::parse(s).is_none()
        {
            return Err(format!("strategy must be one of {}", relay_select::Strategy::NAMES));
        }
        if self.hedge_after_ms.is_some_and(|ms| ms > 600_000) {
            return Err("hedge_after_ms must be at most 600000".into());
        }
        Ok(())
    }
}

/// Every override in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Overrides {
    pub deployments: HashMap<String, DeploymentOverride>,
    pub models: HashMap<String, ModelOverride>,
}

/// Which kind of target a change is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Deployment,
    Model,
}

impl Target {
    fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "deployment",
            Self::Model => "model",
        }
    }
}

/// Reads and writes `routing_overrides`.
#[derive(Clone)]
pub struct OverrideStore {
    db: Db,
}

/// Merges a JSON patch into stored settings: a field set to `null` goes back to the configured value.
fn merge(mut current: serde_json::Map<String, Value>, patch: &Value) -> Result<Value, String> {
    let Value::Object(p) = patch else { return Err("the body must be a JSON object".into()) };
    for (k, v) in p {
        if v.is_null() {
            current.remove(k);
        } else {
            current.insert(k.clone(), v.clone());
        }
    }
    Ok(Value::Object(current))
}

impl OverrideStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn load(&self) -> anyhow::Result<Overrides> {
        let rows = self
            .db
            .fetch(
                "SELECT target_kind, target, settings FROM routing_overrides",
                &[],
                &[Col::Text, Col::Text, Col::Text],
            )
            .await?;
        let mut out = Overrides::default();
        for row in rows {
            let (kind, target, settings) = (row[0].text(), row[1].text(), row[2].text());
            // A row this version cannot read (written by a newer one) is skipped, not fatal.
            let parsed = match kind {
                "deployment" => serde_json::from_str(settings).map(|o| {
                    out.deployments.insert(target.to_owned(), o);
                }),
                "model" => serde_json::from_str(settings).map(|o| {
                    out.models.insert(target.to_owned(), o);
                }),
                _ => Ok(()),
            };
            if let Err(e) = parsed {
                tracing::warn!(kind, target, error = %e, "skipping an unreadable routing override");
            }
        }
        Ok(out)
    }

    async fn current(&self, kind: Target, target: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
        let rows = self
            .db
            .fetch(
                "SELECT settings FROM routing_overrides WHERE target_kind = $1 AND target = $2",
                &[Arg::from(kind.as_str()), Arg::from(target)],
                &[Col::Text],
            )
            .await?;
        Ok(match rows.first() {
            Some(r) => serde_json::from_str(r[0].text()).unwrap_or_default(),
            None => serde_json::Map::new(),
        })
    }

    /// Applies `patch` to the override of `target` (a deployment id or a model group name, by `S`);
    /// `Err(Ok(msg))` = the change is invalid.
    pub async fn patch<S: Settings>(
        &self,
        target: &str,
        patch: &Value,
    ) -> Result<S, Result<String, anyhow::Error>> {
        let merged = merge(self.current(S::KIND, target).await.map_err(Err)?, patch).map_err(Ok)?;
        let o: S = serde_json::from_value(merged).map_err(|e| Ok(e.to_string()))?;
        o.validate().map_err(Ok)?;
        self.store(S::KIND, target, o == S::default(), &o).await.map_err(Err)?;
        Ok(o)
    }

    /// Drops every override of a target (back to the config). Returns whether there was one.
    pub async fn reset(&self, kind: Target, target: &str) -> anyhow::Result<bool> {
        let n = self
            .db
            .execute(
                "DELETE FROM routing_overrides WHERE target_kind = $1 AND target = $2",
                &[Arg::from(kind.as_str()), Arg::from(target)],
            )
            .await?;
        Ok(n > 0)
    }

    async fn store(&self, kind: Target, target: &str, empty: bool, o: &impl Serialize) -> anyhow::Result<()> {
        if empty {
            self.reset(kind, target).await?;
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        let args = [Arg::from(kind.as_str()), Arg::from(target)];
        tx.execute("DELETE FROM routing_overrides WHERE target_kind = $1 AND target = $2", &args).await?;
        tx.execute(
            "INSERT INTO routing_overrides (target_kind, target, settings, updated_at_ms) VALUES ($1, $2, $3, $4)",
            &[args[0].clone(), args[1].clone(), Arg::from(serde_json::to_string(o)?), Arg::from(relay_core::ids::now_ms())],
        )
        .await?;
        tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn patches_merge_validate_and_clear() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        let s = OverrideStore::new(db);
        let o = s.patch::<DeploymentOverride>("a@p", &serde_json::json!({"weight": 5})).await.unwrap();
        assert_eq!(o.weight, Some(5));
        let o = s.patch::<DeploymentOverride>("a@p", &serde_json::json!({"enabled": false})).await.unwrap();
        assert_eq!((o.weight, o.enabled), (Some(5), Some(false)), "fields merge");
        let bad = s.patch::<DeploymentOverride>("a@p", &serde_json::json!({"weight": 0})).await.unwrap_err();
        assert!(matches!(bad, Ok(m) if m.contains("weight")));
        let bad = s.patch::<DeploymentOverride>("a@p", &serde_json::json!({"wieght": 3})).await.unwrap_err();
        assert!(matches!(bad, Ok(m) if m.contains("unknown field")));
        let bad =
            s.patch::<ModelOverride>("m", &serde_json::json!({"strategy": "fastest"})).await.unwrap_err();
        assert!(matches!(bad, Ok(m) if m.contains("strategy")));
        s.patch::<ModelOverride>("m", &serde_json::json!({"strategy": "cost"})).await.unwrap();
        let all = s.load().await.unwrap();
        assert_eq!(all.deployments["a@p"].enabled, Some(false));
        assert_eq!(all.models["m"].strategy.as_deref(), Some("cost"));
        s.patch::<ModelOverride>("m", &serde_json::json!({"strategy": null})).await.unwrap();
        assert!(s.load().await.unwrap().models.is_empty(), "nothing left: the row goes");
        assert!(s.reset(Target::Deployment, "a@p").await.unwrap());
        assert_eq!(s.load().await.unwrap(), Overrides::default());
    }
}
