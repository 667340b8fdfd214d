//! Generates tonic clients and servers for `proto/`. Message types are not generated here: `extern_path`
//! points every `relay.*` message at the prost types already in `relay_core::pb`.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files: Vec<PathBuf> = ["common", "auth", "routing", "adapter", "billing", "events", "state"]
        .iter()
        .map(|pkg| root.join(format!("relay/{pkg}/v1/{pkg}.proto")))
        .map(|p| if p.exists() { p } else { p.with_file_name("usage.proto") })
        .collect();
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".relay", "::relay_core::pb")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
