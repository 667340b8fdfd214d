//! The CPU regression gate: instructions per request, counted by valgrind's callgrind (a count, not a
//! time: the same binary and requests give the same figure within a few percent whatever else the
//! machine is doing). Relay embedded (SQLite, in-process bus, in-memory limits, a key with every limit
//! on, billing and ledger writes) runs under callgrind against the mock upstream; after a warm-up, the
//! counters are zeroed, `requests` whole answers are sent one at a time and booked, and the process's
//! total is read from a dump; the same for streamed answers. Every thread of the process is counted
//! (the request path, the bus, billing's SQLite writes, the access log).
//!
//! `relay-bench instructions [--requests N] [--baseline FILE] [--tolerance PCT] [--write]`: fails when a
//! figure exceeds its baseline by more than the tolerance; `--write` records the figures as the baseline.
//! With `RELAY_BENCH_KEEP=1` the callgrind dumps stay on disk (the directory is printed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use relay_db::{Col, Db};
use tokio::process::Command;

use crate::load::{Target, body};
use crate::procs::{self, Proc};

pub struct Options {
    pub requests: usize,
    pub baseline: PathBuf,
    pub tolerance_pct: f64,
    pub write: bool,
}

/// Instructions per request of each kind.
#[derive(Debug, Clone, Copy)]
struct Figures {
    whole: u64,
    stream: u64,
}

pub async fn gate(o: Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        std::process::Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success()),
        "valgrind is not installed (apt-get install valgrind)"
    );
    let measured = measure(o.requests).await?;
    println!(
        "instructions per request (callgrind, every thread of relay embedded): whole {} · stream {}",
        measured.whole, measured.stream
    );
    if o.write {
        std::fs::write(
            &o.baseline,
            format!(
                "# Instructions per request, from `relay-bench instructions --write` (a release build).\nwhole {}\nstream {}\n",
                measured.whole, measured.stream
            ),
        )?;
        println!("baseline written to {}", o.baseline.display());
        return Ok(());
    }
    let base = read_baseline(&o.baseline)?;
    let mut failed = Vec::new();
    for (kind, now, was) in [("whole", measured.whole, base.whole), ("stream", measured.stream, base.stream)]
    {
        let change = (now as f64 / was.max(1) as f64 - 1.0) * 100.0;
        println!("{kind}: {now} against a baseline of {was} ({change:+.1} %)");
        if change > o.tolerance_pct {
            failed.push(format!(
                "{kind} answers cost {change:+.1} % instructions (limit +{} %)",
                o.tolerance_pct
            ));
        } else if change < -o.tolerance_pct {
            println!("{kind}: cheaper than the baseline by more than the tolerance; record it with --write");
        }
    }
    anyhow::ensure!(failed.is_empty(), "CPU regression: {}", failed.join("; "));
    Ok(())
}

fn read_baseline(path: &Path) -> anyhow::Result<Figures> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let get = |kind: &str| {
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| v.trim().parse().ok())
            .with_context(|| format!("{} has no `{kind} <n>` line", path.display()))
    };
    Ok(Figures { whole: get("whole")?, stream: get("stream")? })
}

async fn measure(requests: usize) -> anyhow::Result<Figures> {
    let dir = std::env::temp_dir().join(format!("relay-bench-instructions-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut mock_cmd = Command::new(std::env::current_exe()?);
    mock_cmd.arg("mock");
    let mock = Proc::start("mock", mock_cmd, &dir.join("mock.log")).await?;
    let db_path = dir.join("embedded.db");
    let cfg = crate::modes::embedded_config(&dir, &db_path, &mock.url("listening"));
    let config = dir.join("embedded.toml");
    std::fs::write(&config, cfg)?;
    let out = dir.join("callgrind.out");
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(procs::relay_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "error");
    let relay = Proc::start("relay under callgrind", cmd, &dir.join("relay.log")).await?;
    let key = crate::modes::create_key(&relay.url("admin")).await?;
    let db = Db::connect(&format!("sqlite://{}", db_path.display())).await?;
    let target = Target::new(&relay.url("http"), &key);
    let pid = relay.pid();
    let mut booked = 0;
    // Warm-up: lazily built state (caches, prepared statements, budget seeds, pooled connections).
    send(&target, &db, false, 30, &mut booked).await?;
    send(&target, &db, true, 30, &mut booked).await?;
    control(pid, "-z")?;
    send(&target, &db, false, requests, &mut booked).await?;
    let whole = dumped(pid, &out, requests).await?;
    control(pid, "-z")?;
    send(&target, &db, true, requests, &mut booked).await?;
    let stream = dumped(pid, &out, requests).await?;
    relay.stop().await;
    mock.stop().await;
    // `RELAY_BENCH_KEEP=1` keeps the dumps (whole answers first, then streams) for `callgrind_annotate`.
    if std::env::var_os("RELAY_BENCH_KEEP").is_some() {
        println!("callgrind dumps kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(Figures { whole, stream })
}

/// `n` requests, one at a time, booked by billing before this returns (so their writes are counted).
async fn send(target: &Target, db: &Db, stream: bool, n: usize, booked: &mut usize) -> anyhow::Result<()> {
    let body = body(stream);
    for _ in 0..n {
        anyhow::ensure!(target.once(&body).await, "a request through relay failed");
    }
    *booked += n;
    wait_booked(db, *booked).await
}

/// Instructions per request since the counters were zeroed: dumped, read back, divided by `requests`.
async fn dumped(pid: u32, out: &Path, requests: usize) -> anyhow::Result<u64> {
    let before = dumps(out);
    control(pid, "-d")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let dump = loop {
        if let Some(new) = dumps(out).into_iter().find(|d| !before.contains(d)) {
            // Written in one go once callgrind reports the dump done; give it a moment to close.
            tokio::time::sleep(Duration::from_millis(500)).await;
            break new;
        }
        anyhow::ensure!(Instant::now() < deadline, "callgrind wrote no dump");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = std::fs::read_to_string(&dump)?;
    let total: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no total in {}", dump.display()))?;
    Ok(total / requests.max(1) as u64)
}

fn control(pid: u32, what: &str) -> anyhow::Result<()> {
    let s = std::process::Command::new("callgrind_control").arg(what).arg(pid.to_string()).output()?;
    anyhow::ensure!(s.status.success(), "callgrind_control {what} failed");
    Ok(())
}

fn dumps(out: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (out.parent(), out.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(name) && n != name))
        .collect()
}

/// Waits until billing booked `n` usage records (so their writes fall inside the count).
async fn wait_booked(db: &Db, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = db.fetch("SELECT COUNT(*) FROM usage_records", &[], &[Col::I64]).await?;
        let have = rows.first().and_then(|r| r.first()).map_or(0, relay_db::Val::i64);
        if usize::try_from(have).unwrap_or(0) >= n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "billing booked {have} of {n} requests");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
