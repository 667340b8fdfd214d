//! relay: the one binary. `relay serve` runs any subset of the five services (all of them by default,
//! wired in process); `relay migrate` applies database migrations; `relay hash-key` hashes an API key for
//! the config. This is the only crate that depends on every service crate.

pub mod admin_cli;
pub mod app;
pub mod billing_cli;
pub mod cli;
pub mod config;
pub mod routing_cli;
