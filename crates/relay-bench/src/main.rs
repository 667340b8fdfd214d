//! relay-bench (`make bench`): Relay side by side with a bare reverse proxy (the floor) on one machine,
//! in one run, against a Rust mock upstream, with everything on (a virtual key with RPM/TPM/concurrency
//! and a budget, usage events, billing and ledger writes). Modes: embedded (SQLite, in-process bus,
//! in-memory limits), one process on Postgres + NATS + Redis, and five processes over gRPC (those two
//! when `DATABASE_URL`, `NATS_URL` and `REDIS_URL` are set). Writes a markdown table.
//!
//! `relay-bench run [--quick] [--out FILE]`; `relay-bench mock|proxy` are the helper processes it starts.

mod hostile;
mod instructions;
mod load;
mod long_streams;
mod modes;
mod procs;
mod upstream;

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let result = match args.first().map(String::as_str) {
        Some("mock") => {
            upstream::mock(
                flag("--chunks").and_then(|v| v.parse().ok()).unwrap_or(100),
                flag("--gap-ms").and_then(|v| v.parse().ok()).unwrap_or(0),
            )
            .await
        }
        Some("proxy") => match flag("--upstream") {
            Some(u) => upstream::proxy(u).await,
            None => Err(anyhow::anyhow!("proxy needs --upstream URL")),
        },
        // Load only, against a target someone else started (for profiling): prints requests per second.
        Some("load") => match (flag("--base"), flag("--key")) {
            (Some(base), Some(key)) => {
                let secs = flag("--secs").and_then(|v| v.parse().ok()).unwrap_or(10);
                let conns = flag("--conns").and_then(|v| v.parse().ok()).unwrap_or(64);
                let t = load::Target::new(&base, &key);
                let dur = std::time::Duration::from_secs(secs);
                // `--rate R`: an open loop at R requests per second, with latency percentiles.
                match flag("--rate").and_then(|v| v.parse().ok()) {
                    Some(rate) => {
                        let r = load::open(&t, rate, dur).await;
                        let ms = |q| load::pct(&r.latencies, q);
                        println!(
                            "{:.0} requests/s, {} errors, p50 {:.2} / p90 {:.2} / p99 {:.2} ms",
                            r.rps(),
                            r.errors,
                            ms(50.0),
                            ms(90.0),
                            ms(99.0)
                        );
                    }
                    None => {
                        let r = load::closed(&t, conns, dur).await;
                        println!("{:.0} requests/s, {} errors", r.rps(), r.errors);
                    }
                }
                Ok(())
            }
            _ => Err(anyhow::anyhow!("load needs --base URL --key KEY")),
        },
        Some("fuzz") => match (flag("--base"), flag("--key")) {
            (Some(base), Some(key)) => {
                let n = flag("--requests").and_then(|v| v.parse().ok()).unwrap_or(20_000);
                let conns = flag("--conns").and_then(|v| v.parse().ok()).unwrap_or(16);
                let pid = flag("--pid").and_then(|v| v.parse().ok());
                hostile::fuzz(&base, &key, &flag("--model").unwrap_or_else(|| "bench".into()), n, conns, pid)
                    .await
            }
            _ => Err(anyhow::anyhow!("fuzz needs --base URL --key KEY")),
        },
        Some("flood") => match (flag("--base"), flag("--key")) {
            (Some(base), Some(key)) => {
                let n = flag("--requests").and_then(|v| v.parse().ok()).unwrap_or(20_000);
                hostile::flood(&base, &key, n, args.iter().any(|a| a == "--spread")).await
            }
            _ => Err(anyhow::anyhow!("flood needs --base URL --key KEY")),
        },
        Some("flood-bogus") => match flag("--base") {
            Some(base) => {
                let n = flag("--requests").and_then(|v| v.parse().ok()).unwrap_or(20_000);
                hostile::bogus(&base, n, args.iter().any(|a| a == "--spread")).await
            }
            None => Err(anyhow::anyhow!("flood-bogus needs --base URL")),
        },
        Some("instructions") => {
            instructions::gate(instructions::Options {
                requests: flag("--requests").and_then(|v| v.parse().ok()).unwrap_or(200),
                baseline: flag("--baseline")
                    .unwrap_or_else(|| {
                        concat!(env!("CARGO_MANIFEST_DIR"), "/instructions-baseline.txt").into()
                    })
                    .into(),
                tolerance_pct: flag("--tolerance").and_then(|v| v.parse().ok()).unwrap_or(15.0),
                write: args.iter().any(|a| a == "--write"),
            })
            .await
        }
        Some("long-streams") => {
            long_streams::run(long_streams::Options {
                streams: flag("--streams").and_then(|v| v.parse().ok()).unwrap_or(1000),
                chunks: flag("--chunks").and_then(|v| v.parse().ok()).unwrap_or(400),
                gap_ms: flag("--gap-ms").and_then(|v| v.parse().ok()).unwrap_or(50),
            })
            .await
        }
        Some("hold") => modes::hold(args.get(1).map_or("embedded", String::as_str)).await,
        Some("run") => {
            let quick = args.iter().any(|a| a == "--quick");
            modes::run(quick, flag("--out")).await
        }
        _ => {
            eprintln!(
                "usage: relay-bench run [--quick] [--out FILE] | load --base URL --key K [--secs N] [--conns C | --rate RPS] | fuzz --base URL --key K [--model M] [--requests N] [--conns C] [--pid P] | flood --base URL --key K [--requests N] [--spread] | instructions [--requests N] [--baseline FILE] [--tolerance PCT] [--write] | long-streams [--streams N] [--chunks N] [--gap-ms MS] | hold embedded|single|five | mock [--chunks N] [--gap-ms MS] | proxy --upstream URL"
            );
            return ExitCode::from(64);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
