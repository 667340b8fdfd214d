//! Embeds `migrations/{postgres,sqlite}/*.sql` into the binary (no sqlx macros, no files needed at run time).
use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../migrations");
    let mut out = String::new();
    for backend in ["postgres", "sqlite"] {
        let dir = root.join(backend);
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        files.retain(|p| p.extension().is_some_and(|e| e == "sql"));
        files.sort();
        writeln!(out, "pub static {}: &[(i64, &str, &str)] = &[", backend.to_uppercase())?;
        for f in files {
            let stem = f.file_stem().and_then(|s| s.to_str()).ok_or("bad migration file name")?;
            let (version, desc) =
                stem.split_once('_').ok_or("migration must be named <version>_<what>.sql")?;
            let version: i64 = version.parse()?;
            writeln!(
                out,
                "    ({version}, {:?}, include_str!({:?})),",
                desc.replace('_', " "),
                f.canonicalize()?
            )?;
        }
        writeln!(out, "];")?;
    }
    std::fs::write(PathBuf::from(std::env::var("OUT_DIR")?).join("migrations.rs"), out)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
