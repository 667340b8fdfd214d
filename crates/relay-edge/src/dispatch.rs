//! What every model route shares: reading the body, checking the model, routing from the local cache,
//! and trying deployments in order until one accepts.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use relay_core::pb::auth::v1::Principal;
use relay_core::pb::routing::v1::{Deployment, RouteRequest, RouteResponse};
use relay_core::{ErrorCode, RelayError};

use crate::Edge;
use crate::usage::UsageRecord;

/// `x-relay-deployment` (the deployment that served, or was tried last) and `x-relay-attempts`.
pub fn served_headers(h: &mut axum::http::HeaderMap, rec: &UsageRecord) {
    let (deployment, attempts) = rec.served_by();
    if attempts == 0 {
        return;
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(deployment) {
        h.insert("x-relay-deployment", v);
    }
    h.insert("x-relay-attempts", axum::http::HeaderValue::from(attempts));
    if let Ok(v) = axum::http::HeaderValue::from_str(rec.rule())
        && !rec.rule().is_empty()
    {
        h.insert("x-relay-routing-rule", v);
    }
}

/// Reads the body up to `limit` bytes (anything larger is refused without being read to the end) and
/// parses the fields a handler needs; the bytes are kept to forward untouched.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    edge: &Edge,
    body: Body,
) -> Result<(Bytes, T), RelayError> {
    let limit = edge.inner.cfg.max_body_bytes;
    let timeout = std::time::Duration::from_millis(edge.inner.cfg.body_read_timeout_ms);
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            // A body past the limit, or one the client broke off.
            let too_large =
                std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return Err(if too_large {
                RelayError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("Request body too large: the limit is {limit} bytes."),
                )
            } else {
                RelayError::invalid_request("The request body could not be read.")
            });
        }
        Err(_) => {
            metrics::counter!("relay_edge_body_timeouts_total").increment(1);
            return Err(RelayError::new(
                ErrorCode::RequestTimeout,
                format!("The request body did not arrive within {} ms.", timeout.as_millis()),
            ));
        }
    };
    let parsed = serde_json::from_slice(&bytes).map_err(|e| {
        RelayError::invalid_request(format!("We could not parse the JSON body of your request: {e}"))
    })?;
    Ok((bytes, parsed))
}

/// Longest model name accepted: it is stored with every usage record and travels on the bus.
pub const MAX_MODEL_BYTES: usize = 256;

pub fn required_model(model: Option<String>) -> Result<String, RelayError> {
    let model = model.filter(|m| !m.is_empty()).ok_or_else(|| {
        RelayError::invalid_request("you must provide a model parameter").with_param("model")
    })?;
    if model.len() > MAX_MODEL_BYTES {
        return Err(RelayError::invalid_request(format!(
            "`model` is too long: at most {MAX_MODEL_BYTES} bytes are allowed (got {}).",
            model.len()
        ))
        .with_param("model"));
    }
    Ok(model)
}

/// Longest end-user id accepted (OpenAI `user`, Anthropic `metadata.user_id`). It is stored with every usage
/// record and travels on the bus, so it is bounded here, where the client can be told.
pub const MAX_END_USER_BYTES: usize = 256;

/// The end-user id must be short and printable: it is stored, exported and shown in reports.
pub fn check_end_user(user: &str, param: &str) -> Result<(), RelayError> {
    if user.len() > MAX_END_USER_BYTES {
        return Err(RelayError::invalid_request(format!(
            "`{param}` is too long: at most {MAX_END_USER_BYTES} bytes are allowed (got {}).",
            user.len()
        ))
        .with_param(param));
    }
    if user.chars().any(char::is_control) {
        return Err(RelayError::invalid_request(format!("`{param}` must not contain control characters."))
            .with_param(param));
    }
    Ok(())
}

pub fn ensure_allowed(principal: &Principal, model: &str) -> Result<(), RelayError> {
    if relay_core::model_allowed(&principal.allowed_models, model) {
        Ok(())
    } else {
        Err(RelayError::new(ErrorCode::PermissionDenied, format!("This key may not use model `{model}`."))
            .with_param("model"))
    }
}

