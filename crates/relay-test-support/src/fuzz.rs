//! A hostile-client fuzzer for a running Relay edge: raw HTTP/1.1 over TCP, so it can send what no SDK
//! would (broken framing, invalid UTF-8, huge headers, type-confused and absurd JSON, deep nesting,
//! wrong methods and paths, bad keys). Every answer is tallied by status; a 5xx to a client fault, or a
//! dropped connection where an answer was due, is a finding (with the request that caused it).
//! Deterministic for a seed. Used by the e2e suite (a short run that must find nothing) and by
//! `relay-bench fuzz` (long runs, figures for the record).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one run found.
#[derive(Debug, Default)]
pub struct Report {
    pub sent: u64,
    pub by_class: [u64; 6],
    /// 5xx answers (the relay's own failures; with the demo upstream there is no upstream to blame).
    pub server_errors: u64,
    /// Connections closed without an answer where one was due.
    pub dropped: u64,
    /// Up to ten (request, answer) pairs behind the findings.
    pub samples: Vec<(String, String)>,
}

impl Report {
    pub fn findings(&self) -> u64 {
        self.server_errors + self.dropped
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [none, _, c2, _, c4, c5] = self.by_class;
        write!(
            f,
            "{} requests: {c2} 2xx, {c4} 4xx, {c5} 5xx, {none} closed without an answer ({} where one was due)",
            self.sent, self.dropped
        )
    }
}

use crate::Rng;

/// One hostile request: its bytes, a description, and whether an HTTP answer is owed.
struct Case {
    bytes: Vec<u8>,
    what: String,
    answer_due: bool,
}

const PATHS: [&str; 9] = [
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/messages/count_tokens",
    "/v1/models",
    "/v1/models/%00%ff..%2f",
    "/v1/../../etc/passwd",
    "/v2/nothing/here",
];

fn weird_value(r: &mut Rng) -> Value {
    match r.index(16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(u64::MAX),
        3 => json!(i64::MIN),
        4 => json!(-1),
        5 => json!(1.0e300),
        6 => json!(0.5),
        7 => json!(""),
        8 => json!("x".repeat(r.index(70_000))),
        9 => json!([]),
        10 => json!({}),
        11 => json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]),
        12 => json!({"role": "system", "content": [{"type": "input_audio"}]}),
        13 => json!("\u{0000}\u{feff}\u{10ffff}"),
        14 => json!([null, 1, "a", {"b": []}]),
        _ => json!(4_294_967_297u64),
    }
}

const FIELDS: [&str; 24] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "response_format",
    "stop",
    "user",
    "metadata",
    "input",
    "system",
    "thinking",
    "instructions",
    "logit_bias",
    "seed",
    "parallel_tool_calls",
    "reasoning",
];

