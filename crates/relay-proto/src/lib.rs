//! relay-proto: the gRPC transport of the Relay contracts.
//!
//! For each contract trait in `relay_core::contracts` this crate has a tonic server that wraps any local
//! implementation, and a client that implements the same trait over a [`channel::GrpcChannel`] (HTTP/2 over
//! `h2`, one connection per server address). It also carries typed errors
//! across gRPC ([`status`]) and W3C trace context in metadata ([`trace`]). Messages are `relay_core::pb` types;
//! nothing here knows what a service does.

pub mod channel;
pub mod clients;
pub mod credentials;
pub mod metered;
pub mod servers;
pub mod status;
pub mod trace;

/// Generated tonic code (services only; messages come from `relay_core::pb`).
#[allow(clippy::all, missing_docs)]
pub mod generated {
    pub mod auth {
        include!(concat!(env!("OUT_DIR"), "/relay.auth.v1.rs"));
    }
    pub mod routing {
        include!(concat!(env!("OUT_DIR"), "/relay.routing.v1.rs"));
    }
    pub mod adapter {
        include!(concat!(env!("OUT_DIR"), "/relay.adapter.v1.rs"));
    }
    pub mod billing {
        include!(concat!(env!("OUT_DIR"), "/relay.billing.v1.rs"));
    }
    pub mod state {
        include!(concat!(env!("OUT_DIR"), "/relay.state.v1.rs"));
    }
}
