//! `[adapter]` config: the upstream providers and their credentials.

use std::collections::BTreeMap;

use relay_core::Secret;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    pub providers: Vec<ProviderConfig>,
    /// Extra CA certificates (PEM bundle) every provider's TLS trusts on top of the system roots, e.g. a
    /// private CA in front of self-hosted models or a corporate egress proxy. Upstream certificates are
    /// always verified; this only adds trust anchors.
    pub ca_bundle: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI or any OpenAI-compatible API (DeepSeek, Qwen compatible mode, Mistral, Groq, vLLM, Ollama).
    Openai,
    /// Azure OpenAI: `base_url` = `https://<resource>.openai.azure.com/openai`, deployments as models.
    Azure,
    /// Anthropic Messages; `base_url` defaults to `https://api.anthropic.com`.
    Anthropic,
    /// Google Gemini (AI Studio); `base_url` defaults to `https://generativelanguage.googleapis.com/v1beta`.
    Gemini,
    /// Built-in deterministic provider; no network, no key. Answers "You said: <last user message>".
    Demo,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name deployments refer to.
    pub name: String,
    pub kind: ProviderKind,
    /// API root including the version, e.g. `https://api.openai.com/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Azure `api-version` query, or the `anthropic-version` header.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Extra headers sent on every upstream request (e.g. `OpenAI-Organization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Longest silence allowed while waiting for upstream bytes (first byte included).
    #[serde(default = "default_read_timeout")]
    pub read_timeout_secs: u64,
    /// Extra CA certificates (PEM) for this provider only; unset: `[adapter] ca_bundle`, if any.
    #[serde(default)]
    pub ca_bundle: Option<std::path::PathBuf>,
    /// Demo provider only: pause between streamed words.
    #[serde(default)]
    pub chunk_delay_ms: u64,
    /// OpenAI kinds: the upstream serves the Responses API (`/responses`) itself. Model groups with
    /// `responses_state = "provider"` then send Responses requests there as they are, state included.
    #[serde(default)]
    pub responses_api: bool,
}

fn default_connect_timeout() -> u64 {
    5_000
}

fn default_read_timeout() -> u64 {
    300
}

impl AdapterConfig {
    pub fn validate(&self, errors: &mut Vec<String>) {
        if let Some(Err(e)) = self.ca_bundle.as_deref().map(relay_runtime::tls::load_certs) {
            errors.push(format!("adapter.ca_bundle: {e}"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            let at = format!("adapter.providers[{i}] ({})", p.name);
            if p.name.is_empty() {
                errors.push(format!("{at}: name must not be empty"));
            }
            if !seen.insert(&p.name) {
                errors.push(format!("{at}: duplicate provider name"));
            }
            if let Some(u) = &p.base_url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                errors.push(format!("{at}: base_url must start with http:// or https://"));
            }
            match p.kind {
                ProviderKind::Openai | ProviderKind::Azure if p.base_url.is_none() => errors
                    .push(format!("{at}: base_url is required for OpenAI-compatible and Azure providers")),
                ProviderKind::Openai
                | ProviderKind::Azure
                | ProviderKind::Anthropic
                | ProviderKind::Gemini => {}
                ProviderKind::Demo => {
                    if p.base_url.is_some() || p.api_key.is_some() {
                        errors.push(format!("{at}: the demo provider takes no base_url or api_key"));
                    }
                }
            }
            if p.responses_api && p.kind != ProviderKind::Openai {
                errors.push(format!("{at}: responses_api is for OpenAI providers only"));
            }
            if let Some(Err(e)) = p.ca_bundle.as_deref().map(relay_runtime::tls::load_certs) {
                errors.push(format!("{at}: ca_bundle: {e}"));
            }
            for name in p.headers.keys() {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    errors.push(format!("{at}: invalid header name `{name}`"));
                }
            }
        }
    }

    pub fn provider_names(&self) -> impl Iterator<Item = &str> {
        self.providers.iter().map(|p| p.name.as_str())
    }
}
