//! Each target of the benchmark, started, loaded and measured the same way, then one markdown table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use relay_db::{Col, Db};
use serde_json::json;
use tokio::process::Command;

use crate::load::{self, Target, pct};
use crate::procs::{self, Proc};

const ADMIN: &str = "bench-admin-token-0123456789";
const PEPPER: &str = "bench-pepper-0123456789abcdef";

/// One row of the table.
#[derive(Default)]
struct Row {
    name: String,
    max_rps: f64,
    cpu_us: f64,
    p50: f64,
    p99: f64,
    at_rate_errors: u64,
    ttfb_c1: f64,
    ttfb_c16: f64,
    ttft_c16: f64,
    gap_p99: f64,
    rss_peak: f64,
    /// Peak resident memory right after the max run (before the streaming probes).
    rss_max_run: f64,
    billing_lag_ms: Option<(f64, f64)>,
    /// The floor's max run (RPS, CPU µs per request) measured right before this row's, so the ratios
    /// compare runs minutes apart on a machine whose speed drifts.
    floor_next_to: Option<(f64, f64)>,
}

struct Plan {
    dur: Duration,
    conns: usize,
    rate: u64,
    streams_c1: usize,
    streams_c16: usize,
}

/// Everything a target is: its processes (for CPU and memory), where to send, and where usage lands.
struct Running {
    procs: Vec<Proc>,
    base: String,
    key: String,
    db: Option<Db>,
}

