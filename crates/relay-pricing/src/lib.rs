//! relay-pricing: the price catalog. Versioned prices per model (and optionally per provider), what a
//! request costs at them, and the markup that turns Relay's cost into the customer's price. Shared by
//! billing (which books with it) and routing (which prices deployments for budget reservations).
//! Pure: no IO (billing keeps the rows in its `prices` table).

use relay_core::pb::common::v1::TokenUsage;
use serde::{Deserialize, Serialize};

/// The catalog shipped with Relay (`deploy/prices/catalog.toml`).
pub const SHIPPED_CATALOG: &str = include_str!("../../../deploy/prices/catalog.toml");

/// Highest price accepted per million tokens (or per request): 10,000 currency units. Anything above is a
/// typo (a price in micro-units per token, say) that would bill customers a fortune.
pub const MAX_PRICE_MICROS: i64 = 10_000 * 1_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    version: String,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    price: Vec<PriceEntry>,
}

/// One catalog entry as written in the file, the admin API or the CLI. Amounts in micro-units per million
/// tokens (`per_request` per request).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    pub model: String,
    #[serde(default = "any_provider")]
    pub provider: String,
    #[serde(default)]
    pub currency: Option<String>,
    pub input: i64,
    pub output: i64,
    #[serde(default)]
    pub cached_input: i64,
    #[serde(default)]
    pub cache_write: i64,
    #[serde(default)]
    pub reasoning: i64,
    #[serde(default)]
    pub per_request: i64,
    #[serde(default)]
    pub valid_from_ms: i64,
    #[serde(default)]
    pub valid_to_ms: i64,
    #[serde(default)]
    pub source: Option<String>,
}

fn any_provider() -> String {
    "*".into()
}

/// One immutable price version, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceRow {
    pub id: String,
    pub provider: String,
    pub model: String,
    pub currency: String,
    pub input: i64,
    pub output: i64,
    pub cached_input: i64,
    pub cache_write: i64,
    pub reasoning: i64,
    pub per_request: i64,
    pub valid_from_ms: i64,
    /// 0 = open-ended.
    pub valid_to_ms: i64,
    pub source: String,
}

impl PriceEntry {
    /// Checks bounds and turns the entry into a stored row. `default_source` names where it came from.
    pub fn into_row(self, default_currency: &str, default_source: &str) -> Result<PriceRow, String> {
        let at = format!("price for `{}` ({})", self.model, self.provider);
        let model = self.model.trim().to_owned();
        if model.is_empty() || model.len() > 200 || model.chars().any(char::is_control) {
            return Err(format!("{at}: model must be 1..=200 printable characters"));
        }
        let provider = if self.provider.is_empty() { "*".to_owned() } else { self.provider };
        if provider.len() > 200 || provider.chars().any(char::is_control) {
            return Err(format!("{at}: provider must be `*` or a provider name"));
        }
        let currency = self.currency.unwrap_or_else(|| default_currency.to_owned());
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("{at}: currency must be an ISO 4217 code such as USD"));
        }
        for (name, v) in [
            ("input", self.input),
            ("output", self.output),
            ("cached_input", self.cached_input),
            ("cache_write", self.cache_write),
            ("reasoning", self.reasoning),
            ("per_request", self.per_request),
        ] {
            if !(0..=MAX_PRICE_MICROS).contains(&v) {
                return Err(format!("{at}: {name} must be between 0 and {MAX_PRICE_MICROS} micro-units"));
            }
        }
        if self.valid_from_ms < 0 || (self.valid_to_ms != 0 && self.valid_to_ms <= self.valid_from_ms) {
            return Err(format!("{at}: valid_to_ms must be 0 (open) or after valid_from_ms"));
        }
        Ok(PriceRow {
            id: format!("{}/{}@{}", provider, model, self.valid_from_ms),
            provider,
            model,
            currency,
            input: self.input,
            output: self.output,
            cached_input: self.cached_input,
            cache_write: self.cache_write,
            reasoning: self.reasoning,
            per_request: self.per_request,
            valid_from_ms: self.valid_from_ms,
            valid_to_ms: self.valid_to_ms,
            source: self.source.unwrap_or_else(|| default_source.to_owned()),
        })
    }
}

/// Parses a catalog file; every bad entry is reported.
pub fn parse_catalog(text: &str, name: &str) -> Result<Vec<PriceRow>, Vec<String>> {
    let file: CatalogFile = toml::from_str(text).map_err(|e| vec![format!("{name}: {e}")])?;
    let currency = file.currency.unwrap_or_else(|| "USD".into());
    let source = format!("{name} (catalog version {})", file.version);
    let (mut rows, mut errors) = (Vec::new(), Vec::new());
    for entry in file.price {
        match entry.into_row(&currency, &source) {
            Ok(r) => rows.push(r),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    if errors.is_empty() { Ok(rows) } else { Err(errors) }
}

impl PriceRow {
    fn matches(&self, provider: &str, model: &str, at_ms: i64) -> bool {
        let model_ok = match self.model.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => self.model == model,
        };
        let provider_ok = self.provider == "*" || self.provider == provider;
        let time_ok = self.valid_from_ms <= at_ms && (self.valid_to_ms == 0 || at_ms < self.valid_to_ms);
        model_ok && provider_ok && time_ok
    }

    /// Most specific first: a named provider, then an exact model, then the longest prefix, then newest.
    fn specificity(&self) -> (bool, bool, usize, i64) {
        (self.provider != "*", !self.model.ends_with('*'), self.model.len(), self.valid_from_ms)
    }

    /// What `u` costs at this price, in micro-units, rounded up once over the whole request (never
    /// under-charged, never charged a rounding per token kind).
    pub fn cost(&self, u: &TokenUsage) -> i64 {
        let or = |specific: i64, general: i64| if specific > 0 { specific } else { general };
        let cached = u.cached_input_tokens.min(u.input_tokens);
        let written = u.cache_write_tokens.min(u.input_tokens - cached);
        let plain_input = u.input_tokens - cached - written;
        let (reasoning_price, reasoning) = if self.reasoning > 0 {
            (self.reasoning, u.reasoning_tokens.min(u.output_tokens))
        } else {
            (0, 0)
        };
        let plain_output = u.output_tokens - reasoning;
        let per_mtok = i128::from(plain_input) * i128::from(self.input)
            + i128::from(cached) * i128::from(or(self.cached_input, self.input))
            + i128::from(written) * i128::from(or(self.cache_write, self.input))
            + i128::from(plain_output) * i128::from(self.output)
            + i128::from(reasoning) * i128::from(reasoning_price);
        let total = (per_mtok + 999_999).div_euclid(1_000_000) + i128::from(self.per_request);
        i64::try_from(total).unwrap_or(i64::MAX)
    }
}

/// Every price version, for lookups.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    rows: Vec<PriceRow>,
}

