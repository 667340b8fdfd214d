//! Surgical edits of a client's JSON body: change or add top-level fields and leave every other byte as
//! the client sent it (unknown fields, key order, number formatting, whitespace).

use std::collections::HashMap;
use std::ops::Range;

use relay_core::RelayError;
use serde_json::value::RawValue;

/// Top-level fields of a JSON object body, with where each value sits in the bytes.
pub struct JsonBody<'a> {
    bytes: &'a [u8],
    fields: HashMap<String, &'a RawValue>,
    edits: Vec<(Range<usize>, String)>,
}

impl<'a> JsonBody<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, RelayError> {
        let fields: HashMap<String, &RawValue> = serde_json::from_slice(bytes)
            .map_err(|e| RelayError::invalid_request(format!("request body is not a JSON object: {e}")))?;
        Ok(Self { bytes, fields, edits: Vec::new() })
    }

    /// The raw JSON text of a top-level field.
    pub fn raw(&self, key: &str) -> Option<&'a str> {
        self.fields.get(key).map(|v| v.get())
    }

    fn span(&self, key: &str) -> Option<Range<usize>> {
        let v = self.fields.get(key)?.get();
        // The raw value borrows from `bytes`, so its address gives its offset.
        let start = v.as_ptr() as usize - self.bytes.as_ptr() as usize;
        Some(start..start + v.len())
    }

    /// Replaces a field's value, or appends the field when absent. `json` must be valid JSON.
    pub fn set(&mut self, key: &str, json: String) {
        if let Some(span) = self.span(key) {
            self.edits.push((span, json));
        } else {
            let end = self.bytes.iter().rposition(|b| *b == b'}').unwrap_or(self.bytes.len());
            let sep = if self.fields.is_empty() { "" } else { "," };
            let key = serde_json::to_string(key).unwrap_or_default();
            self.edits.push((end..end, format!("{sep}{key}:{json}")));
        }
    }

    pub fn into_bytes(mut self) -> Vec<u8> {
        self.edits.sort_by_key(|(r, _)| r.start);
        let mut out = Vec::with_capacity(self.bytes.len() + 64);
        let mut at = 0;
        for (range, text) in &self.edits {
            out.extend_from_slice(&self.bytes[at..range.start]);
            out.extend_from_slice(text.as_bytes());
            at = range.end;
        }
        out.extend_from_slice(&self.bytes[at..]);
        out
    }
}

/// Makes an OpenAI chat body ask for the usage chunk, keeping any other `stream_options` the client set.
pub fn force_include_usage(body: &mut JsonBody<'_>) -> Result<(), RelayError> {
    let mut opts = match body.raw("stream_options") {
        Some(raw) if raw != "null" => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw)
            .map_err(|_| {
                RelayError::invalid_request("stream_options must be an object").with_param("stream_options")
            })?,
        _ => serde_json::Map::new(),
    };
    opts.insert("include_usage".into(), serde_json::Value::Bool(true));
    body.set("stream_options", serde_json::Value::Object(opts).to_string());
    Ok(())
}

/// JSON string literal for `s`.
pub fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_model_bytes() {
        let body = br#"{ "model" : "alias",  "x_unknown": {"b":1.50, "a":[1e3]},"messages":[] }"#;
        let mut j = JsonBody::parse(body).unwrap();
        j.set("model", json_str("gpt-4o-mini"));
        let out = String::from_utf8(j.into_bytes()).unwrap();
        assert_eq!(out, r#"{ "model" : "gpt-4o-mini",  "x_unknown": {"b":1.50, "a":[1e3]},"messages":[] }"#);
    }

    #[test]
    fn adds_and_merges_stream_options() {
        let mut j = JsonBody::parse(br#"{"model":"m","stream":true}"#).unwrap();
        force_include_usage(&mut j).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&j.into_bytes()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);

        let mut j =
            JsonBody::parse(br#"{"stream_options":{"include_obfuscation":false},"model":"m"}"#).unwrap();
        force_include_usage(&mut j).unwrap();
        j.set("model", json_str("u"));
        let v: serde_json::Value = serde_json::from_slice(&j.into_bytes()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["include_obfuscation"], false);
        assert_eq!(v["model"], "u");
    }

    #[test]
    fn rejects_non_objects() {
        assert!(JsonBody::parse(b"[1,2]").is_err());
        assert!(JsonBody::parse(b"{\"a\":").is_err());
        let mut j = JsonBody::parse(br#"{"stream_options":5}"#).unwrap();
        assert!(force_include_usage(&mut j).is_err());
    }
}
