//! Typed config from a TOML file plus environment overrides.
//!
//! `RELAY__EDGE__MAX_BODY_BYTES=1048576` sets `[edge] max_body_bytes`. Values parse as TOML when they can
//! (numbers, booleans, arrays like `["edge","auth"]`) and as strings otherwise. The environment is passed in
//! as a map, so tests never touch process state. Each section deserializes on its own, so one bad section does
//! not hide errors in the next; [`ConfigErrors`] lists every problem found.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

const ENV_PREFIX: &str = "RELAY__";

/// Every problem found in a config, reported together.
#[derive(Debug, Default)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} error(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    pub fn push(&mut self, e: impl Into<String>) {
        self.0.push(e.into());
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The merged config document, read section by section.
#[derive(Debug)]
pub struct ConfigSource {
    table: Table,
    taken: Vec<String>,
}

impl ConfigSource {
    /// Reads `file` (if any) and applies `RELAY__…` entries of `env`.
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let mut table = match file {
            None => Table::new(),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Self::parse_text(&text, &path.display().to_string(), &mut errors),
                Err(e) => {
                    errors.push(format!("{}: cannot read: {e}", path.display()));
                    Table::new()
                }
            },
        };
        // Sorted so overrides apply deterministically.
        let overrides: BTreeMap<_, _> = env.iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        for (key, raw) in overrides {
            let path: Vec<String> =
                key[ENV_PREFIX.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(String::is_empty) {
                errors.push(format!("{key}: empty path segment"));
                continue;
            }
            if let Err(e) = set_path(&mut table, &path, parse_env_value(raw)) {
                errors.push(format!("{key}: {e}"));
            }
        }
        Self::checked(table, errors)
    }

    /// Parses a TOML document given as text (tests, examples).
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let table = Self::parse_text(text, "config", &mut errors);
        Self::checked(table, errors)
    }

    fn checked(table: Table, errors: ConfigErrors) -> Result<Self, ConfigErrors> {
        if errors.is_empty() { Ok(Self { table, taken: Vec::new() }) } else { Err(errors) }
    }

    fn parse_text(text: &str, origin: &str, errors: &mut ConfigErrors) -> Table {
        match text.parse::<Table>() {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{origin}: {}", e.to_string().trim()));
                Table::new()
            }
        }
    }

    /// Deserializes `[name]` (absent = `T::default()`); a failure is recorded and the default returned.
    pub fn section<T: DeserializeOwned + Default>(&mut self, name: &str, errors: &mut ConfigErrors) -> T {
        self.taken.push(name.to_owned());
        let Some(value) = self.table.get(name).cloned() else {
            return T::default();
        };
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => v,
            Err(e) => {
                let path = e.path().to_string();
                let at = if path == "." { name.to_owned() } else { format!("{name}.{path}") };
                errors.push(format!("{at}: {}", e.into_inner().to_string().trim()));
                T::default()
            }
        }
    }

    /// Records an error for every top-level section no one asked for (typos like `[edg]`).
    pub fn finish(self, errors: &mut ConfigErrors) {
        for key in self.table.keys() {
            if !self.taken.iter().any(|t| t == key) {
                errors.push(format!("{key}: unknown section (known: {})", self.taken.join(", ")));
            }
        }
    }
}

fn parse_env_value(raw: &str) -> Value {
    match format!("v = {raw}").parse::<Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.to_owned())),
        Err(_) => Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = table;
    for seg in parents {
        let entry = cur.entry(seg.clone()).or_insert_with(|| Value::Table(Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| format!("`{seg}` is not a table"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Edge {
        listen: String,
        max_body_bytes: u64,
        services: Vec<String>,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Db {
        url: String,
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn env_overrides_file_values_with_typed_values() {
        let dir = std::env::temp_dir().join(format!("relay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.toml");
        std::fs::write(&file, "[edge]\nlisten = \"0.0.0.0:1\"\nmax_body_bytes = 5\n").unwrap();
        let e = env(&[
            ("RELAY__EDGE__MAX_BODY_BYTES", "1024"),
            ("RELAY__EDGE__SERVICES", "[\"edge\", \"auth\"]"),
            ("RELAY__DB__URL", "postgres://x@y/z"),
            ("UNRELATED", "1"),
        ]);
        let mut src = ConfigSource::load(Some(&file), &e).unwrap();
        let mut errs = ConfigErrors::default();
        let edge: Edge = src.section("edge", &mut errs);
        let db: Db = src.section("db", &mut errs);
        src.finish(&mut errs);
        assert!(errs.is_empty(), "{errs}");
        assert_eq!(edge.listen, "0.0.0.0:1");
        assert_eq!(edge.max_body_bytes, 1024);
        assert_eq!(edge.services, vec!["edge", "auth"]);
        assert_eq!(db.url, "postgres://x@y/z");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let mut src =
            ConfigSource::from_toml("[edge]\nlistne = \"x\"\n[db]\nurl = 5\n[typo]\na = 1\n").unwrap();
        let mut errs = ConfigErrors::default();
        let _: Edge = src.section("edge", &mut errs);
        let _: Db = src.section("db", &mut errs);
        src.finish(&mut errs);
        let text = errs.to_string();
        assert_eq!(errs.0.len(), 3, "{text}");
        assert!(text.contains("listne"), "{text}");
        assert!(text.contains("db.url"), "{text}");
        assert!(text.contains("typo: unknown section"), "{text}");
    }

    #[test]
    fn unreadable_file_and_bad_syntax_are_errors() {
        let errs =
            ConfigSource::load(Some(Path::new("/nonexistent/relay.toml")), &HashMap::new()).unwrap_err();
        assert!(errs.to_string().contains("cannot read"));
        assert!(ConfigSource::from_toml("[edge\n").is_err());
    }
}