pub async fn run(quick: bool, out: Option<String>) -> anyhow::Result<()> {
    let plan = if quick {
        Plan { dur: Duration::from_secs(2), conns: 32, rate: 1000, streams_c1: 20, streams_c16: 3 }
    } else {
        Plan { dur: Duration::from_secs(6), conns: 64, rate: 1000, streams_c1: 60, streams_c16: 10 }
    };
    let dir = std::env::temp_dir().join(format!("relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let me = std::env::current_exe()?;
    let relay = procs::relay_bin();
    anyhow::ensure!(relay.exists(), "no relay binary at {} (run `make bench`)", relay.display());

    let mut mock_cmd = Command::new(&me);
    mock_cmd.arg("mock");
    let mock = Proc::start("mock", mock_cmd, &dir.join("mock.log")).await?;
    let mock_url = mock.url("listening");
    let mut rows = Vec::new();

    // The baseline every "added" figure subtracts: the mock, straight.
    let direct = measure(
        "mock, direct",
        &plan,
        &Running { procs: vec![], base: mock_url.clone(), key: "k".into(), db: None },
    )
    .await;
    let mut proxy_cmd = Command::new(&me);
    proxy_cmd.args(["proxy", "--upstream", &mock_url]);
    let floor = Proc::start("floor", proxy_cmd, &dir.join("floor.log")).await?;
    let base = floor.url("listening");
    let floor_run = Running { procs: vec![floor], base, key: "k".into(), db: None };
    rows.push(measure("bare reverse proxy (the floor)", &plan, &floor_run).await);

    let embedded = start_embedded(&relay, &dir, &mock_url).await?;
    let floor_now = floor_max(&plan, &floor_run).await;
    rows.push(measure("Relay embedded (SQLite, in-process bus)", &plan, &embedded).await.beside(floor_now));
    stop_all(embedded.procs).await;

    let services = ["DATABASE_URL", "NATS_URL", "REDIS_URL"].map(|v| std::env::var(v).ok());
    if let [Some(pg), Some(nats), Some(redis)] = &services {
        let single = start_services(&relay, &dir, &mock_url, pg, nats, redis, false).await?;
        let floor_now = floor_max(&plan, &floor_run).await;
        rows.push(
            measure("Relay, one process on Postgres + NATS + Redis", &plan, &single).await.beside(floor_now),
        );
        stop_all(single.procs).await;
        let five = start_services(&relay, &dir, &mock_url, pg, nats, redis, true).await?;
        let floor_now = floor_max(&plan, &floor_run).await;
        rows.push(measure("Relay, five processes over gRPC", &plan, &five).await.beside(floor_now));
        stop_all(five.procs).await;
    } else {
        eprintln!(
            "relay-bench: DATABASE_URL, NATS_URL and REDIS_URL unset: skipping the Postgres and five-process modes"
        );
    }
    stop_all(floor_run.procs).await;
    mock.stop().await;

    let table = render(&direct, &rows, &plan);
    println!("{table}");
    if let Some(path) = out {
        std::fs::write(&path, &table).with_context(|| format!("writing {path}"))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `relay-bench hold <embedded|single|five>`: starts the mock and that target, prints where it listens
/// (base URL, key, pids) and keeps it up until killed, for profiling with `relay-bench load` and `perf`.
pub async fn hold(mode: &str) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("relay-bench-hold-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut mock_cmd = Command::new(std::env::current_exe()?);
    mock_cmd.arg("mock");
    let mock = Proc::start("mock", mock_cmd, &dir.join("mock.log")).await?;
    let mock_url = mock.url("listening");
    let relay = procs::relay_bin();
    let env = |v: &str| std::env::var(v).with_context(|| format!("{v} is needed for this mode"));
    let r = match mode {
        "embedded" => start_embedded(&relay, &dir, &mock_url).await?,
        "single" | "five" => {
            let (pg, nats, redis) = (env("DATABASE_URL")?, env("NATS_URL")?, env("REDIS_URL")?);
            start_services(&relay, &dir, &mock_url, &pg, &nats, &redis, mode == "five").await?
        }
        other => anyhow::bail!("unknown mode `{other}` (embedded, single, five)"),
    };
    let pids: Vec<u32> = r.procs.iter().map(Proc::pid).collect();
    println!("{}", json!({"base": r.base, "key": r.key, "pids": pids, "mock": mock_url, "dir": dir}));
    tokio::signal::ctrl_c().await?;
    stop_all(r.procs).await;
    mock.stop().await;
    Ok(())
}

async fn stop_all(procs: Vec<Proc>) {
    for p in procs {
        p.stop().await;
    }
}

impl Row {
    fn beside(mut self, floor: (f64, f64)) -> Self {
        self.floor_next_to = Some(floor);
        self
    }
}

/// The floor's max run again (RPS, CPU µs per request), for the row measured next.
async fn floor_max(plan: &Plan, floor: &Running) -> (f64, f64) {
    let t = Target::new(&floor.base, &floor.key);
    let pid = floor.procs.first().map_or(0, Proc::pid);
    let before = procs::cpu(pid);
    let max = load::closed(&t, plan.conns, plan.dur).await;
    let cpu_us =
        if max.ok > 0 { (procs::cpu(pid) - before).as_secs_f64() * 1e6 / max.ok as f64 } else { 0.0 };
    (max.rps(), cpu_us)
}

async fn measure(name: &str, plan: &Plan, r: &Running) -> Row {
    let t = Target::new(&r.base, &r.key);
    eprintln!("relay-bench: {name}");
    // Warm-up: connections, caches, JIT-free but page-cache and pool warm.
    let _ = load::closed(&t, 8, Duration::from_millis(500)).await;
    let pids: Vec<u32> = r.procs.iter().map(Proc::pid).collect();
    let cpu = || pids.iter().map(|p| procs::cpu(*p)).sum::<Duration>();
    let before = cpu();
    let max = load::closed(&t, plan.conns, plan.dur).await;
    let cpu_us = if max.ok > 0 { (cpu() - before).as_secs_f64() * 1e6 / max.ok as f64 } else { 0.0 };
    let ended = Instant::now();
    let edge = pids.first().copied().unwrap_or(0);
    let rss_max_run = procs::rss_mb(edge).1;
    // Billing must catch up with the max run; the lag is read from the rows themselves.
    let billing_lag_ms = match &r.db {
        Some(db) => billing_lag(db, ended).await,
        None => None,
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_rate = load::open(&t, plan.rate, plan.dur).await;
    let c1 = load::streams(&t, 1, plan.streams_c1).await;
    let c16 = load::streams(&t, 16, plan.streams_c16).await;
    let rss_peak = procs::rss_mb(edge).1;
    Row {
        name: name.to_owned(),
        max_rps: max.rps(),
        cpu_us,
        p50: pct(&at_rate.latencies, 50.0),
        p99: pct(&at_rate.latencies, 99.0),
        at_rate_errors: at_rate.errors + max.errors + c1.errors + c16.errors,
        ttfb_c1: pct(&c1.ttfb, 99.0),
        ttfb_c16: pct(&c16.ttfb, 99.0),
        ttft_c16: pct(&c16.ttft, 99.0),
        gap_p99: pct(&c16.gaps, 99.0),
        rss_peak,
        rss_max_run,
        billing_lag_ms,
        floor_next_to: None,
    }
}

/// (worst per-request lag from the request's end to its row, wait after the run for the last row).
async fn billing_lag(db: &Db, ended: Instant) -> Option<(f64, f64)> {
    let sql =
        "SELECT COUNT(*), COALESCE(MAX(recorded_at_ms - started_at_ms - duration_ms), 0) FROM usage_records";
    let mut last = (-1, 0);
    let mut stable_since = Instant::now();
    loop {
        let row = db.fetch(sql, &[], &[Col::I64, Col::I64]).await.ok()?.pop()?;
        let now = (row[0].i64(), row[1].i64());
        if now.0 != last.0 {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_millis(1000)
            || ended.elapsed() > Duration::from_secs(60)
        {
            let waited = stable_since.saturating_duration_since(ended).as_secs_f64() * 1000.0;
            return Some((last.1 as f64, waited.max(0.0)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn common(mock: &str) -> String {
    format!(
        "[telemetry]\nlog_filter = \"error\"\n\
         [auth]\npepper = \"{PEPPER}\"\nadmin_token = \"{ADMIN}\"\n\
         [[adapter.providers]]\nname = \"mock\"\nkind = \"openai\"\nbase_url = \"{mock}/v1\"\napi_key = \"bench-upstream\"\n\
         [[routing.models]]\nname = \"bench\"\ndeployments = [{{ provider = \"mock\", model = \"gpt-4o-mini\", max_output_tokens = 1024 }}]\n"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text)?;
    Ok(p)
}

/// Relay embedded: SQLite at `db_path`, the outbox in `dir`, the bench key's route to `mock`.
pub fn embedded_config(dir: &Path, db_path: &Path, mock: &str) -> String {
    format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n[bus]\noutbox_dir = \"{}\"\n{}",
        db_path.display(),
        dir.join("embedded-outbox").display(),
        common(mock)
    )
}

async fn start_embedded(relay: &Path, dir: &Path, mock: &str) -> anyhow::Result<Running> {
    let db_path = dir.join("embedded.db");
    let cfg = embedded_config(dir, &db_path, mock);
    let p = Proc::relay(relay, "embedded", &write(dir, "embedded", &cfg)?, dir).await?;
    let (base, admin) = (p.url("http"), p.url("admin"));
    let key = create_key(&admin).await?;
    let db = Db::connect(&format!("sqlite://{}", db_path.display())).await?;
    Ok(Running { procs: vec![p], base, key, db: Some(db) })
}

#[allow(clippy::too_many_arguments)]
async fn start_services(
    relay: &Path,
    dir: &Path,
    mock: &str,
    pg: &str,
    nats: &str,
    redis: &str,
    five: bool,
) -> anyhow::Result<Running> {
    let tag = format!("{}{}", if five { "five" } else { "one" }, relay_tag());
    let db_url = fresh_database(pg, &format!("bench_{tag}")).await?;
    let shared = format!(
        "[database]\nurl = \"{db_url}\"\n[bus]\nnats_url = \"{nats}\"\noutbox_dir = \"{}\"\n\
         [bus.jetstream]\nstream = \"BENCH_{tag}\"\nsubject = \"bench.usage.{tag}\"\nconsumer = \"billing-{tag}\"\n\
         [limits]\nredis_url = \"{redis}\"\nkey_prefix = \"bench-{tag}\"\n{}",
        dir.join(format!("{tag}-outbox")).display(),
        common(mock)
    );
    let mut procs = Vec::new();
    let edge_cfg = if five {
        let mut grpc = std::collections::HashMap::new();
        for s in ["billing", "auth", "routing", "adapter"] {
            let cfg = format!(
                "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"{s}\"]\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{shared}"
            );
            let p = Proc::relay(relay, &format!("{tag}-{s}"), &write(dir, &format!("{tag}-{s}"), &cfg)?, dir)
                .await?;
            grpc.insert(s, (p.url("grpc"), p.url("admin")));
            procs.push(p);
        }
        format!(
            "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"edge\"]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [remote]\nauth = \"{}\"\nrouting = \"{}\"\nadapter = \"{}\"\nbilling = \"{}\"\n{shared}",
            grpc["auth"].0, grpc["routing"].0, grpc["adapter"].0, grpc["billing"].0
        )
    } else {
        format!("[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{shared}")
    };
    let edge =
        Proc::relay(relay, &format!("{tag}-edge"), &write(dir, &format!("{tag}-edge"), &edge_cfg)?, dir)
            .await?;
    let base = edge.url("http");
    // Keys live where auth runs.
    let admin = if five { procs[1].url("admin") } else { edge.url("admin") };
    procs.insert(0, edge);
    let key = create_key(&admin).await?;
    Ok(Running { procs, base, key, db: Some(Db::connect(&db_url).await?) })
}

fn relay_tag() -> String {
    format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
    )
}

async fn fresh_database(pg: &str, name: &str) -> anyhow::Result<String> {
    let admin = Db::connect(pg).await?;
    admin.execute(&format!("CREATE DATABASE {name}"), &[]).await?;
    admin.close().await;
    let (base, _) = pg.rsplit_once('/').context("DATABASE_URL without a database name")?;
    Ok(format!("{base}/{name}"))
}

/// A virtual key with every limit on (high enough never to refuse): RPM, TPM, concurrency, a budget.
pub async fn create_key(admin: &str) -> anyhow::Result<String> {
    let c = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        c.post(format!("{admin}/admin/v1/{path}")).bearer_auth(ADMIN).json(&body).send()
    };
    post("orgs", json!({"id": "bench", "name": "bench"})).await?.error_for_status()?;
    post("orgs/bench/teams", json!({"id": "bench", "name": "bench"})).await?.error_for_status()?;
    let key: serde_json::Value = post(
        "keys",
        json!({"team_id": "bench", "name": "bench", "rpm": 10_000_000, "tpm": 4_000_000_000u64,
               "max_concurrent": 100_000, "budget_micros": 1_000_000_000_000i64, "budget_period": "total"}),
    )
    .await?
    .error_for_status()?
    .json()
    .await?;
    key["key"].as_str().map(str::to_owned).context("no key in the answer")
}

/// A figure and, when the floor was measured next to it, its ratio to the floor's.
fn beside(v: f64, floor: Option<f64>) -> String {
    match floor.filter(|f| *f > 0.0) {
        Some(f) => format!("{v:.0} ({:.2}×)", v / f),
        None => format!("{v:.0}"),
    }
}

fn render(direct: &Row, rows: &[Row], plan: &Plan) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Mock upstream straight: p50 {:.2} / p99 {:.2} ms at {} RPS; stream TTFB p99 c=1 {:.2} ms, c=16 {:.2} ms.\n\
         Max run: {} connections for {:?}; streams: c=1 × {}, c=16 × {} each, 100 events each. \"Added\" = \
         the target minus the mock straight at the same percentile. CPU covers every process of the target. \
         (× floor): against the floor's max run measured just before that row's.\n",
        direct.p50,
        direct.p99,
        plan.rate,
        direct.ttfb_c1,
        direct.ttfb_c16,
        plan.conns,
        plan.dur,
        plan.streams_c1,
        plan.streams_c16
    );
    let _ = writeln!(
        t,
        "| | max RPS (× floor) | CPU µs/req (× floor) | added p50 / p99 at {} RPS | added TTFB p99 c=1 / c=16 | added TTFT p99 c=16 | event gap p99 | RSS peak: max run / end | billing lag worst / drain after run | errors |",
        plan.rate
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let lag =
            r.billing_lag_ms.map_or("-".to_owned(), |(worst, drain)| format!("{worst:.0} / {drain:.0} ms"));
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} ms | {:.2} ms | {:.0} / {:.0} MB | {} | {} |",
            r.name,
            beside(r.max_rps, r.floor_next_to.map(|f| f.0)),
            beside(r.cpu_us, r.floor_next_to.map(|f| f.1)),
            r.p50 - direct.p50,
            r.p99 - direct.p99,
            r.ttfb_c1 - direct.ttfb_c1,
            r.ttfb_c16 - direct.ttfb_c16,
            r.ttft_c16 - direct.ttft_c16,
            r.gap_p99,
            r.rss_max_run,
            r.rss_peak,
            lag,
            r.at_rate_errors
        );
    }
    t
}
