//! The whole config file: each crate owns its section; this module composes them and checks what only the
//! whole can check (which services run here, where the others are, which bus and database to use).

use std::collections::HashMap;
use std::path::Path;

use relay_runtime::{ConfigErrors, ConfigSource};
use serde::Deserialize;

pub const ALL_SERVICES: [&str; 5] = ["edge", "auth", "routing", "adapter", "billing"];

#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: ServerConfig,
    pub remote: RemoteConfig,
    pub database: DatabaseConfig,
    pub bus: BusConfig,
    pub telemetry: relay_telemetry::TelemetryConfig,
    pub edge: relay_edge::EdgeConfig,
    pub auth: relay_auth::AuthConfig,
    pub routing: relay_routing::RoutingConfig,
    pub adapter: relay_adapter::AdapterConfig,
    pub limits: relay_limits::LimitsConfig,
    pub billing: relay_billing::BillingConfig,
    pub state: relay_state::StateConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Services this process runs; the rest are reached over gRPC at `[remote]`.
    pub services: Vec<String>,
    /// Client-facing HTTP (edge only).
    pub http_listen: String,
    /// gRPC for the non-edge services this process runs. Unset: not served (all-in-one needs none).
    pub grpc_listen: Option<String>,
    /// `/livez`, `/readyz`, `/metrics`.
    pub admin_listen: String,
    /// How long in-flight requests and streams may take to finish after a shutdown signal.
    pub shutdown_grace_secs: u64,
    /// Shared secret every internal gRPC call carries and every gRPC server checks (constant time).
    /// Required whenever this process serves gRPC or calls a remote service.
    pub service_token: Option<relay_core::Secret>,
    /// Serve and call gRPC without the token (only where the network itself authenticates peers, e.g.
    /// a mesh with mTLS).
    pub allow_unauthenticated_grpc: bool,
    /// Serve `http_listen` over HTTPS with these PEM files (reloaded when they change). Unset: plain HTTP
    /// (TLS ends at an ingress or a mesh).
    pub tls: Option<relay_runtime::tls::TlsFiles>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            services: ALL_SERVICES.iter().map(|s| (*s).to_owned()).collect(),
            http_listen: "127.0.0.1:8080".into(),
            grpc_listen: None,
            admin_listen: "127.0.0.1:9090".into(),
            shutdown_grace_secs: 30,
            service_token: None,
            allow_unauthenticated_grpc: false,
            tls: None,
        }
    }
}

/// gRPC addresses (`http://host:port`) of services that run elsewhere.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    pub auth: Option<String>,
    pub routing: Option<String>,
    pub adapter: Option<String>,
    /// Billing, for rebuilding budget counters from the ledger (optional: without it they start at zero
    /// after a restart or a Redis data loss).
    pub billing: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://…` or `sqlite://file.db` (embedded default).
    pub url: String,
    /// Apply pending migrations at start (off in Kubernetes, where `relay migrate` runs as a Job).
    pub migrate_on_start: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { url: "sqlite://relay.db".into(), migrate_on_start: true }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// NATS server with JetStream. Unset: the in-process bus (edge and billing must then share a process).
    pub nats_url: Option<String>,
    pub jetstream: relay_events::NatsConfig,
    /// NATS subject of key / team / org invalidations.
    pub invalidation_subject: String,
    /// Where the edge keeps usage events until the bus acknowledges them (a durable local log; in
    /// Kubernetes a volume that outlives the pod). One process per directory.
    pub outbox_dir: String,
    /// `fdatasync` each group commit (off only for throwaway test machines).
    pub outbox_fsync: bool,
    /// Publishes waiting for the bus's acknowledgement at once (also the largest batch the embedded
    /// billing consumer can get: 1,024 events commit ~13 % faster than 256 on SQLite).
    pub outbox_max_in_flight: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            nats_url: None,
            jetstream: relay_events::NatsConfig::default(),
            invalidation_subject: relay_events::INVALIDATION_SUBJECT.into(),
            outbox_dir: "relay-outbox".into(),
            outbox_fsync: true,
            outbox_max_in_flight: 1024,
        }
    }
}

impl Config {
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigErrors> {
        Self::load_checked(file, env, true)
    }

