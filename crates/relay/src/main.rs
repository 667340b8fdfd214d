//! The `relay` binary; everything lives in the library (`relay::cli`).

fn main() {
    // One TLS crypto provider for every client (reqwest, tonic, sqlx, NATS): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    std::process::exit(relay::cli::main_with(args, env));
}
