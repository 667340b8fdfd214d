//! Many long streams open at once: memory per open stream and how much later than the upstream's own
//! cadence events reach the client. The mock sends `chunks` events `gap_ms` apart on every stream; the
//! same load runs against the mock straight (the reference: what the client sees with no relay) and
//! through Relay embedded, and the table compares them.
//!
//! `relay-bench long-streams [--streams N] [--chunks N] [--gap-ms MS]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::process::Command;

use crate::load::{Target, body, pct};
use crate::procs::{self, Proc};

pub struct Options {
    pub streams: usize,
    pub chunks: usize,
    pub gap_ms: u64,
}

/// What one run of `streams` streams saw.
#[derive(Default)]
struct Seen {
    ok: usize,
    errors: usize,
    /// Between successive reads of each stream's body.
    gaps: Vec<Duration>,
    /// Every stream's largest gap.
    worst: Vec<Duration>,
    /// Every stream's largest gap once every stream was open (its first byte in): what a long stream
    /// sees, without the burst of a thousand requests arriving in the same millisecond.
    worst_open: Vec<Duration>,
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("relay-bench-long-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut mock_cmd = Command::new(std::env::current_exe()?);
    mock_cmd.args(["mock", "--chunks", &o.chunks.to_string(), "--gap-ms", &o.gap_ms.to_string()]);
    let mock = Proc::start("mock", mock_cmd, &dir.join("mock.log")).await?;
    let spread = Duration::from_millis(o.gap_ms);
    let direct = streams(&Target::new(&mock.url("listening"), "k"), o.streams, spread).await;

    let db_path = dir.join("embedded.db");
    let cfg = crate::modes::embedded_config(&dir, &db_path, &mock.url("listening"));
    let config = dir.join("embedded.toml");
    std::fs::write(&config, cfg)?;
    let relay = Proc::relay(&procs::relay_bin(), "embedded", &config, &dir).await?;
    let key = crate::modes::create_key(&relay.url("admin")).await?;
    let target = Target::new(&relay.url("http"), &key);
    // Warm-up (pooled connections, caches), then the idle footprint.
    let _ = streams(&target, 16, spread).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_mb, _) = procs::rss_mb(relay.pid());
    let through = streams(&target, o.streams, spread).await;
    let (_, peak_mb) = procs::rss_mb(relay.pid());
    relay.stop().await;
    mock.stop().await;
    let _ = std::fs::remove_dir_all(&dir);

    let per_stream_kb = (peak_mb - idle_mb).max(0.0) * 1024.0 / o.streams.max(1) as f64;
    let row = |name: &str, s: &Seen| {
        format!(
            "| {name} | {}/{} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            s.ok,
            s.ok + s.errors,
            pct(&s.gaps, 50.0),
            pct(&s.gaps, 99.0),
            pct(&s.worst, 100.0),
            pct(&s.worst_open, 100.0)
        )
    };
    println!(
        "{} streams at once (their starts spread over one cadence), {} events each, {} ms apart at the mock \
         (each stream lasts ~{:.0} s).\n\n\
         | | streams completed | gap p50 | gap p99 | worst gap of any stream | worst once all are open |\n\
         |---|---|---|---|---|---|\n{}\n{}\n\n\
         Relay embedded: resident memory {idle_mb:.1} MB idle, {peak_mb:.1} MB peak with every stream open: \
         {per_stream_kb:.1} KB per open stream. Worst gap beyond the mock's own: {:+.2} ms (p99 {:+.2} ms; \
         once every stream is open {:+.2} ms).",
        o.streams,
        o.chunks,
        o.gap_ms,
        (o.chunks as u64 * o.gap_ms) as f64 / 1000.0,
        row("mock, direct (the upstream's own cadence)", &direct),
        row("through Relay embedded", &through),
        pct(&through.worst, 100.0) - pct(&direct.worst, 100.0),
        pct(&through.gaps, 99.0) - pct(&direct.gaps, 99.0),
        pct(&through.worst_open, 100.0) - pct(&direct.worst_open, 100.0),
    );
    anyhow::ensure!(through.errors == 0, "{} streams through relay failed", through.errors);
    Ok(())
}

/// `n` streams at once, each read to its end (the kernel keeps the relay's peak memory meanwhile). Their
/// starts are spread evenly over `spread` (one event cadence): independent streams are not in phase, and
/// a thousand upstreams sending in the same millisecond every 50 ms would measure that burst instead.
async fn streams(t: &Target, n: usize, spread: Duration) -> Seen {
    let body = Arc::new(body(true));
    let mut tasks = Vec::with_capacity(n);
    let start = tokio::time::Instant::now();
    for i in 0..n {
        let (t, body) = (t.clone(), body.clone());
        let at = start + spread.mul_f64(i as f64 / n.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let r = t.send(&body).await;
            let Ok(r) = r.map_err(|_| ()).and_then(|r| if r.status().is_success() { Ok(r) } else { Err(()) })
            else {
                return None;
            };
            let mut s = r.bytes_stream();
            // (when the gap ended, the gap), and when the first byte came.
            let (mut last, mut gaps, mut done) = (None::<Instant>, Vec::new(), false);
            let mut first = None;
            while let Some(Ok(chunk)) = s.next().await {
                let now = Instant::now();
                first.get_or_insert(now);
                if let Some(prev) = last {
                    gaps.push((prev, now - prev));
                }
                last = Some(now);
                done |= chunk.windows(6).any(|w| w == b"[DONE]");
            }
            done.then_some((first?, gaps))
        }));
    }
    let mut runs = Vec::with_capacity(n);
    let mut seen = Seen::default();
    for task in tasks {
        match task.await {
            Ok(Some(run)) => runs.push(run),
            _ => seen.errors += 1,
        }
    }
    // Every stream is open once the last one's first byte came.
    let open = runs.iter().map(|(first, _)| *first).max();
    for (_, gaps) in runs {
        seen.ok += 1;
        seen.worst.push(gaps.iter().map(|g| g.1).max().unwrap_or_default());
        seen.worst_open.push(
            gaps.iter()
                .filter(|(began, _)| open.is_some_and(|o| *began >= o))
                .map(|g| g.1)
                .max()
                .unwrap_or_default(),
        );
        seen.gaps.extend(gaps.into_iter().map(|g| g.1));
    }
    seen
}
