//! The response cache (opt-in per model group, `response_cache_ttl_secs`). An identical request of the same
//! org (same protocol, same stream flag, same body up to key order) within the TTL is answered with the
//! cached client-ready bytes, whole or as the same stream, and no upstream is called; the response says
//! `x-relay-cache: hit` and the usage event is a cache hit (nothing owed to a provider, nothing charged).
//! The org is part of every key, so one org never receives another's answer; zero-retention keys are never
//! cached; only successful answers are kept. Chat Completions and Anthropic Messages only: a Responses
//! answer carries an id that stored state would then share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_core::contracts::AnswerCache;
use relay_core::pb::auth::v1::Principal;
use relay_core::pb::common::v1::TokenUsage;
use serde::{Deserialize, Serialize};

use crate::error::Inbound;

/// Largest answer kept; longer ones are not cached.
pub(crate) const MAX_ENTRY: usize = 4 << 20;

/// What a request would be cached under.
pub(crate) struct Plan {
    key: String,
    ttl: Duration,
    cache: Arc<dyn AnswerCache>,
}

/// What was served, kept with the bytes (for the hit's usage record and headers).
#[derive(Serialize, Deserialize, Default, Clone)]
pub(crate) struct Meta {
    pub deployment: String,
    pub provider: String,
    pub upstream_model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Meta {
    pub(crate) fn usage(&self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_input_tokens: self.cached_input_tokens,
            reasoning_tokens: self.reasoning_tokens,
            ..Default::default()
        }
    }
}

