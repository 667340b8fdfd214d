//! relay-routing: which deployments may serve a model, best first.
//!
//! A public model name maps to an ordered list of deployments (provider + upstream model name). The edge
//! tries them in order and moves on only on a retryable failure before the first byte. Strategies (cost,
//! latency, health, weights) plug in here; credentials and protocols do not (they belong to the adapter).
//!
//! A model group answers with its deployments and then those of its fallback groups (each tagged with
//! its group), its strategy, timeouts and hedging delay. Operators change weights, strategies and drain
//! deployments at runtime ([`overrides`], stored in the database and reloaded every `refresh_ms`); the
//! edge orders each request's candidates itself (relay-select), from this answer and the health it sees.

pub mod admin;
mod config;
pub mod overrides;

pub use config::*;

use std::collections::HashMap;
use std::sync::Arc;

use relay_core::contracts::{Result, Router};
use relay_core::pb::common::v1::DisconnectPolicy;
use relay_core::pb::routing::v1::{
    Deployment, ListModelsResponse, ModelInfo, ModelKind, Price, RouteRequest, RouteResponse,
};
use relay_core::{ErrorCode, RelayError};

struct Model {
    info: ModelInfo,
    candidates: Vec<Deployment>,
    on_disconnect: DisconnectPolicy,
    timeouts: Timeouts,
    strategy: String,
    fallbacks: Vec<String>,
    hedge_after_ms: u32,
    rules: Vec<relay_core::pb::routing::v1::Rule>,
    prompt_affinity: bool,
    response_cache_ttl_secs: u32,
    provider_responses_state: bool,
}

pub struct RoutingService {
    cache_ttl_ms: u32,
    refresh: std::time::Duration,
    models: HashMap<String, Model>,
    order: Vec<String>,
    /// Runtime changes in force (from the database; none without one).
    overrides: std::sync::RwLock<Arc<overrides::Overrides>>,
    store: Option<overrides::OverrideStore>,
}

/// The configured deployments with the runtime changes applied: drained ones left out, weights replaced.
fn effective(candidates: &[Deployment], o: &overrides::Overrides) -> Vec<Deployment> {
    candidates
        .iter()
        .filter_map(|d| match o.deployments.get(&d.id) {
            None => Some(d.clone()),
            Some(c) if c.enabled == Some(false) => None,
            Some(c) => Some(Deployment { weight: c.weight.unwrap_or(d.weight), ..d.clone() }),
        })
        .collect()
}

