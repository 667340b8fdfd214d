//! The double-entry postings of one billed request. Pure: which accounts, which amounts; `store.rs` writes
//! them in the same transaction as the usage record.
//!
//! Each request posts one balanced set: the customer (its key) is debited the sell price and revenue
//! credited the same; the provider's cost is accrued (cost of revenue debited, the provider payable
//! credited) at the buy price. Debits are positive, credits negative; a set always sums to zero. Team and
//! org spend roll up from the key accounts through `usage_records` (key, team and org of every request).
//! Its id is derived from the request's billing id, so replaying an event can only ever meet the same set.
//! A hedged request's cancelled attempts add hedge overhead to the same set: what the losing provider may
//! bill for their input (catalog price), debited to `overhead:hedge:<provider>` and owed to that provider,
//! never charged to the customer.

use relay_core::pb::events::v1::UsageEvent;

use crate::pricing::{PriceBook, sell_price};

/// Markups in basis points, per team or org (the team's wins), else the default.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Markup {
    /// `org:<id>` or `team:<id>`.
    pub scope: String,
    pub bps: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub account: String,
    pub kind: &'static str,
    pub amount: i64,
}

/// One request's posting set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    pub txn_id: String,
    pub price_id: String,
    pub currency: String,
    pub cost: i64,
    pub sell: i64,
    pub entries: Vec<Entry>,
}

impl Booking {
    pub fn balanced(&self) -> bool {
        self.entries.iter().map(|e| i128::from(e.amount)).sum::<i128>() == 0
    }
}

pub fn markup_bps(markups: &[Markup], default_bps: i64, team: &str, org: &str) -> i64 {
    let find = |scope: String| markups.iter().find(|m| m.scope == scope).map(|m| m.bps);
    find(format!("team:{team}")).or_else(|| find(format!("org:{org}"))).unwrap_or(default_bps)
}

