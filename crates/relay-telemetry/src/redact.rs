//! Masking of secrets and personal data in text Relay writes out: log lines (every line, by the writer
//! [`Scrubbing`]) and provider error messages relayed to callers ([`upstream_message`]).
//!
//! What is masked: bearer tokens, API keys of the known shapes (`sk-…`, `rk_…`, `AIza…`, `gsk_…`, …),
//! JWTs, `key=value` credentials, email addresses and card numbers (Luhn-checked). Provider messages
//! also lose account, organisation and project ids, UUIDs and long opaque tokens.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::{Captures, Regex};

struct Rule {
    re: Regex,
    with: fn(&Captures<'_>) -> String,
}

fn rule(pattern: &str, with: fn(&Captures<'_>) -> String) -> Rule {
    // The patterns are constants tested below; an invalid one is a build-time bug.
    #[allow(clippy::expect_used)]
    let re = Regex::new(pattern).expect("redaction pattern");
    Rule { re, with }
}

fn luhn(digits: &str) -> bool {
    let ds: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&ds.len()) {
        return false;
    }
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| if i % 2 == 1 { if d * 2 > 9 { d * 2 - 9 } else { d * 2 } } else { *d })
        .sum();
    sum.is_multiple_of(10)
}

/// Secrets and personal data, masked everywhere.
static SECRETS: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    vec![
        rule(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}", |c| format!("{} ***", &c[1])),
        rule(
            r#"(?i)\b(api[_-]?key|x-api-key|access[_-]?token|secret|password|passwd|authorization|pepper)(["']?\s*[:=]\s*["']?)[^\s"',;&}]{4,}"#,
            |c| format!("{}{}***", &c[1], &c[2]),
        ),
        rule(r"\b(sk|rk|pk|gsk|xai|key|sess|ghp|glpat)([-_])[A-Za-z0-9_\-*]{8,}", |c| {
            format!("{}{}***", &c[1], &c[2])
        }),
        rule(r"\bAIza[0-9A-Za-z_-]{20,}", |_| "AIza***".into()),
        rule(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{4,}", |_| "***".into()),
        rule(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", |_| "[email]".into()),
        rule(r"\b\d(?:[ -]?\d){12,18}\b", |c| if luhn(&c[0]) { "[card]".into() } else { c[0].to_owned() }),
    ]
});

/// What a provider's message may also reveal about the account behind Relay's credentials.
static ACCOUNT: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    vec![
        rule(r"\b(org|proj|project|acct|account|user|asst|file|ft)([-_])[A-Za-z0-9]{6,}", |c| {
            format!("{}{}***", &c[1], &c[2])
        }),
        rule(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b", |_| {
            "***".into()
        }),
        rule(r"\b(?:[A-Za-z]*\d[A-Za-z0-9_-]*[A-Za-z]|[A-Za-z][A-Za-z0-9_-]*\d)[A-Za-z0-9_-]*\b", |c| {
            if c[0].len() >= 32 { "***".into() } else { c[0].to_owned() }
        }),
    ]
});

fn apply<'a>(rules: &[Rule], text: &'a str) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(text);
    for r in rules {
        if r.re.is_match(&out) {
            let replaced = r.re.replace_all(&out, |c: &Captures<'_>| (r.with)(c)).into_owned();
            out = Cow::Owned(replaced);
        }
    }
    out
}

/// `text` with secrets and personal data masked (for logs and anything else written out).
pub fn secrets(text: &str) -> Cow<'_, str> {
    apply(&SECRETS, text)
}

/// A provider's error message made safe to relay to a caller: secrets, personal data and the ids of the
/// account behind Relay's provider credentials masked.
pub fn upstream_message(text: &str) -> String {
    apply(&ACCOUNT, &secrets(text)).into_owned()
}

/// A log writer that masks every line it writes ([`secrets`]).
pub struct Scrubbing<W>(pub W);

impl<W: std::io::Write> std::io::Write for Scrubbing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => {
                let masked = secrets(text);
                self.0.write_all(masked.as_bytes())?;
            }
            Err(_) => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_personal_data_are_masked() {
        for (input, gone) in [
            ("Incorrect API key provided: sk-proj-AbCdEf0123456789xyz. Find it at ...", "AbCdEf0123456789"),
            ("Authorization: Bearer rk_abcdefghijkl_0123456789abcdefghijklmnop", "0123456789abcdef"),
            ("x-api-key: sk-ant-api03-ZZZZZZZZZZZZZZZZ", "ZZZZZZZZ"),
            ("key=AIzaSyA1234567890abcdefghijklmnop", "1234567890abcdef"),
            ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "eyJzdWIi"),
            ("{\"api_key\": \"hunter2-secret\"}", "hunter2"),
            ("contact jane.doe+relay@example.co.uk now", "jane.doe"),
            ("card 4111 1111 1111 1111 declined", "4111 1111"),
            ("card 4111-1111-1111-1111", "1111-1111"),
            ("pepper = \"a-long-enough-pepper\"", "a-long-enough"),
        ] {
            let out = secrets(input);
            assert!(!out.contains(gone), "{input:?} → {out:?}");
        }
        let plain = "request 0190f5c8-1e1f-7a3b-9c1d-2f3e4a5b6c7d took 12 ms; 1234567890123 tokens";
        assert_eq!(secrets(plain), plain, "ids, numbers that fail Luhn and plain text stay");
    }

    #[test]
    fn provider_messages_lose_the_account_behind_the_credentials() {
        let msg = "You exceeded your quota for organization org-AbC123xyz in project proj_9f8e7d6c5b, \
                   subscription 3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f, key sk-abc1234567890xyz, \
                   request req_a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8. Please check max_tokens.";
        let out = upstream_message(msg);
        for gone in ["AbC123xyz", "9f8e7d6c5b", "3f2b1c9e", "abc1234567890", "a1b2c3d4e5f6a7b8"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        assert!(out.contains("Please check max_tokens."), "{out}");
        assert!(out.contains("You exceeded your quota"), "{out}");
    }

    #[test]
    fn the_log_writer_masks_what_it_writes() {
        use std::io::Write as _;
        let mut w = Scrubbing(Vec::new());
        w.write_all(b"upstream said: invalid key sk-live-0123456789abcdef\n").unwrap();
        let out = String::from_utf8(w.0).unwrap();
        assert_eq!(out, "upstream said: invalid key sk-***\n");
    }
}