impl RoutingService {
    pub fn new(cfg: &RoutingConfig) -> Self {
        let created = 1_700_000_000;
        // Deployments without a configured price take the catalog's, so budget reservations are real bounds.
        let catalog = relay_pricing::parse_catalog(relay_pricing::SHIPPED_CATALOG, "catalog")
            .map(relay_pricing::PriceBook::new)
            .unwrap_or_default();
        let now = relay_core::ids::now_ms();
        let mut models = HashMap::new();
        let mut order = Vec::new();
        for m in &cfg.models {
            let candidates = m
                .deployments
                .iter()
                .map(|d| Deployment {
                    id: d.id(),
                    provider: d.provider.clone(),
                    upstream_model: d.model.clone(),
                    weight: d.weight.unwrap_or(0),
                    price: match &d.price {
                        Some(p) => Some(Price {
                            input_per_mtok_micros: p.input_per_mtok_micros,
                            output_per_mtok_micros: p.output_per_mtok_micros,
                            cached_input_per_mtok_micros: p.cached_input_per_mtok_micros,
                            currency: p.currency.clone(),
                            per_image_micros: p.per_image_micros,
                            per_mchar_micros: p.per_mchar_micros,
                        }),
                        None if d.free => None,
                        None => catalog.resolve(&d.provider, &d.model, now).map(|p| Price {
                            input_per_mtok_micros: p.input,
                            output_per_mtok_micros: p.output,
                            cached_input_per_mtok_micros: p.cached_input,
                            currency: p.currency.clone(),
                            ..Default::default()
                        }),
                    },
                    max_output_tokens: d.max_output_tokens,
                    free: d.free,
                    region: d.region.clone().unwrap_or_default(),
                    group: m.name.clone(),
                    requests_per_minute: d.rpm.unwrap_or(0),
                    tokens_per_minute: d.tpm.unwrap_or(0),
                })
                .collect();
            let kind = match m.kind {
                Kind::Chat => ModelKind::Chat,
                Kind::Embedding => ModelKind::Embedding,
            };
            let info =
                ModelInfo { id: m.name.clone(), owned_by: m.owned_by.clone(), created, kind: kind as i32 };
            order.push(m.name.clone());
            let on_disconnect = match m.on_disconnect {
                None => DisconnectPolicy::Unspecified,
                Some(OnDisconnect::Drain) => DisconnectPolicy::Drain,
                Some(OnDisconnect::Cancel) => DisconnectPolicy::Cancel,
            };
            let strategy = m.strategy.clone().unwrap_or_default();
            models.insert(
                m.name.clone(),
                Model {
                    info,
                    candidates,
                    on_disconnect,
                    timeouts: m.timeouts,
                    strategy,
                    fallbacks: m.fallbacks.clone(),
                    hedge_after_ms: m.hedge_after_ms.unwrap_or(0),
                    rules: m.rules.iter().enumerate().map(|(i, r)| r.to_pb(i)).collect(),
                    prompt_affinity: m.prompt_affinity,
                    response_cache_ttl_secs: m.response_cache_ttl_secs,
                    provider_responses_state: m.responses_state == config::ResponsesState::Provider,
                },
            );
        }
        Self {
            cache_ttl_ms: cfg.cache_ttl_ms,
            refresh: std::time::Duration::from_millis(cfg.refresh_ms.max(100)),
            models,
            order,
            overrides: Default::default(),
            store: None,
        }
    }

    /// As [`Self::new`], applying the runtime changes stored in `db` (loaded now, then every `refresh_ms`
    /// through [`Self::follow`]).
    pub async fn with_store(cfg: &RoutingConfig, db: relay_db::Db) -> anyhow::Result<Self> {
        let mut s = Self::new(cfg);
        s.store = Some(overrides::OverrideStore::new(db));
        s.refresh().await?;
        Ok(s)
    }

    pub fn store(&self) -> Option<&overrides::OverrideStore> {
        self.store.as_ref()
    }