/// Data residency: a key pinned to regions is only ever sent to deployments tagged with one of them (on
/// failover too); none left is a 403 naming the constraint.
pub fn resident(
    principal: &Principal,
    model: &str,
    candidates: &[Deployment],
) -> Result<Vec<Deployment>, RelayError> {
    if principal.allowed_regions.is_empty() {
        return Ok(candidates.to_vec());
    }
    let ok: Vec<Deployment> =
        candidates.iter().filter(|d| principal.allowed_regions.contains(&d.region)).cloned().collect();
    if ok.is_empty() {
        return Err(RelayError::new(
            ErrorCode::PermissionDenied,
            format!(
                "The model `{model}` has no deployment in the regions this key may use ({}).",
                principal.allowed_regions.join(", ")
            ),
        )
        .with_param("model"));
    }
    Ok(ok)
}

/// The candidates this caller may be sent to: a key with a budget never goes to a deployment Relay could
/// not bill (no price, and not marked free by the operator).
pub fn billable(
    principal: &Principal,
    model: &str,
    candidates: &[Deployment],
) -> Result<Vec<Deployment>, RelayError> {
    let has_budget = principal
        .scopes
        .iter()
        .any(|s| s.budget.as_ref().and_then(|b| b.limit.as_ref()).is_some_and(|m| m.micros > 0));
    if !has_budget {
        return Ok(candidates.to_vec());
    }
    let ok: Vec<Deployment> = candidates.iter().filter(|d| d.price.is_some() || d.free).cloned().collect();
    if ok.is_empty() {
        return Err(RelayError::new(
            ErrorCode::PermissionDenied,
            format!("The model `{model}` has no price, and this key has a budget, so it cannot be billed. Ask the operator to price it or mark it free."),
        )
        .with_param("model"));
    }
    Ok(ok)
}

pub async fn route(edge: &Edge, model: &str, stream: bool) -> Result<Arc<RouteResponse>, RelayError> {
    if let Some(r) = edge.inner.routes.get(&model.to_owned()) {
        return Ok(r);
    }
    let req = RouteRequest { model: model.to_owned(), stream, ..Default::default() };
    let resp = Arc::new(edge.inner.services.router.route(req).await?);
    let ttl = std::time::Duration::from_millis(u64::from(resp.cache_ttl_ms));
    edge.inner.routes.insert(model.to_owned(), resp.clone(), ttl);
    Ok(resp)
}

/// How to order one request's candidates: the group's (or the request's) strategy, and its token estimate
/// (input, output) for cost-first.
#[derive(Debug, Clone, Copy, Default)]
pub struct Order {
    pub strategy: relay_select::Strategy,
    pub tokens: (u64, u64),
    /// The conversation (`x-relay-session` header, hashed with the key) that should stay on one deployment.
    pub session: Option<u64>,
    /// Hedging: start a second attempt when the first has not answered after this long.
    pub hedge_after: Option<std::time::Duration>,
}

impl Order {
    /// The route's hedging delay, if it hedges.
    pub fn hedging(mut self, route: &RouteResponse) -> Self {
        self.hedge_after = (route.hedge_after_ms > 0)
            .then(|| std::time::Duration::from_millis(u64::from(route.hedge_after_ms)));
        self
    }
}

/// Prompts shorter than this get no prompt affinity (providers cache only long prefixes).
const PROMPT_AFFINITY_MIN_BYTES: usize = 4096;
/// How much of the body's beginning identifies a conversation for prompt affinity.
const PROMPT_AFFINITY_PREFIX: usize = 2048;

/// Cache affinity: a client's `x-relay-session` header, scoped to its key, so one conversation keeps
/// hitting the same deployment (and its prompt cache) while that deployment is healthy. Without the
/// header, a group with prompt affinity uses the key plus the first 2 KiB of a long request body (the
/// model, system prompt and first turns, which later turns of the conversation repeat).
pub fn session(
    headers: &axum::http::HeaderMap,
    principal: &Principal,
    route: &RouteResponse,
    body: &[u8],
) -> Option<u64> {
    let s = match headers.get("x-relay-session") {
        Some(v) => v.as_bytes(),
        None if route.prompt_affinity && body.len() >= PROMPT_AFFINITY_MIN_BYTES => {
            &body[..PROMPT_AFFINITY_PREFIX]
        }
        None => return None,
    };
    let mut key = principal.key_id.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&s[..s.len().min(PROMPT_AFFINITY_PREFIX)]);
    Some(relay_select::session_hash(&key))
}

/// How one request's candidates are ordered, and the routing rule that chose it (if one did).
#[derive(Debug, Clone, Default)]
pub struct Decision {
    pub strategy: relay_select::Strategy,
    pub rule: Option<String>,
}

