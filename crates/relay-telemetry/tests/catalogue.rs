//! Every metric the workspace records is in the catalogue with the kind it is recorded as: a metric
//! missing there would be exported without help text, and a histogram without LLM buckets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use relay_telemetry::catalogue::{self, Kind};

fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_recorded_metric_is_described_with_its_kind() {
    let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    sources(&crates, &mut files);
    let mut found = 0;
    for file in files.iter().filter(|f| f.components().any(|c| c.as_os_str() == "src")) {
        let text = std::fs::read_to_string(file).unwrap();
        // The macros, and the handle caches' methods (`relay_telemetry::handles`).
        for (call, kind) in [
            ("metrics::counter!(", Kind::Counter),
            ("metrics::gauge!(", Kind::Gauge),
            ("metrics::histogram!(", Kind::Histogram),
            (".counter(", Kind::Counter),
            (".histogram(", Kind::Histogram),
        ] {
            for (at, _) in text.match_indices(call) {
                let rest = &text[at + call.len()..];
                let rest = rest.trim_start();
                // Only literal names; a name passed in a variable is the catalogue's own loop.
                let Some(rest) = rest.strip_prefix('"') else { continue };
                let name = &rest[..rest.find('"').unwrap()];
                let m = catalogue::find(name)
                    .unwrap_or_else(|| panic!("{}: `{name}` is not in the catalogue", file.display()));
                assert_eq!(m.kind, kind, "{}: `{name}` recorded as {kind:?}", file.display());
                found += 1;
            }
        }
    }
    assert!(found > 50, "found only {found} metric call sites");
}
