//! relay-core: the vocabulary every Relay crate shares.
//!
//! What belongs here: the protobuf message types (generated from `proto/`, used as the domain types so no
//! service converts between twin structs), the closed [`ErrorCode`] / [`RelayError`], request ids, and the
//! service contracts ([`contracts`]) that each service implements locally and `relay-proto` implements over gRPC.
//!
//! What does not: any IO, HTTP framework, gRPC transport, database or bus client.

pub mod contracts;
pub mod error;
pub mod ids;

pub use error::{ErrorCode, RelayError};

/// Generated protobuf messages, one module per proto package.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod common {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/relay.common.v1.rs"));
        }
    }
    pub mod auth {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/relay.auth.v1.rs"));
        }
    }
    pub mod routing {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/relay.routing.v1.rs"));
        }
    }
    pub mod adapter {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/relay.adapter.v1.rs"));
        }
    }
    pub mod billing {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/relay.billing.v1.rs"));
        }
    }
    pub mod events {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/relay.events.v1.rs"));
        }
    }
    pub mod state {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/relay.state.v1.rs"));
        }
    }
}

/// Version of the [`pb::events::v1::UsageEvent`] schema this build writes.
pub const USAGE_EVENT_SCHEMA_VERSION: u32 = 1;

/// A secret string from config (API keys, peppers). Never printed by `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// Does `model` match any of `patterns` (exact names, `*` matches any run of characters)? Empty = all.
pub fn model_allowed(patterns: &[String], model: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| glob_match(p.as_bytes(), model.as_bytes()))
}

/// What `usage` costs at `price`, in integer micro-units, rounded up (never under-charge). Cached input is
/// charged at its own price when the deployment has one.
pub fn cost_micros(usage: &pb::common::v1::TokenUsage, price: &pb::routing::v1::Price) -> i64 {
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    let cached_price = if price.cached_input_per_mtok_micros > 0 {
        price.cached_input_per_mtok_micros
    } else {
        price.input_per_mtok_micros
    };
    let total = i128::from(usage.input_tokens - cached) * i128::from(price.input_per_mtok_micros)
        + i128::from(cached) * i128::from(cached_price)
        + i128::from(usage.output_tokens) * i128::from(price.output_per_mtok_micros)
        + i128::from(usage.characters) * i128::from(price.per_mchar_micros)
        + i128::from(usage.images) * i128::from(price.per_image_micros) * 1_000_000;
    i64::try_from((total + 999_999).div_euclid(1_000_000)).unwrap_or(i64::MAX)
}

/// Batch requests cost this share of the list price (OpenAI, Anthropic and Gemini all halve it).
pub const BATCH_PRICE_PERCENT: i64 = 50;

/// The cost of a request run as part of a batch, rounded up to the micro-unit.
pub fn batch_cost_micros(cost: i64) -> i64 {
    i64::try_from((i128::from(cost) * i128::from(BATCH_PRICE_PERCENT) + 99).div_euclid(100))
        .unwrap_or(i64::MAX)
}

/// Is `ip` inside any of `allowlist` (IPs or CIDRs, v4 or v6)? Empty list = anywhere; an unparseable
/// address is never allowed by a non-empty list.
pub fn ip_allowed(allowlist: &[String], ip: &str) -> bool {
    if allowlist.is_empty() {
        return true;
    }
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else { return false };
    allowlist.iter().any(|entry| {
        let (net, bits) = match entry.split_once('/') {
            Some((n, b)) => (n, b.parse::<u32>().ok()),
            None => (entry.as_str(), None),
        };
        match (net.parse::<std::net::IpAddr>(), ip) {
            (Ok(std::net::IpAddr::V4(n)), std::net::IpAddr::V4(a)) => {
                prefix_eq(u32::from(n).into(), u32::from(a).into(), bits.unwrap_or(32), 32)
            }
            (Ok(std::net::IpAddr::V6(n)), std::net::IpAddr::V6(a)) => {
                prefix_eq(u128::from(n), u128::from(a), bits.unwrap_or(128), 128)
            }
            _ => false,
        }
    })
}