    /// Reloads the runtime changes from the database.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let Some(store) = &self.store else { return Ok(()) };
        let fresh = store.load().await?;
        let mut current = self.overrides.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if **current != fresh {
            tracing::info!(
                deployments = fresh.deployments.len(),
                models = fresh.models.len(),
                "routing overrides changed"
            );
            *current = Arc::new(fresh);
        }
        Ok(())
    }

    /// Reloads the runtime changes every `refresh_ms` until `stop`; a database outage keeps the last ones.
    pub async fn follow(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "could not reload routing overrides; keeping the last ones");
            }
        }
    }

    pub fn has_model(&self, name: &str) -> bool {
        self.models.contains_key(name)
    }

    pub fn has_deployment(&self, id: &str) -> bool {
        self.models.values().any(|m| m.candidates.iter().any(|d| d.id == id))
    }

    fn current(&self) -> Arc<overrides::Overrides> {
        self.overrides.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

#[async_trait::async_trait]
impl Router for RoutingService {
    async fn route(&self, req: RouteRequest) -> Result<RouteResponse> {
        let model = self.models.get(&req.model).ok_or_else(|| {
            RelayError::new(ErrorCode::ModelNotFound, format!("The model `{}` does not exist.", req.model))
                .with_param("model")
        })?;
        let o = self.current();
        let mut candidates = effective(&model.candidates, &o);
        if candidates.is_empty() {
            return Err(RelayError::new(
                ErrorCode::Unavailable,
                format!("Every deployment of the model `{}` is drained by the operator.", req.model),
            ));
        }
        for f in &model.fallbacks {
            if let Some(fallback) = self.models.get(f) {
                candidates.extend(effective(&fallback.candidates, &o));
            }
        }
        let changed = o.models.get(&req.model);
        Ok(RouteResponse {
            candidates,
            cache_ttl_ms: self.cache_ttl_ms,
            on_disconnect: model.on_disconnect as i32,
            first_byte_timeout_ms: model.timeouts.first_byte_ms,
            idle_timeout_ms: model.timeouts.idle_ms,
            total_timeout_ms: model.timeouts.total_ms,
            strategy: changed.and_then(|c| c.strategy.clone()).unwrap_or_else(|| model.strategy.clone()),
            hedge_after_ms: changed.and_then(|c| c.hedge_after_ms).unwrap_or(model.hedge_after_ms),
            rules: model.rules.clone(),
            prompt_affinity: model.prompt_affinity,
            response_cache_ttl_secs: model.response_cache_ttl_secs,
            provider_responses_state: model.provider_responses_state,
        })
    }

    async fn list_models(&self) -> Result<ListModelsResponse> {
        Ok(ListModelsResponse {
            models: self.order.iter().filter_map(|n| self.models.get(n)).map(|m| m.info.clone()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RoutingConfig {
        let dep = |p: &str, m: &str| DeploymentConfig {
            provider: p.into(),
            model: m.into(),
            weight: None,
            price: None,
            free: false,
            region: None,
            max_output_tokens: 4096,
            rpm: None,
            tpm: None,
        };
        RoutingConfig {
            cache_ttl_ms: 500,
            refresh_ms: 1000,
            models: vec![
                ModelConfig {
                    name: "b".into(),
                    kind: Kind::Chat,
                    owned_by: "relay".into(),
                    deployments: vec![dep("p1", "x"), dep("p2", "y")],
                    on_disconnect: None,
                    timeouts: Timeouts::default(),
                    strategy: None,
                    fallbacks: vec![],
                    hedge_after_ms: None,
                    rules: vec![],
                    prompt_affinity: false,
                    response_cache_ttl_secs: 0,
                    responses_state: Default::default(),
                },
                ModelConfig {
                    name: "a".into(),
                    kind: Kind::Embedding,
                    owned_by: "relay".into(),
                    deployments: vec![dep("p1", "e")],
                    on_disconnect: Some(OnDisconnect::Cancel),
                    timeouts: Timeouts::default(),
                    strategy: Some("cost".into()),
                    fallbacks: vec![],
                    hedge_after_ms: None,
                    rules: vec![],
                    prompt_affinity: false,
                    response_cache_ttl_secs: 0,
                    responses_state: Default::default(),
                },
            ],
        }
    }

    #[tokio::test]
    async fn routes_in_configured_order() {
        let svc = RoutingService::new(&cfg());
        let r = svc.route(RouteRequest { model: "b".into(), ..Default::default() }).await.unwrap();
        let ids: Vec<_> = r.candidates.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["x@p1", "y@p2"]);
        assert_eq!(r.cache_ttl_ms, 500);
        let models: Vec<_> = svc.list_models().await.unwrap().models.into_iter().map(|m| m.id).collect();
        assert_eq!(models, ["b", "a"]);
    }

    #[tokio::test]
    async fn unknown_model_is_model_not_found() {
        let e = RoutingService::new(&cfg())
            .route(RouteRequest { model: "zz".into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::ModelNotFound);
        assert_eq!(e.param.as_deref(), Some("model"));
    }

    #[tokio::test]
    async fn unpriced_deployments_take_the_catalog_price_unless_free() {
        let mut c = cfg();
        c.models[0].deployments[0].model = "gpt-4o".into();
        c.models[0].deployments[1].model = "gpt-4o".into();
        c.models[0].deployments[1].free = true;
        let r = RoutingService::new(&c)
            .route(RouteRequest { model: "b".into(), ..Default::default() })
            .await
            .unwrap();
        let p = r.candidates[0].price.clone().expect("catalog price");
        assert_eq!((p.input_per_mtok_micros, p.output_per_mtok_micros), (2_500_000, 10_000_000));
        assert!(r.candidates[1].price.is_none() && r.candidates[1].free);
    }

    #[tokio::test]
    async fn fallback_groups_follow_and_runtime_changes_apply() {
        let mut c = cfg();
        c.models[1].kind = Kind::Chat;
        c.models[0].fallbacks = vec!["a".into()];
        let db = relay_db::Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        let svc = RoutingService::with_store(&c, db).await.unwrap();
        let b = || RouteRequest { model: "b".into(), ..Default::default() };
        let r = svc.route(b()).await.unwrap();
        let ids: Vec<_> = r.candidates.iter().map(|d| (d.id.as_str(), d.group.as_str())).collect();
        assert_eq!(ids, [("x@p1", "b"), ("y@p2", "b"), ("e@p1", "a")]);
        let store = svc.store().unwrap();
        store
            .patch::<overrides::DeploymentOverride>("x@p1", &serde_json::json!({"enabled": false}))
            .await
            .unwrap();
        store
            .patch::<overrides::DeploymentOverride>("y@p2", &serde_json::json!({"weight": 9}))
            .await
            .unwrap();
        store
            .patch::<overrides::ModelOverride>(
                "b",
                &serde_json::json!({"strategy": "cost", "hedge_after_ms": 200}),
            )
            .await
            .unwrap();
        assert_eq!(
            svc.route(b()).await.unwrap().candidates.len(),
            3,
            "applied on the next refresh, not before"
        );
        svc.refresh().await.unwrap();
        let r = svc.route(b()).await.unwrap();
        let ids: Vec<_> = r.candidates.iter().map(|d| (d.id.as_str(), d.weight)).collect();
        assert_eq!(ids, [("y@p2", 9), ("e@p1", 0)]);
        assert_eq!((r.strategy.as_str(), r.hedge_after_ms), ("cost", 200));
        store
            .patch::<overrides::DeploymentOverride>("y@p2", &serde_json::json!({"enabled": false}))
            .await
            .unwrap();
        svc.refresh().await.unwrap();
        let e = svc.route(b()).await.unwrap_err();
        assert!(e.code == ErrorCode::Unavailable && e.message.contains("drained"), "{e:?}");
    }

    #[test]
    fn rules_need_a_condition_and_valid_values() {
        let mut c = cfg();
        let rule = |strategy: &str, pct: Option<u32>, hours: Option<&str>| RuleConfig {
            name: None,
            strategy: strategy.into(),
            when_budget_used_pct: pct,
            hours_utc: hours.map(str::to_owned),
            when_p95_ms_above: None,
        };
        c.models[0].rules = vec![
            rule("cost", Some(80), None),
            rule("cost", None, Some("22-06")),
            rule("fastest", None, None),
            rule("cost", Some(101), Some("25-3")),
        ];
        c.models[0].fallbacks = vec!["b".into(), "zz".into()];
        let mut errs = vec![];
        c.validate(None, &mut errs);
        let all = errs.join("\n");
        for needle in [
            "rules[2].strategy",
            "rules[2]: needs a condition",
            "rules[3].hours_utc",
            "rules[3].when_budget_used_pct",
            "fall back to itself",
            "unknown model group `zz`",
        ] {
            assert!(all.contains(needle), "{needle} missing in:\n{all}");
        }
        assert_eq!(errs.len(), 6, "{all}");
    }

    #[test]
    fn validation_finds_unknown_providers_and_empty_models() {
        let mut c = cfg();
        c.models[1].deployments.clear();
        let mut errs = vec![];
        c.validate(Some(&["p1"]), &mut errs);
        assert_eq!(errs.len(), 2, "{errs:?}");
    }
}