impl PriceBook {
    pub fn new(rows: Vec<PriceRow>) -> Self {
        Self { rows }
    }

    /// The price in force at `at_ms` for `model` on `provider`, most specific match first.
    pub fn resolve(&self, provider: &str, model: &str, at_ms: i64) -> Option<&PriceRow> {
        self.rows.iter().filter(|r| r.matches(provider, model, at_ms)).max_by_key(|r| r.specificity())
    }
}

/// The customer's price: cost plus a markup in basis points (1/100 of a percent), rounded up.
pub fn sell_price(cost_micros: i64, markup_bps: i64) -> i64 {
    let v = (i128::from(cost_micros) * i128::from(10_000 + markup_bps) + 9_999).div_euclid(10_000);
    i64::try_from(v.max(0)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_catalog_parses_and_is_in_bounds() {
        let rows = parse_catalog(SHIPPED_CATALOG, "catalog.toml").unwrap();
        assert!(rows.len() >= 30, "{}", rows.len());
        let book = PriceBook::new(rows);
        let p = book.resolve("openai-main", "gpt-4o", 1).unwrap();
        assert_eq!((p.input, p.output, p.cached_input), (2_500_000, 10_000_000, 1_250_000));
        assert!(book.resolve("x", "claude-sonnet-4-5-20250929", 1).is_some(), "prefix entries");
        assert!(book.resolve("x", "no-such-model", 1).is_none());
    }

    #[test]
    fn most_specific_and_current_price_wins() {
        let row = |provider: &str, model: &str, from: i64, to: i64, input: i64| PriceRow {
            id: format!("{provider}/{model}@{from}"),
            provider: provider.into(),
            model: model.into(),
            currency: "USD".into(),
            input,
            output: 0,
            cached_input: 0,
            cache_write: 0,
            reasoning: 0,
            per_request: 0,
            valid_from_ms: from,
            valid_to_ms: to,
            source: "t".into(),
        };
        let book = PriceBook::new(vec![
            row("*", "m*", 0, 0, 1),
            row("*", "m-1", 0, 0, 2),
            row("p", "m-1", 0, 0, 3),
            row("*", "m-1", 100, 0, 4),
            row("*", "old", 0, 50, 5),
        ]);
        assert_eq!(book.resolve("p", "m-1", 10).unwrap().input, 3);
        assert_eq!(book.resolve("q", "m-1", 10).unwrap().input, 2);
        assert_eq!(book.resolve("q", "m-1", 200).unwrap().input, 4, "newer version from its start");
        assert_eq!(book.resolve("q", "m-2", 10).unwrap().input, 1);
        assert!(book.resolve("q", "old", 60).is_none(), "closed version");
    }

    #[test]
    fn costs_split_by_token_kind_and_round_up_once() {
        let p = PriceEntry {
            model: "m".into(),
            input: 3_000_000,
            output: 15_000_000,
            cached_input: 300_000,
            cache_write: 3_750_000,
            ..Default::default()
        }
        .into_row("USD", "t")
        .unwrap();
        let u = TokenUsage {
            input_tokens: 1_000,
            cached_input_tokens: 200,
            cache_write_tokens: 100,
            output_tokens: 10,
            ..Default::default()
        };
        // 700×3 + 200×0.3 + 100×3.75 + 10×15 = 2100 + 60 + 375 + 150
        assert_eq!(p.cost(&u), 2685);
        assert_eq!(p.cost(&TokenUsage { input_tokens: 1, ..Default::default() }), 3, "3 micros: exact");
        assert_eq!(p.cost(&TokenUsage::default()), 0);
        assert_eq!(sell_price(2685, 2000), 3222);
        assert_eq!(sell_price(1, 1), 2, "rounded up");
        assert_eq!(sell_price(100, 0), 100);
    }

    #[test]
    fn absurd_prices_are_refused() {
        let bad = |e: PriceEntry| e.into_row("USD", "t").unwrap_err();
        let base = PriceEntry { model: "m".into(), provider: "*".into(), ..Default::default() };
        assert!(bad(PriceEntry { input: -1, ..base.clone() }).contains("input"));
        assert!(bad(PriceEntry { output: MAX_PRICE_MICROS + 1, ..base.clone() }).contains("output"));
        assert!(bad(PriceEntry { currency: Some("usd".into()), ..base.clone() }).contains("currency"));
        assert!(bad(PriceEntry { model: String::new(), ..base.clone() }).contains("model"));
        assert!(bad(PriceEntry { valid_from_ms: 10, valid_to_ms: 5, ..base }).contains("valid_to"));
    }
}