/// The strategy for a request, most specific first: the `x-relay-strategy` header, the key's own
/// strategy, the first of the group's rules whose conditions hold (budget spent, UTC hours, the group's
/// fastest p95), the group's strategy. `lease`: the request's admission, for budget rules (none when the
/// caller has no limits, or the pipeline is not billed).
pub async fn decide(
    edge: &Edge,
    headers: &axum::http::HeaderMap,
    principal: &Principal,
    route: &RouteResponse,
    lease: Option<&relay_core::contracts::Admission>,
) -> Result<Decision, RelayError> {
    if let Some(v) = headers.get("x-relay-strategy") {
        let strategy = v.to_str().ok().and_then(relay_select::Strategy::parse).ok_or_else(|| {
            RelayError::invalid_request(format!(
                "`x-relay-strategy` must be one of {}",
                relay_select::Strategy::NAMES
            ))
        })?;
        return Ok(Decision { strategy, rule: None });
    }
    if let Some(strategy) = relay_select::Strategy::parse(&principal.routing_strategy) {
        return Ok(Decision { strategy, rule: None });
    }
    let mut budget_used = None;
    for rule in &route.rules {
        if rule.budget_used_pct > 0 {
            if budget_used.is_none() {
                budget_used = Some(match lease {
                    Some(a) => edge.inner.services.limiter.budget_used(a).await,
                    None => None,
                });
            }
            let used = budget_used.flatten().unwrap_or(0.0);
            if used * 100.0 < f64::from(rule.budget_used_pct) {
                continue;
            }
        }
        if rule.has_hours && !in_hours(relay_core::ids::now_ms(), rule.from_hour, rule.to_hour) {
            continue;
        }
        if rule.p95_above_ms > 0
            && edge
                .inner
                .selector
                .best_p95(&route.candidates)
                .is_none_or(|p| p <= f64::from(rule.p95_above_ms))
        {
            continue;
        }
        if let Some(strategy) = relay_select::Strategy::parse(&rule.strategy) {
            metrics::counter!("relay_edge_routing_rule_total", "rule" => rule.name.clone()).increment(1);
            return Ok(Decision { strategy, rule: Some(rule.name.clone()) });
        }
    }
    Ok(Decision { strategy: relay_select::Strategy::parse(&route.strategy).unwrap_or_default(), rule: None })
}

/// Is the UTC hour of `now_ms` in `[from, to)`, wrapping midnight?
fn in_hours(now_ms: i64, from: u32, to: u32) -> bool {
    let hour = u32::try_from(now_ms.div_euclid(3_600_000).rem_euclid(24)).unwrap_or(0);
    if from < to { (from..to).contains(&hour) } else { hour >= from || hour < to }
}

/// The reservation a request holds while it runs: every input byte may be a token (byte-level BPE
/// tokenizers never make a token of less than a byte, so this bounds the real count), plus the answer's
/// limit (the request's, else the largest any candidate deployment gives), at the highest candidate price.
/// Largest answer-length limit accepted (tokens): far above any model's, far below what arithmetic on
/// it could overflow.
pub const MAX_OUTPUT_TOKENS: u64 = 1 << 24;
/// Most answers one request may ask for (OpenAI `n`).
pub const MAX_CHOICES: u64 = 128;

/// The output a request may produce: its limit (unset: each deployment's `max_output_tokens`, which the
/// adapter then sends upstream) times the answers it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimit {
    pub tokens: Option<u64>,
    pub choices: u64,
    /// Images the request may generate (priced per image).
    pub images: u64,
}

impl Default for OutputLimit {
    fn default() -> Self {
        Self { tokens: None, choices: 1, images: 0 }
    }
}

/// A token count field: absent or null = `None`; otherwise a whole number in `0..=max`, else a 400.
pub fn token_count(param: &str, v: Option<&serde_json::Value>, max: u64) -> Result<Option<u64>, RelayError> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    match v.as_u64() {
        Some(n) if n <= max => Ok(Some(n)),
        Some(_) => {
            Err(RelayError::invalid_request(format!("`{param}` is too large: at most {max} is allowed."))
                .with_param(param))
        }
        None => Err(RelayError::invalid_request(format!("`{param}` must be a non-negative integer."))
            .with_param(param)),
    }
}