/// Is `tag` a region tag (`eu`, `us-east-1`): 1..=32 of lowercase ASCII letters, digits and `-`?
pub fn is_region_tag(tag: &str) -> bool {
    (1..=32).contains(&tag.len())
        && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Is `entry` an IP address or a CIDR (v4 or v6) with a prefix that fits?
pub fn is_ip_or_cidr(entry: &str) -> bool {
    let (net, bits) = match entry.split_once('/') {
        Some((n, b)) => (n, Some(b)),
        None => (entry, None),
    };
    match (net.parse::<std::net::IpAddr>(), bits.map(str::parse::<u32>)) {
        (Ok(_), None) => true,
        (Ok(std::net::IpAddr::V4(_)), Some(Ok(b))) => b <= 32,
        (Ok(std::net::IpAddr::V6(_)), Some(Ok(b))) => b <= 128,
        _ => false,
    }
}

fn prefix_eq(net: u128, addr: u128, bits: u32, width: u32) -> bool {
    if bits > width {
        return false;
    }
    let shift = width - bits;
    shift >= 128 || (net >> shift) == (addr >> shift)
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob_match(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob_match(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(s.expose(), "sk-live-123");
    }

    #[test]
    fn ip_allowlists_match_addresses_and_cidrs() {
        let list = vec!["10.1.0.0/16".to_string(), "192.168.1.7".to_string(), "2001:db8::/32".to_string()];
        assert!(ip_allowed(&list, "10.1.200.3"));
        assert!(!ip_allowed(&list, "10.2.0.1"));
        assert!(ip_allowed(&list, "192.168.1.7"));
        assert!(!ip_allowed(&list, "192.168.1.8"));
        assert!(ip_allowed(&list, "2001:db8:1::5"));
        assert!(!ip_allowed(&list, "2001:db9::1"));
        assert!(!ip_allowed(&list, "not-an-ip"));
        assert!(ip_allowed(&[], "anything"));
        assert!(ip_allowed(&["0.0.0.0/0".to_string()], "8.8.8.8"));
        assert!(!ip_allowed(&["1.2.3.4/33".to_string()], "1.2.3.4"));
        assert!(is_ip_or_cidr("10.0.0.0/8") && is_ip_or_cidr("::1") && is_ip_or_cidr("2001:db8::/128"));
        assert!(
            !is_ip_or_cidr("10.0.0.0/33") && !is_ip_or_cidr("example.com") && !is_ip_or_cidr("10.0.0.1/x")
        );
    }

    #[test]
    fn costs_round_up_and_discount_cached_input() {
        use pb::common::v1::TokenUsage;
        use pb::routing::v1::Price;
        let price = Price {
            input_per_mtok_micros: 2_500_000,
            output_per_mtok_micros: 10_000_000,
            cached_input_per_mtok_micros: 1_250_000,
            currency: "USD".into(),
            ..Default::default()
        };
        let u = TokenUsage {
            input_tokens: 1000,
            output_tokens: 500,
            cached_input_tokens: 400,
            ..Default::default()
        };
        // 600 × 2.5 + 400 × 1.25 + 500 × 10 = 1500 + 500 + 5000 micros
        assert_eq!(cost_micros(&u, &price), 7000);
        let one = TokenUsage { input_tokens: 1, ..Default::default() };
        assert_eq!(cost_micros(&one, &price), 3, "2.5 micros rounds up");
        assert_eq!(cost_micros(&TokenUsage::default(), &price), 0);
        // Unit prices: 2 images at 40,000 micros, 1,500 characters at 15 micros per 1,000.
        let units = Price { per_image_micros: 40_000, per_mchar_micros: 15_000_000, ..Default::default() };
        let u = TokenUsage { images: 2, characters: 1500, ..Default::default() };
        assert_eq!(cost_micros(&u, &units), 80_000 + 22_500);
        assert_eq!(batch_cost_micros(7001), 3501, "batch prices are half, rounded up");
    }

    #[test]
    fn model_globs() {
        let p = vec!["gpt-4o*".to_string(), "claude-sonnet-4-5".to_string()];
        assert!(model_allowed(&p, "gpt-4o"));
        assert!(model_allowed(&p, "gpt-4o-mini"));
        assert!(model_allowed(&p, "claude-sonnet-4-5"));
        assert!(!model_allowed(&p, "claude-sonnet-4-5-x"));
        assert!(!model_allowed(&p, "o3"));
        assert!(model_allowed(&[], "anything"));
        assert!(model_allowed(&["*mini".into()], "gpt-4o-mini"));
    }
}
