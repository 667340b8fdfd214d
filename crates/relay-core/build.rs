//! Compiles every `.proto` under `proto/` into prost message types (no gRPC code: that lives in relay-proto).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = proto_files(&root)?;
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        // `bytes` fields (request bodies, answer chunks) are `bytes::Bytes`: passed along by reference
        // count from the upstream socket to the client socket, never copied.
        .bytes(".")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}

fn proto_files(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(proto_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}