pub fn admission(
    ctx: &crate::request::RequestCtx,
    principal: &Principal,
    body_bytes: usize,
    limit: OutputLimit,
    candidates: &[Deployment],
) -> relay_core::contracts::Admission {
    let input = u64::try_from(body_bytes).unwrap_or(u64::MAX);
    let per_answer = limit.tokens.unwrap_or_else(|| {
        candidates.iter().map(|d| d.max_output_tokens).max().filter(|m| *m > 0).unwrap_or(4096)
    });
    let output = per_answer.saturating_mul(limit.choices.max(1));
    // Characters are bounded by the body's bytes (speech is priced by them).
    let usage = relay_core::pb::common::v1::TokenUsage {
        input_tokens: input,
        output_tokens: output,
        images: limit.images,
        characters: input,
        ..Default::default()
    };
    let cost_micros = candidates
        .iter()
        .filter_map(|d| d.price.as_ref())
        .map(|p| relay_core::cost_micros(&usage, p))
        .max()
        .unwrap_or(0);
    relay_core::contracts::Admission {
        request_id: ctx.request_id.clone(),
        at_ms: relay_core::ids::now_ms(),
        scopes: principal.scopes.clone(),
        tokens: input.saturating_add(output),
        cost_micros,
    }
}

/// Admits a request against its scopes' limits and budgets; the reservation is settled by the usage record.
pub async fn admit(
    edge: &Edge,
    rec: &mut UsageRecord,
    a: relay_core::contracts::Admission,
) -> Result<relay_core::contracts::RateHeaders, relay_core::contracts::Denial> {
    if a.scopes.is_empty() {
        return Ok(Vec::new());
    }
    let headers = edge.inner.services.limiter.admit(&a).await?;
    rec.hold(a);
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use relay_core::pb::auth::v1::{Budget, Scope};
    use relay_core::pb::common::v1::Money;
    use relay_core::pb::routing::v1::Price;

    use super::*;

    #[test]
    fn prompt_affinity_keys_long_prompts_by_their_beginning() {
        let route = RouteResponse { prompt_affinity: true, ..Default::default() };
        let p = Principal { key_id: "k1".into(), ..Default::default() };
        let system = "s".repeat(5000);
        let turn = |n: usize| {
            format!(
                "{{\"model\":\"m\",\"messages\":[{{\"role\":\"system\",\"content\":\"{system}\"}}{}]}}",
                ",{}".repeat(n)
            )
        };
        let h = axum::http::HeaderMap::new();
        let (one, two) =
            (session(&h, &p, &route, turn(1).as_bytes()), session(&h, &p, &route, turn(5).as_bytes()));
        assert!(one.is_some() && one == two, "later turns of one conversation stay together");
        let other = Principal { key_id: "k2".into(), ..Default::default() };
        assert_ne!(session(&h, &other, &route, turn(1).as_bytes()), one, "scoped to the key");
        assert_eq!(session(&h, &p, &route, b"{\"short\":1}"), None);
        let off = RouteResponse::default();
        assert_eq!(session(&h, &p, &off, turn(1).as_bytes()), None, "opt-in per group");
        let mut with_header = axum::http::HeaderMap::new();
        with_header.insert("x-relay-session", "conv-7".parse().unwrap());
        assert_eq!(
            session(&with_header, &p, &off, b"{}"),
            session(&with_header, &p, &route, turn(1).as_bytes())
        );
    }

    #[test]
    fn hours_wrap_midnight() {
        let at = |h: i64| h * 3_600_000 + 1_800_000;
        assert!(in_hours(at(23), 22, 6) && in_hours(at(2), 22, 6) && !in_hours(at(12), 22, 6));
        assert!(in_hours(at(9), 9, 17) && !in_hours(at(17), 9, 17));
    }

    #[test]
    fn keys_with_a_budget_skip_unpriced_deployments() {
        let priced = Deployment { id: "p".into(), price: Some(Price::default()), ..Default::default() };
        let unpriced = Deployment { id: "u".into(), ..Default::default() };
        let free = Deployment { id: "f".into(), free: true, ..Default::default() };
        let open = Principal::default();
        let budget =
            Some(Budget { limit: Some(Money { micros: 10, currency: "USD".into() }), ..Default::default() });
        let capped = Principal { scopes: vec![Scope { budget, ..Default::default() }], ..Default::default() };
        let ids = |v: Vec<Deployment>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();
        let all = [unpriced.clone(), priced, free];
        assert_eq!(ids(billable(&open, "m", &all).unwrap()), ["u", "p", "f"]);
        assert_eq!(ids(billable(&capped, "m", &all).unwrap()), ["p", "f"]);
        let e = billable(&capped, "m", &[unpriced]).unwrap_err();
        assert_eq!((e.code, e.param.as_deref()), (ErrorCode::PermissionDenied, Some("model")));
    }
}