/// The cache plan of a request, if its model group caches and the key may be cached.
pub(crate) fn plan(
    cache: Option<&Arc<dyn AnswerCache>>,
    principal: &Principal,
    inbound: Inbound,
    body: &[u8],
    stream: bool,
    ttl_secs: u32,
) -> Option<Plan> {
    let cache = cache?;
    if ttl_secs == 0
        || principal.zero_retention
        || !matches!(inbound, Inbound::OpenAiChat | Inbound::Anthropic)
    {
        return None;
    }
    // Key order and whitespace do not make a request different (serde_json maps are sorted).
    let normal = serde_json::from_slice::<serde_json::Value>(body).ok()?.to_string();
    use sha2::Digest as _;
    let mut ctx = sha2::Sha256::new();
    for part in [principal.org_id.as_bytes(), &[inbound as u8, u8::from(stream)], normal.as_bytes()] {
        ctx.update((part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let digest: String = ctx.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Some(Plan {
        key: format!("{}:{digest}", principal.org_id),
        ttl: Duration::from_secs(u64::from(ttl_secs)),
        cache: cache.clone(),
    })
}

impl Plan {
    /// A cached answer: what was served and the client-ready bytes.
    pub(crate) async fn get(&self) -> Option<(Meta, Bytes)> {
        let entry = self.cache.get(&self.key).await?;
        let split = entry.iter().position(|b| *b == b'\n')?;
        let meta: Meta = serde_json::from_slice(&entry[..split]).ok()?;
        metrics::counter!("relay_edge_response_cache_total", "result" => "hit").increment(1);
        Some((meta, entry.slice(split + 1..)))
    }

    /// Keeps a successful answer (in the background).
    pub(crate) fn put(self, edge: &crate::Edge, meta: &Meta, body: &[u8]) {
        if body.is_empty() || body.len() > MAX_ENTRY {
            return;
        }
        let Ok(mut entry) = serde_json::to_vec(meta) else { return };
        entry.push(b'\n');
        entry.extend_from_slice(body);
        let entry = Bytes::from(entry);
        metrics::counter!("relay_edge_response_cache_total", "result" => "miss").increment(1);
        edge.inner.background.spawn(async move { self.cache.put(&self.key, entry, self.ttl).await });
    }
}

/// The cache of a single process (embedded mode, or an edge without Redis): entries by key until their
/// TTL, at most `budget` bytes in all (the soonest to expire leave first).
pub struct MemoryAnswerCache {
    inner: Mutex<Entries>,
}

struct Entries {
    map: HashMap<String, (Instant, Bytes)>,
    bytes: usize,
    budget: usize,
}

impl MemoryAnswerCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self { inner: Mutex::new(Entries { map: HashMap::new(), bytes: 0, budget: budget_bytes }) }
    }
}

#[async_trait::async_trait]
impl AnswerCache for MemoryAnswerCache {
    async fn get(&self, key: &str) -> Option<Bytes> {
        let mut e = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match e.map.get(key) {
            Some((until, v)) if *until > Instant::now() => Some(v.clone()),
            Some(_) => {
                if let Some((_, v)) = e.map.remove(key) {
                    e.bytes -= v.len();
                }
                None
            }
            None => None,
        }
    }

    async fn put(&self, key: &str, value: Bytes, ttl: Duration) {
        let mut e = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if value.len() > e.budget {
            return;
        }
        if let Some((_, old)) = e.map.remove(key) {
            e.bytes -= old.len();
        }
        if e.bytes + value.len() > e.budget {
            let now = Instant::now();
            let mut by_expiry: Vec<(Instant, String)> =
                e.map.iter().map(|(k, (t, _))| (*t, k.clone())).collect();
            by_expiry.sort();
            for (t, k) in by_expiry {
                if e.bytes + value.len() <= e.budget && t > now {
                    break;
                }
                if let Some((_, v)) = e.map.remove(&k) {
                    e.bytes -= v.len();
                }
            }
        }
        e.bytes += value.len();
        e.map.insert(key.to_owned(), (Instant::now() + ttl, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(org: &str) -> Principal {
        Principal { org_id: org.into(), key_id: "k".into(), ..Default::default() }
    }

    #[test]
    fn keys_ignore_key_order_and_never_cross_orgs_or_shapes() {
        let cache: Arc<dyn AnswerCache> = Arc::new(MemoryAnswerCache::new(1 << 20));
        let key = |org: &str, body: &str, stream: bool| {
            plan(Some(&cache), &principal(org), Inbound::OpenAiChat, body.as_bytes(), stream, 60).unwrap().key
        };
        let a = key("o1", r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#, false);
        assert_eq!(a, key("o1", r#"{ "messages":[{"content":"hi","role":"user"}], "model":"m" }"#, false));
        assert_ne!(a, key("o2", r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#, false));
        assert_ne!(a, key("o1", r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#, true));
        assert_ne!(a, key("o1", r#"{"model":"m","messages":[{"role":"user","content":"ho"}]}"#, false));
        let zr = Principal { zero_retention: true, ..principal("o1") };
        assert!(plan(Some(&cache), &zr, Inbound::OpenAiChat, b"{}", false, 60).is_none());
        assert!(plan(Some(&cache), &principal("o1"), Inbound::Responses, b"{}", false, 60).is_none());
        assert!(plan(Some(&cache), &principal("o1"), Inbound::OpenAiChat, b"{}", false, 0).is_none());
    }

    #[tokio::test]
    async fn memory_cache_expires_and_stays_within_its_budget() {
        let cache = MemoryAnswerCache::new(10);
        cache.put("a", Bytes::from_static(b"12345"), Duration::from_secs(60)).await;
        cache.put("b", Bytes::from_static(b"123456"), Duration::from_secs(30)).await;
        assert!(cache.get("a").await.is_none() || cache.get("b").await.is_none(), "over budget: one left");
        assert_eq!(cache.get("b").await.as_deref(), Some(&b"123456"[..]));
        cache.put("c", Bytes::from_static(b"1"), Duration::from_millis(1)).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(cache.get("c").await.is_none(), "expired");
        cache.put("huge", Bytes::from(vec![0u8; 11]), Duration::from_secs(60)).await;
        assert!(cache.get("huge").await.is_none());
    }
}
