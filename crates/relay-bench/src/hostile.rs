//! Hostile load for the record: `relay-bench fuzz` (malformed requests, tallied by status, with the
//! target's peak RSS) and `relay-bench flood` (valid-key latency alone and under a flood of bogus keys,
//! from one address or, with `--spread`, from a new forwarded address per request: the target must list
//! 127.0.0.1 in `edge.trusted_proxies` for that).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::load::{Target, open, pct};

pub async fn fuzz(
    base: &str,
    key: &str,
    model: &str,
    requests: u64,
    conns: usize,
    pid: Option<u32>,
) -> anyhow::Result<()> {
    let began = Instant::now();
    let report = relay_test_support::fuzz::run(base, key, model, requests, conns, 0x5eed).await;
    println!("{report} in {:.1} s", began.elapsed().as_secs_f64());
    if let Some(kib) = pid.and_then(relay_test_support::fuzz::peak_rss_kib) {
        println!("target peak RSS: {} MiB", kib / 1024);
    }
    for (what, answer) in &report.samples {
        println!("finding: {what}\n  -> {}", answer.lines().next().unwrap_or(""));
    }
    anyhow::ensure!(report.findings() == 0, "{} findings", report.findings());
    Ok(())
}

/// Valid-key latency alone, then while another process (so the two loads do not share a runtime)
/// sends `bogus` requests with random keys as fast as 32 connections go.
pub async fn flood(base: &str, key: &str, bogus: u64, spread: bool) -> anyhow::Result<()> {
    let t = Target::new(base, key);
    let rate = 200;
    let normal = open(&t, rate, Duration::from_secs(5)).await;
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args(["flood-bogus", "--base", base, "--requests", &bogus.to_string()]);
    if spread {
        cmd.arg("--spread");
    }
    let child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let under = open(&t, rate, Duration::from_secs(5)).await;
    let out = child.wait_with_output().await?;
    let ms = |v: &[Duration], q| pct(v, q);
    println!(
        "valid key at {rate} req/s alone: p50 {:.2} ms, p99 {:.2} ms ({} errors)",
        ms(&normal.latencies, 50.0),
        ms(&normal.latencies, 99.0),
        normal.errors
    );
    println!(
        "valid key at {rate} req/s during the flood: p50 {:.2} ms, p99 {:.2} ms ({} errors)",
        ms(&under.latencies, 50.0),
        ms(&under.latencies, 99.0),
        under.errors
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// The flood itself: `bogus` requests with random keys from 32 connections.
pub async fn bogus(base: &str, bogus: u64, spread: bool) -> anyhow::Result<()> {
    let flooding = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new()));
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let started = Instant::now();
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let (client, base, flooding, statuses) =
                (client.clone(), base.to_owned(), flooding.clone(), statuses.clone());
            tokio::spawn(async move {
                loop {
                    let i = flooding.fetch_add(1, Ordering::Relaxed);
                    if i >= bogus {
                        break;
                    }
                    let mut req = client
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(format!(
                            "rk_flood{w}n{i}_{:016x}",
                            i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        ))
                        .header("content-type", "application/json")
                        .body(r#"{"model":"bench","messages":[{"role":"user","content":"x"}]}"#);
                    if spread {
                        req = req.header(
                            "x-forwarded-for",
                            format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                        );
                    }
                    let s = req.send().await.map_or(0, |r| r.status().as_u16());
                    *statuses.lock().unwrap_or_else(|p| p.into_inner()).entry(s).or_default() += 1;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let took = started.elapsed();
    println!(
        "flood: {bogus} bogus-key requests in {:.1} s ({:.0}/s, {}), answers by status {:?}",
        took.as_secs_f64(),
        bogus as f64 / took.as_secs_f64(),
        if spread { "one forwarded address each" } else { "one address" },
        statuses.lock().unwrap_or_else(|p| p.into_inner())
    );
    Ok(())
}
