//! The `relay` binary; everything lives in the library (`relay::cli`).

/// mimalloc: per-thread free lists make the many small, short-lived allocations of a request (headers,
/// JSON, protobuf, metric labels) cheap; glibc malloc took ~20 % of an embedded relay's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // mimalloc reserves big aligned arenas; with transparent huge pages set to "always" (common on
    // servers) the kernel backs every touched 2 MB of them with a huge page, which doubled resident
    // memory for no speed we could measure. Before anything of size is allocated.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    // One TLS crypto provider for every client (reqwest, tonic, sqlx, NATS): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    std::process::exit(relay::cli::main_with(args, env));
}