    /// For tools that only read the database (`migrate`, `billing ...`): every section is still parsed
    /// strictly, but what only serving needs (peppers, addresses, listeners) is not required.
    pub fn load_for_database(
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigErrors> {
        Self::load_checked(file, env, false)
    }

    fn load_checked(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        serving: bool,
    ) -> Result<Self, ConfigErrors> {
        let mut src = ConfigSource::load(file, env)?;
        let mut errors = ConfigErrors::default();
        let cfg = Self {
            server: src.section("server", &mut errors),
            remote: src.section("remote", &mut errors),
            database: src.section("database", &mut errors),
            bus: src.section("bus", &mut errors),
            telemetry: src.section("telemetry", &mut errors),
            edge: src.section("edge", &mut errors),
            auth: src.section("auth", &mut errors),
            routing: src.section("routing", &mut errors),
            adapter: src.section("adapter", &mut errors),
            limits: src.section("limits", &mut errors),
            billing: src.section("billing", &mut errors),
            state: src.section("state", &mut errors),
        };
        src.finish(&mut errors);
        // Meaning is checked even when a section failed to parse, so one run lists every problem.
        if serving {
            cfg.validate(&mut errors);
        } else if !(cfg.database.url.starts_with("postgres") || cfg.database.url.starts_with("sqlite:")) {
            errors.push("database.url: must be postgres://… or sqlite:…");
        }
        if errors.is_empty() { Ok(cfg) } else { Err(errors) }
    }

    pub fn runs(&self, service: &str) -> bool {
        self.server.services.iter().any(|s| s == service)
    }

    fn validate(&self, errors: &mut ConfigErrors) {
        let mut e = Vec::new();
        for s in &self.server.services {
            if !ALL_SERVICES.contains(&s.as_str()) {
                e.push(format!(
                    "server.services: unknown service `{s}` (known: {})",
                    ALL_SERVICES.join(", ")
                ));
            }
        }
        if self.server.services.is_empty() {
            e.push("server.services: must name at least one service".into());
        }
        for addr in [
            Some(&self.server.http_listen),
            self.server.grpc_listen.as_ref(),
            Some(&self.server.admin_listen),
        ]
        .into_iter()
        .flatten()
        {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                e.push(format!("server: `{addr}` is not a socket address like 127.0.0.1:8080"));
            }
        }
        let backends = ["auth", "routing", "adapter", "billing"];
        if backends.iter().any(|s| self.runs(s)) && !self.runs("edge") && self.server.grpc_listen.is_none() {
            e.push("server.grpc_listen: required when this process serves auth/routing/adapter/billing to others".into());
        }
        if self.runs("edge") {
            for (name, addr) in [
                ("auth", &self.remote.auth),
                ("routing", &self.remote.routing),
                ("adapter", &self.remote.adapter),
            ] {
                if !self.runs(name) && addr.is_none() {
                    e.push(format!("remote.{name}: required, since the edge runs here and {name} does not"));
                }
            }
        }
        if self.runs("edge") != self.runs("billing") && self.bus.nats_url.is_none() {
            e.push("bus.nats_url: required when edge and billing run in different processes".into());
        }
        if self.runs("edge") {
            self.edge.validate(&mut e);
            if let Some(tls) = &self.server.tls
                && let Err(err) = relay_runtime::tls::server_config(tls)
            {
                e.push(format!("server.tls: {err}"));
            }
        }
        let remote = [&self.remote.auth, &self.remote.routing, &self.remote.adapter, &self.remote.billing];
        let uses_grpc = self.server.grpc_listen.is_some() || remote.iter().any(|r| r.is_some());
        match &self.server.service_token {
            Some(t) if t.expose().len() < 16 => {
                e.push("server.service_token: must be at least 16 characters".into())
            }
            Some(t) if !t.expose().bytes().all(|b| b.is_ascii_graphic()) => {
                e.push("server.service_token: printable ASCII without spaces only".into())
            }
            None if uses_grpc && !self.server.allow_unauthenticated_grpc => e.push(
                "server.service_token: required when this process serves or calls gRPC (or set server.allow_unauthenticated_grpc = true behind an authenticating mesh)".into(),
            ),
            _ => {}
        }
        if self.runs("auth") {
            self.auth.validate(&mut e);
        }
        if self.runs("adapter") {
            self.adapter.validate(&mut e);
        }
        if self.runs("routing") {
            let names: Vec<&str> = self.adapter.provider_names().collect();
            // Provider names can only be checked when this file also configures the adapter.
            let known = if self.adapter.providers.is_empty() { None } else { Some(names.as_slice()) };
            self.routing.validate(known, &mut e);
        }
        if self.runs("billing") {
            self.billing.validate(&mut e);
            if self.state.enabled {
                self.state.validate(&mut e);
                if self.state.encryption_key.is_none() && self.auth.pepper.expose().len() < 16 {
                    e.push("state.encryption_key: required to store Responses state (or set auth.pepper, or state.enabled = false)".into());
                }
            }
        }
        if self.runs("edge") && (self.bus.outbox_dir.is_empty() || self.bus.outbox_max_in_flight == 0) {
            e.push("bus.outbox_dir and bus.outbox_max_in_flight must be set".into());
        }
        if self.runs("billing")
            && !(self.database.url.starts_with("postgres") || self.database.url.starts_with("sqlite:"))
        {
            e.push("database.url: must be postgres://… or sqlite:…".into());
        }
        for msg in e {
            errors.push(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn shipped_dev_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/relay.dev.toml");
        let cfg = Config::load(Some(&path), &HashMap::new()).unwrap();
        assert!(ALL_SERVICES.iter().all(|s| cfg.runs(s)));
        assert!(!cfg.auth.keys.is_empty());
    }

    #[test]
    fn compose_config_is_valid_for_every_role() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/relay.compose.toml");
        for role in ALL_SERVICES {
            let env = env(&[
                ("RELAY__SERVER__SERVICES", &format!("[\"{role}\"]")),
                ("RELAY__AUTH__PEPPER", "a-long-enough-pepper"),
                ("RELAY__SERVER__SERVICE_TOKEN", "a-long-enough-service-token"),
            ]);
            if let Err(e) = Config::load(Some(&path), &env) {
                panic!("{role}: {e}");
            }
        }
    }

    #[test]
    fn split_processes_need_a_service_token() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/relay.compose.toml");
        let base =
            [("RELAY__SERVER__SERVICES", "[\"adapter\"]"), ("RELAY__AUTH__PEPPER", "a-long-enough-pepper")];
        let errs = Config::load(Some(&path), &env(&base)).unwrap_err().to_string();
        assert!(errs.contains("server.service_token"), "{errs}");
        let short = env(&[base[0], base[1], ("RELAY__SERVER__SERVICE_TOKEN", "short")]);
        assert!(Config::load(Some(&path), &short).unwrap_err().to_string().contains("16 characters"));
        let opted_out = env(&[base[0], base[1], ("RELAY__SERVER__ALLOW_UNAUTHENTICATED_GRPC", "true")]);
        assert!(Config::load(Some(&path), &opted_out).is_ok());
        assert!(Config::load(None, &env(&[base[1]])).is_ok(), "embedded (no gRPC) needs none");
    }

