//! The `[routing]` config section: model groups, their deployments, strategies, rules, fallbacks and
//! timeouts, and the checks `relay check` runs on them.

use serde::Deserialize;

/// `[routing]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// How long an edge may reuse a routing answer.
    pub cache_ttl_ms: u32,
    /// How often runtime changes (admin API, `relay routing`) are reloaded from the database.
    pub refresh_ms: u64,
    pub models: Vec<ModelConfig>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self { cache_ttl_ms: 1000, refresh_ms: 1000, models: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub name: String,
    #[serde(default = "chat")]
    pub kind: Kind,
    #[serde(default = "owner")]
    pub owned_by: String,
    /// Tried in this order.
    pub deployments: Vec<DeploymentConfig>,
    /// When a client leaves mid-answer: `drain` (read on and bill the provider's usage) or `cancel` (stop
    /// the upstream, bill what it produced). Unset: whole answers drain, streams cancel.
    #[serde(default)]
    pub on_disconnect: Option<OnDisconnect>,
    /// Timeouts in milliseconds (unset = none): until a deployment accepts the request (a slower one is
    /// failed over), the longest silence between two stream events, and the whole answer.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// How healthy deployments are ordered per request: `weighted` (default; config order when no
    /// deployment has a weight), `priority`, `cost` (cheapest for the request first), `latency`.
    #[serde(default)]
    pub strategy: Option<String>,
    /// Other model groups tried, in order, once every deployment of this one failed, was isolated or
    /// was at its upstream rate limit (e.g. `gpt-4o` → `["claude-sonnet"]`).
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Hedging (opt-in): no answer from the first attempt after this many ms starts a second one on the
    /// next deployment; the first to answer wins and the other is cancelled (its cost is hedge overhead).
    #[serde(default)]
    pub hedge_after_ms: Option<u32>,
    /// Budget-, time- and load-aware rules, first match wins: e.g. `{ when_budget_used_pct = 80,
    /// strategy = "cost" }`, `{ hours_utc = "22-06", strategy = "cost" }`, `{ when_p95_ms_above = 3000,
    /// strategy = "latency" }`.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Cache affinity without an `x-relay-session` header: a key's requests whose (long) prompts share
    /// their beginning stick to one healthy deployment, so provider prompt caches keep hitting.
    #[serde(default)]
    pub prompt_affinity: bool,
    /// Response cache (opt-in): an identical request of the same org within this many seconds is answered
    /// from the cache, stream or not, without calling an upstream (a hit costs no provider tokens).
    /// Never for zero-retention keys. Unset or 0: never cached.
    #[serde(default)]
    pub response_cache_ttl_secs: u32,
    /// Where the Responses API's state lives for this group: "relay" (the default: Relay's store, so any
    /// upstream works) or "provider" (OpenAI upstreams with `responses_api = true` keep it themselves;
    /// Relay checks that the ids a request names belong to its org, and keeps a copy for GET).
    #[serde(default)]
    pub responses_state: ResponsesState,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponsesState {
    #[default]
    Relay,
    Provider,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Shown in the `x-relay-routing-rule` header (default: `rules[i]`).
    #[serde(default)]
    pub name: Option<String>,
    pub strategy: String,
    /// A budget of the caller (key, team or org) is at least this % spent this period.
    #[serde(default)]
    pub when_budget_used_pct: Option<u32>,
    /// `HH-HH` in UTC, wrapping midnight (`22-06`).
    #[serde(default)]
    pub hours_utc: Option<String>,
    /// The group's fastest deployment's recent p95 is above this.
    #[serde(default)]
    pub when_p95_ms_above: Option<u32>,
}

impl RuleConfig {
    /// `HH-HH` → (from, to), or `None` if malformed.
    fn hours(&self) -> Option<Option<(u32, u32)>> {
        let Some(h) = &self.hours_utc else { return Some(None) };
        let (a, b) = h.split_once('-')?;
        let (a, b) = (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?);
        (a < 24 && b <= 24 && a != b).then_some(Some((a, b)))
    }

    pub(crate) fn to_pb(&self, i: usize) -> relay_core::pb::routing::v1::Rule {
        let hours = self.hours().flatten();
        relay_core::pb::routing::v1::Rule {
            name: self.name.clone().unwrap_or_else(|| format!("rules[{i}]")),
            strategy: self.strategy.clone(),
            budget_used_pct: self.when_budget_used_pct.unwrap_or(0),
            has_hours: hours.is_some(),
            from_hour: hours.map_or(0, |h| h.0),
            to_hour: hours.map_or(0, |h| h.1),
            p95_above_ms: self.when_p95_ms_above.unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub first_byte_ms: u32,
    pub idle_ms: u32,
    pub total_ms: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    Drain,
    Cancel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Chat,
    Embedding,
}

fn chat() -> Kind {
    Kind::Chat
}

fn owner() -> String {
    "relay".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    /// A provider name from `[[adapter.providers]]`.
    pub provider: String,
    /// The model name the provider knows.
    pub model: String,
    /// Share of first attempts among the model's deployments. Unset on all of them: they are tried in the
    /// order listed (the first is the primary, the rest fallbacks).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Integer micro-units per million tokens; absent = the shipped catalog's price for the model, if any.
    #[serde(default)]
    pub price: Option<PriceConfig>,
    /// Where the deployment processes data (e.g. `eu`); keys pinned to regions only use tagged ones.
    #[serde(default)]
    pub region: Option<String>,
    /// No price on purpose: keys with a budget may use it (otherwise an unpriced deployment is refused
    /// for them, since Relay could not bill it).
    #[serde(default)]
    pub free: bool,
    /// Answer length assumed when a request sets no limit (bounds budget and token reservations).
    #[serde(default = "default_max_output")]
    pub max_output_tokens: u64,
    /// The upstream account's limits for this deployment (requests and tokens per minute), counted
    /// across every replica: at its limit the deployment is skipped (the next one, or a fallback group,
    /// serves) instead of earning a 429.
    #[serde(default)]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub tpm: Option<u64>,
}

impl DeploymentConfig {
    /// The deployment's stable id (`<model>@<provider>`), the key routing and the adapter share.
    pub fn id(&self) -> String {
        format!("{}@{}", self.model, self.provider)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub input_per_mtok_micros: i64,
    pub output_per_mtok_micros: i64,
    #[serde(default)]
    pub cached_input_per_mtok_micros: i64,
    /// Per generated image (image models priced per image).
    #[serde(default)]
    pub per_image_micros: i64,
    /// Per million characters of input (speech models priced per character).
    #[serde(default)]
    pub per_mchar_micros: i64,
    #[serde(default = "usd")]
    pub currency: String,
}

fn usd() -> String {
    "USD".into()
}

fn default_max_output() -> u64 {
    4096
}

impl RoutingConfig {
    /// `providers`: names the adapter config defines (checked when both are in one config file).
    pub fn validate(&self, providers: Option<&[&str]>, errors: &mut Vec<String>) {
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("routing.models[{i}] ({})", m.name);
            if m.name.is_empty() || !names.insert(&m.name) {
                errors.push(format!("{at}: name must be non-empty and unique"));
            }
            if m.strategy.as_deref().is_some_and(|s| relay_select::Strategy::parse(s).is_none()) {
                errors.push(format!("{at}.strategy: must be one of {}", relay_select::Strategy::NAMES));
            }
            if m.hedge_after_ms.is_some_and(|ms| ms == 0 || ms > 600_000) {
                errors.push(format!("{at}.hedge_after_ms: 1..=600000"));
            }
            for f in &m.fallbacks {
                match self.models.iter().find(|o| o.name == *f) {
                    None => errors.push(format!("{at}.fallbacks: unknown model group `{f}`")),
                    Some(_) if *f == m.name => {
                        errors.push(format!("{at}.fallbacks: a group cannot fall back to itself"))
                    }
                    Some(o) if o.kind != m.kind => {
                        errors.push(format!("{at}.fallbacks: `{f}` serves another kind of model"))
                    }
                    Some(_) => {}
                }
            }
            for (j, r) in m.rules.iter().enumerate() {
                let at = format!("{at}.rules[{j}]");
                if relay_select::Strategy::parse(&r.strategy).is_none() {
                    errors.push(format!("{at}.strategy: must be one of {}", relay_select::Strategy::NAMES));
                }
                if r.hours().is_none() {
                    errors.push(format!("{at}.hours_utc: `HH-HH` in UTC, e.g. `22-06`"));
                }
                if r.when_budget_used_pct.is_some_and(|p| p == 0 || p > 100) {
                    errors.push(format!("{at}.when_budget_used_pct: 1..=100"));
                }
                if r.when_budget_used_pct.is_none() && r.hours_utc.is_none() && r.when_p95_ms_above.is_none()
                {
                    errors.push(format!(
                        "{at}: needs a condition (when_budget_used_pct, hours_utc or when_p95_ms_above)"
                    ));
                }
            }
            let mut ids = std::collections::HashSet::new();
            for (j, d) in m.deployments.iter().enumerate() {
                if !ids.insert((&d.provider, &d.model)) {
                    errors
                        .push(format!("{at}.deployments[{j}]: `{}@{}` is listed twice", d.model, d.provider));
                }
                if d.rpm == Some(0) || d.tpm == Some(0) {
                    errors.push(format!("{at}.deployments[{j}]: rpm and tpm must be at least 1 when set"));
                }
            }
            if m.deployments.is_empty() {
                errors.push(format!("{at}: needs at least one deployment"));
            }
            for (j, d) in m.deployments.iter().enumerate() {
                if d.region.as_deref().is_some_and(|r| !relay_core::is_region_tag(r)) {
                    errors.push(format!("{at}.deployments[{j}].region: 1-32 of a-z, 0-9 and '-'"));
                }
                if d.weight == Some(0) {
                    errors.push(format!("{at}.deployments[{j}]: weight must be at least 1"));
                }
                if d.free && d.price.is_some() {
                    errors.push(format!("{at}.deployments[{j}]: a free deployment cannot have a price"));
                }
                if d.price.as_ref().is_some_and(|p| {
                    p.input_per_mtok_micros < 0
                        || p.output_per_mtok_micros < 0
                        || p.cached_input_per_mtok_micros < 0
                        || p.per_image_micros < 0
                        || p.per_mchar_micros < 0
                }) {
                    errors.push(format!("{at}.deployments[{j}].price: prices cannot be negative"));
                }
                if let Some(known) = providers
                    && !known.contains(&d.provider.as_str())
                {
                    errors.push(format!("{at}.deployments[{j}]: unknown provider `{}`", d.provider));
                }
            }
        }
    }
}
