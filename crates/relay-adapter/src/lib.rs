//! relay-adapter: every provider protocol, and the only place requests and answers are converted.
//!
//! The adapter receives a client's request (any inbound protocol, bytes untouched) for one deployment, calls
//! that provider, and streams back bytes already shaped for the client plus provider-neutral side events:
//! finish reasons, exact usage, typed errors. One module per provider under `providers/`.
//! What does not belong here: authentication, routing decisions, billing, HTTP serving.

mod body;
mod config;
mod convert;
mod inbound;
mod ir;
mod providers;
mod service;
mod sse;
mod tokens;
mod upstream;

pub use config::{AdapterConfig, ProviderConfig, ProviderKind};
pub use service::AdapterService;
pub use upstream::{MAX_ANSWER_BYTES, MAX_EVENT_BYTES};