    #[test]
    fn split_deployment_needs_addresses_and_a_bus() {
        let errs = Config::load(
            None,
            &env(&[("RELAY__SERVER__SERVICES", "[\"edge\"]"), ("RELAY__AUTH__PEPPER", "x")]),
        )
        .unwrap_err()
        .to_string();
        for needle in ["remote.auth", "remote.routing", "remote.adapter", "bus.nats_url"] {
            assert!(errs.contains(needle), "{needle} missing in {errs}");
        }
    }

    #[test]
    fn database_tools_need_no_serving_settings() {
        let env = env(&[("RELAY__DATABASE__URL", "sqlite::memory:")]);
        assert!(Config::load(None, &env).is_err(), "serving needs a pepper");
        assert!(Config::load_for_database(None, &env).is_ok());
        let bad = env_with(&[("RELAY__DATABASE__URL", "mysql://x"), ("RELAY__BILLING__NOPE", "1")]);
        let errs = Config::load_for_database(None, &bad).unwrap_err().to_string();
        assert!(errs.contains("database.url") && errs.contains("nope"), "{errs}");
    }

    fn env_with(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        env(pairs)
    }

    #[test]
    fn all_errors_are_reported_together() {
        let errs = Config::load(
            None,
            &env(&[
                ("RELAY__SERVER__SERVICES", "[\"edge\", \"auth\", \"nope\"]"),
                ("RELAY__SERVER__HTTP_LISTEN", "not-an-address"),
                ("RELAY__AUTH__PEPPER", "short"),
            ]),
        )
        .unwrap_err();
        let text = errs.to_string();
        assert!(errs.0.len() >= 4, "{text}");
        assert!(
            text.contains("unknown service `nope`")
                && text.contains("not-an-address")
                && text.contains("pepper")
        );
    }
}
