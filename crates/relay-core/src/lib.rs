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
