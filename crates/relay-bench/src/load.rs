//! The load generator: a closed loop at a fixed concurrency (max throughput), an open loop at a fixed rate
//! (latency, measured from each request's scheduled start so a stall cannot hide behind the requests it
//! delayed), and streaming probes (time to first byte, to the first content event, gaps between events).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;

pub const CHAT: &str = r#"{"model":"bench","max_tokens":256,"messages":[{"role":"system","content":"You are a benchmark. Answer with the padding below and nothing else."},{"role":"user","content":"PADDING"}]}"#;

/// A ~1 KB chat request body (whole answer, or streaming with usage).
pub fn body(stream: bool) -> String {
    let b = CHAT.replace("PADDING", &"lorem ipsum ".repeat(70));
    if stream { b.replacen('{', r#"{"stream":true,"stream_options":{"include_usage":true},"#, 1) } else { b }
}

#[derive(Clone)]
pub struct Target {
    pub client: reqwest::Client,
    pub url: String,
    pub key: String,
}

impl Target {
    pub fn new(base: &str, key: &str) -> Self {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(4096)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        Self { client, url: format!("{base}/v1/chat/completions"), key: key.to_owned() }
    }

    /// Sends one chat request; the answer's status says whether it was served.
    pub async fn send(&self, body: &str) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(&self.url)
            .bearer_auth(&self.key)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
    }

    pub async fn once(&self, body: &str) -> bool {
        let r = self.send(body).await;
        match r {
            Ok(r) => {
                let ok = r.status().is_success();
                ok && r.bytes().await.is_ok()
            }
            Err(_) => false,
        }
    }
}

#[derive(Debug, Default)]
pub struct Run {
    pub ok: u64,
    pub errors: u64,
    pub took: Duration,
    pub latencies: Vec<Duration>,
}

impl Run {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

/// `conns` clients sending back to back for `dur`.
pub async fn closed(t: &Target, conns: usize, dur: Duration) -> Run {
    let body = Arc::new(body(false));
    let (ok, err) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (t, body, ok, err) = (t.clone(), body.clone(), ok.clone(), err.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if t.once(&body).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    err.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Run {
        ok: ok.load(Ordering::Relaxed),
        errors: err.load(Ordering::Relaxed),
        took: start.elapsed(),
        latencies: vec![],
    }
}

/// `rate` requests per second for `dur`, each timed from when it was due.
pub async fn open(t: &Target, rate: u64, dur: Duration) -> Run {
    let body = Arc::new(body(false));
    let n = rate * dur.as_secs().max(1);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let (t, body) = (t.clone(), body.clone());
        tasks.push(tokio::spawn(async move { (t.once(&body).await, due.elapsed()) }));
    }
    let mut run = Run::default();
    for task in tasks {
        match task.await {
            Ok((true, took)) => {
                run.ok += 1;
                run.latencies.push(took);
            }
            _ => run.errors += 1,
        }
    }
    run.took = start.elapsed();
    run
}

#[derive(Debug, Default)]
pub struct Streams {
    pub ok: u64,
    pub errors: u64,
    pub ttfb: Vec<Duration>,
    pub ttft: Vec<Duration>,
    /// Between successive reads of the body (each carries one or more events).
    pub gaps: Vec<Duration>,
}

/// `conns` clients each reading `per_conn` streams end to end.
pub async fn streams(t: &Target, conns: usize, per_conn: usize) -> Streams {
    let body = Arc::new(body(true));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (t, body) = (t.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Streams::default();
            for _ in 0..per_conn {
                let began = Instant::now();
                let r = t
                    .client
                    .post(&t.url)
                    .bearer_auth(&t.key)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await;
                let Ok(r) =
                    r.map_err(|_| ()).and_then(|r| if r.status().is_success() { Ok(r) } else { Err(()) })
                else {
                    out.errors += 1;
                    continue;
                };
                let mut s = r.bytes_stream();
                let (mut first, mut token, mut last) = (None, None, None);
                let mut done = false;
                while let Some(Ok(chunk)) = s.next().await {
                    let now = Instant::now();
                    first.get_or_insert(now - began);
                    if token.is_none() && chunk.windows(10).any(|w| w == b"\"content\":") {
                        token = Some(now - began);
                    }
                    if let Some(prev) = last {
                        out.gaps.push(now - prev);
                    }
                    last = Some(now);
                    done |= chunk.windows(6).any(|w| w == b"[DONE]");
                }
                match (first, token, done) {
                    (Some(b), Some(tt), true) => {
                        out.ok += 1;
                        out.ttfb.push(b);
                        out.ttft.push(tt);
                    }
                    _ => out.errors += 1,
                }
            }
            out
        }));
    }
    let mut all = Streams::default();
    for task in tasks {
        if let Ok(s) = task.await {
            all.ok += s.ok;
            all.errors += s.errors;
            all.ttfb.extend(s.ttfb);
            all.ttft.extend(s.ttft);
            all.gaps.extend(s.gaps);
        }
    }
    all
}

/// The `q`-th percentile (0..=100) in milliseconds; 0 for no samples.
pub fn pct(v: &[Duration], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s: Vec<Duration> = v.to_vec();
    s.sort_unstable();
    let i = ((q / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)].as_secs_f64() * 1000.0
}