fn body(r: &mut Rng, model: &str, path: &str) -> Vec<u8> {
    let mut base = if path.contains("responses") || path.contains("embeddings") {
        json!({"model": model, "input": "hi"})
    } else {
        json!({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
    };
    match r.index(12) {
        // Type confusion on one to four fields.
        0..=5 => {
            for _ in 0..1 + r.index(4) {
                let field = *r.pick(&FIELDS);
                if r.chance(20) {
                    base.as_object_mut().map(|o| o.remove(field));
                } else {
                    base[field] = weird_value(r);
                }
            }
            base.to_string().into_bytes()
        }
        // Message-level confusion.
        6 => {
            base["messages"] = json!([{"role": *r.pick(&["user", "assistant", "tool", "system", "developer", "bogus", ""]),
                "content": weird_value(r), "tool_calls": weird_value(r), "tool_call_id": weird_value(r)}]);
            base.to_string().into_bytes()
        }
        // Deep nesting.
        7 => {
            let depth = 1 + r.index(100_000);
            let mut s = format!("{{\"model\":\"{model}\",\"messages\":");
            s.push_str(&"[".repeat(depth));
            s.push_str(&"]".repeat(depth));
            s.push('}');
            s.into_bytes()
        }
        // Truncated or random bytes, invalid UTF-8 inside strings.
        8 => {
            let s = base.to_string();
            let cut = r.index(s.len());
            s.as_bytes()[..cut].to_vec()
        }
        9 => {
            let mut b = br#"{"model":""#.to_vec();
            b.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28, 0xa0, 0xa1]);
            b.extend_from_slice(br#"","messages":[{"role":"user","content":"hi"}]}"#);
            b
        }
        10 => (0..r.index(4096)).map(|_| (r.next_u64() & 0xff) as u8).collect(),
        // Many elements.
        _ => {
            let n = r.index(20_000);
            base["messages"] =
                Value::Array((0..n).map(|_| json!({"role": "user", "content": "hi"})).collect());
            base.to_string().into_bytes()
        }
    }
}

fn case(r: &mut Rng, key: &str, model: &str) -> Case {
    let path = (*r.pick(&PATHS)).to_owned();
    let path = if r.chance(2) { format!("/v1/{}", "a".repeat(10_000)) } else { path };
    let method =
        if r.chance(85) { "POST" } else { *r.pick(&["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"]) };
    let mut headers = vec![("host".to_owned(), "relay".to_owned())];
    match r.index(20) {
        0 => {}
        1 => headers.push(("authorization".into(), "Bearer rk_nope_nope".into())),
        2 => headers.push(("authorization".into(), format!("Basic {key}"))),
        3 => headers.push(("x-api-key".into(), "x".repeat(r.index(9000)))),
        4 => {
            headers.push(("authorization".into(), format!("Bearer rk_{:x}_{:x}", r.next_u64(), r.next_u64())))
        }
        _ => headers.push(("authorization".into(), format!("Bearer {key}"))),
    }
    if r.chance(80) {
        headers.push((
            "content-type".into(),
            (*r.pick(&[
                "application/json",
                "text/plain",
                "multipart/form-data",
                "application/json; charset=latin1",
            ]))
            .into(),
        ));
    }
    if r.chance(10) {
        headers.push(("x-relay-strategy".into(), (*r.pick(&["cost", "nope", "", "latency\u{7f}"])).into()));
    }
    if r.chance(10) {
        headers.push(("x-relay-session".into(), "s".repeat(r.index(5000))));
    }
    if r.chance(5) {
        headers
            .push(("x-forwarded-for".into(), (*r.pick(&["10.0.0.1, 1.2.3.4", "garbage", "::1", ""])).into()));
    }
    if r.chance(5) {
        headers.push(("anthropic-version".into(), "9999-99-99".into()));
    }
    let body = body(r, model, &path);
    let mut answer_due = true;
    let mut what = format!("{method} {} ({} body bytes)", &path[..path.len().min(60)], body.len());
    let mut req = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    for (k, v) in &headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    match r.index(25) {
        // A header far over any sane size.
        0 => {
            req.extend_from_slice(format!("x-huge: {}\r\n", "h".repeat(200_000)).as_bytes());
            what.push_str(" + 200 KB header");
            answer_due = false;
        }
        // Invalid bytes in a header value.
        1 => {
            req.extend_from_slice(b"x-bad: \xff\xfe\x00\r\n");
            what.push_str(" + invalid header bytes");
            answer_due = false;
        }
        // Declares less than it sends: the rest is parsed as a second (garbage) request.
        2 => {
            req.extend_from_slice(format!("content-length: {}\r\n", body.len() / 2).as_bytes());
            what.push_str(" + short content-length");
        }
        // Chunked, with a lying chunk size.
        3 => {
            req.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            req.extend_from_slice(format!("{:x}\r\n", body.len() + 10).as_bytes());
            req.extend_from_slice(&body);
            req.extend_from_slice(b"\r\n0\r\n\r\n");
            return Case { bytes: req, what: what + " + lying chunk size", answer_due: false };
        }
        // Both framings at once (a request-smuggling shape).
        4 => {
            req.extend_from_slice(
                format!("content-length: {}\r\ntransfer-encoding: chunked\r\n", body.len()).as_bytes(),
            );
            what.push_str(" + CL and TE");
            answer_due = false;
        }
        _ => req.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes()),
    }
    req.extend_from_slice(b"connection: close\r\n\r\n");
    req.extend_from_slice(&body);
    Case { bytes: req, what, answer_due }
}

/// Sends `case` and returns the status (0 when the connection closed without an answer).
async fn send(addr: &str, c: &Case) -> (u16, String) {
    let Ok(Ok(mut tcp)) =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await
    else {
        return (0, "connect failed".into());
    };
    // The server may answer (and close) before the whole request is written: that is fine.
    let _ = tcp.write_all(&c.bytes).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 8192];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > 64 * 1024 {
                        break;
                    }
                }
            }
        }
    })
    .await;
    if read.is_err() && buf.is_empty() {
        return (0, "no answer within 10 s".into());
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status =
        text.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3)).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.chars().take(400).collect())
}

/// Fires `requests` hostile requests at `base` (`http://host:port`) from `concurrency` connections.
/// `model` should be one the key may use (a demo route, so any 5xx is the relay's own).
pub async fn run(base: &str, key: &str, model: &str, requests: u64, concurrency: usize, seed: u64) -> Report {
    let addr = base.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let next = Arc::new(AtomicU64::new(0));
    let report = Arc::new(std::sync::Mutex::new(Report::default()));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (addr, key, model, next, report) =
                (addr.clone(), key.to_owned(), model.to_owned(), next.clone(), report.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    // Case `i` is the same whichever worker sends it: a run is reproducible from its seed.
                    let mut rng = Rng::new(seed ^ i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let c = case(&mut rng, &key, &model);
                    let (status, answer) = send(&addr, &c).await;
                    let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                    r.sent += 1;
                    r.by_class[usize::from(status / 100).min(5)] += 1;
                    let finding = status >= 500 || (status == 0 && c.answer_due);
                    if status >= 500 {
                        r.server_errors += 1;
                    } else if status == 0 && c.answer_due {
                        r.dropped += 1;
                    }
                    if finding && r.samples.len() < 10 {
                        r.samples.push((c.what, answer));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    Arc::try_unwrap(report).map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner())).unwrap_or_default()
}

/// Peak resident memory of a process, from `/proc/<pid>/status` (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