/// The posting set for `e`: priced from the catalog at the request's start time (at batch prices for a
/// batch's request); without a catalog price, or for requests priced by the image or the character (the
/// catalog prices tokens), at the deployment's configured price the edge reported (price id
/// `deployment:<id>`, already at batch prices); else unpriced.
pub fn book(e: &UsageEvent, prices: &PriceBook, markups: &[Markup], default_bps: i64) -> Booking {
    let usage = e.usage.unwrap_or_default();
    let units = (usage.images > 0 || usage.characters > 0) && e.cost.as_ref().is_some_and(|c| c.micros > 0);
    let catalog = prices.resolve(&e.provider, &e.upstream_model, e.started_at_unix_ms).filter(|_| !units);
    let (price_id, currency, cost) = match catalog {
        Some(p) => {
            let cost = p.cost(&usage);
            let cost = if e.batch_id.is_empty() { cost } else { relay_core::batch_cost_micros(cost) };
            (p.id.clone(), p.currency.clone(), cost)
        }
        None => match &e.cost {
            Some(c) if c.micros > 0 => {
                (format!("deployment:{}", e.deployment_id), c.currency.clone(), c.micros.max(0))
            }
            _ => (String::new(), "USD".to_owned(), 0),
        },
    };
    // A cache hit called no upstream: no provider cost, nothing charged.
    let cost = if e.cache_hit { 0 } else { cost };
    let sell = sell_price(cost, markup_bps(markups, default_bps, &e.team_id, &e.org_id));
    let provider = if e.provider.is_empty() { "none" } else { e.provider.as_str() };
    let mut entries = Vec::new();
    if sell != 0 || cost != 0 {
        entries = vec![
            Entry { account: format!("customer:key:{}", e.key_id), kind: "customer", amount: sell },
            Entry { account: "revenue".into(), kind: "revenue", amount: -sell },
            Entry { account: format!("cost:{provider}"), kind: "cost", amount: cost },
            Entry { account: format!("payable:{provider}"), kind: "payable", amount: -cost },
        ];
    }
    for a in e.attempt_log.iter().filter(|a| a.hedge_lost && a.input_tokens > 0) {
        let input =
            relay_core::pb::common::v1::TokenUsage { input_tokens: a.input_tokens, ..Default::default() };
        let (overhead, their_currency) =
            match prices.resolve(&a.provider, &a.upstream_model, e.started_at_unix_ms) {
                Some(p) => (p.cost(&input), p.currency.clone()),
                None => match &a.overhead_cost {
                    Some(m) => (m.micros.max(0), m.currency.clone()),
                    None => continue,
                },
            };
        if overhead > 0 && their_currency == currency {
            entries.push(Entry {
                account: format!("overhead:hedge:{}", a.provider),
                kind: "overhead",
                amount: overhead,
            });
            entries.push(Entry {
                account: format!("payable:{}", a.provider),
                kind: "payable",
                amount: -overhead,
            });
        }
    }
    Booking { txn_id: format!("usage-{}", e.request_id), price_id, currency, cost, sell, entries }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::PriceEntry;
    use relay_core::pb::common::v1::{Money, TokenUsage};

    fn book_of(e: &UsageEvent, markups: &[Markup]) -> Booking {
        let row =
            PriceEntry { model: "gpt-x".into(), input: 1_000_000, output: 2_000_000, ..Default::default() }
                .into_row("USD", "t")
                .unwrap();
        book(e, &PriceBook::new(vec![row]), markups, 0)
    }

    fn event(model: &str, input: u64, output: u64) -> UsageEvent {
        UsageEvent {
            request_id: "r1".into(),
            key_id: "k".into(),
            team_id: "t".into(),
            org_id: "o".into(),
            provider: "p".into(),
            upstream_model: model.into(),
            usage: Some(TokenUsage { input_tokens: input, output_tokens: output, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn postings_balance_and_apply_the_markup() {
        let b = book_of(&event("gpt-x", 1000, 500), &[Markup { scope: "org:o".into(), bps: 2500 }]);
        assert_eq!((b.cost, b.sell), (2000, 2500));
        assert!(b.balanced());
        assert_eq!(b.entries[0], Entry { account: "customer:key:k".into(), kind: "customer", amount: 2500 });
        assert_eq!(b.entries[3], Entry { account: "payable:p".into(), kind: "payable", amount: -2000 });
        assert_eq!(b.txn_id, "usage-r1");
        let team = [Markup { scope: "org:o".into(), bps: 2500 }, Markup { scope: "team:t".into(), bps: 0 }];
        assert_eq!(book_of(&event("gpt-x", 1000, 500), &team).sell, 2000, "team markup wins");
    }

    #[test]
    fn a_lost_hedge_is_overhead_owed_to_its_provider_not_charged_to_the_customer() {
        use relay_core::pb::events::v1::Attempt;
        let mut e = event("gpt-x", 1000, 500);
        e.attempt_log = vec![
            Attempt {
                provider: "p".into(),
                upstream_model: "gpt-x".into(),
                hedge_lost: true,
                input_tokens: 1000,
                ..Default::default()
            },
            Attempt {
                provider: "p".into(),
                upstream_model: "gpt-x".into(),
                answered: true,
                hedge: true,
                ..Default::default()
            },
        ];
        let b = book_of(&e, &[]);
        assert_eq!((b.cost, b.sell), (2000, 2000), "the customer pays for the answer only");
        assert!(b.balanced());
        assert_eq!(
            b.entries[4],
            Entry { account: "overhead:hedge:p".into(), kind: "overhead", amount: 1000 }
        );
        assert_eq!(b.entries[5], Entry { account: "payable:p".into(), kind: "payable", amount: -1000 });
    }

    #[test]
    fn unpriced_requests_fall_back_to_the_deployment_price_or_book_nothing() {
        let mut e = event("other", 10, 10);
        let b = book_of(&e, &[]);
        assert!(b.entries.is_empty() && b.price_id.is_empty());
        e.cost = Some(Money { micros: 7, currency: "EUR".into() });
        e.deployment_id = "other@p".into();
        let b = book_of(&e, &[]);
        assert_eq!((b.cost, b.currency.as_str(), b.price_id.as_str()), (7, "EUR", "deployment:other@p"));
        assert!(b.balanced());
    }

    #[test]
    fn batches_book_half_the_catalog_price_and_units_the_deployment_price() {
        let mut e = event("gpt-x", 1000, 500);
        e.batch_id = "batch_1".into();
        assert_eq!(book_of(&e, &[]).cost, 1000, "half of 2000");
        let mut e = event("gpt-x", 0, 0);
        e.usage.as_mut().unwrap().images = 2;
        e.cost = Some(Money { micros: 80_000, currency: "USD".into() });
        e.deployment_id = "gpt-x@p".into();
        let b = book_of(&e, &[]);
        assert_eq!(
            (b.cost, b.price_id.as_str()),
            (80_000, "deployment:gpt-x@p"),
            "the catalog prices no images"
        );
    }
}
