//! relay-runtime: what every Relay process needs around its services.
//!
//! Config loading (one TOML file + `RELAY__SECTION__KEY` env overrides, every error reported at once), the
//! shutdown signal, the HTTP serve loop (with HTTPS from PEM files that reload when they change), and the
//! admin server (`/livez`, `/readyz`, `/metrics`). No service logic lives here.

pub mod admin;
pub mod config;
pub mod http;
pub mod shutdown;
pub mod tls;

pub use config::{ConfigErrors, ConfigSource};
