//! Chaos: 10,000 requests (whole, streamed, some abandoned) through an edge, a backend process (auth,
//! routing, adapter over gRPC) and billing, on a private NATS JetStream and Postgres, while billing is
//! SIGKILLed and restarted, NATS is SIGKILLed and restarted, and the edge is SIGTERMed during the NATS
//! outage (a rolling update) and started again. Afterwards `reconcile` finds every answered request booked
//! exactly once, and the tokens of every completed request equal what the mock upstream reported.
//! Needs DATABASE_URL and a `nats-server` binary on PATH. `CHAOS_REQUESTS` scales it (default 10,000).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use relay_db::{Col, Db};
use serde_json::json;

use crate::client::{mock_usage, user};
use crate::harness::{KEY, RelayProc, auth_section, temp_dir};
use crate::upstream_sections;

/// A private nats-server on a fixed port, so it can be killed and started again at the same address.
struct Nats {
    child: Option<std::process::Child>,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    fn start(dir: &Path) -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let mut n = Self { child: None, port, dir: dir.join("nats") };
        n.spawn().then_some(n)
    }

    fn spawn(&mut self) -> bool {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else { return false };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Whole,
    Stream,
    Abandoned,
}

fn kind_of(i: usize) -> Kind {
    match i % 20 {
        0 => Kind::Abandoned,
        1..=6 => Kind::Stream,
        _ => Kind::Whole,
    }
}

/// Sends request `i` once; `None` when the edge could not be reached (it is restarting): send it again.
async fn send(c: &reqwest::Client, edge: &str, i: usize) -> Option<(String, Kind, String)> {
    let kind = kind_of(i);
    let text = format!("chaos {i} {}", "w ".repeat(i % 7 + 1).trim_end());
    let mut body = user("mock", &text);
    if kind != Kind::Whole {
        body["stream"] = json!(true);
    }
    let mut r =
        c.post(format!("{edge}/v1/chat/completions")).bearer_auth(KEY).json(&body).send().await.ok()?;
    assert_eq!(r.status(), 200, "request {i}");
    let id = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    match kind {
        Kind::Abandoned => {
            let _ = r.chunk().await;
        }
        _ => while let Ok(Some(_)) = r.chunk().await {},
    }
    Some((id, kind, text))
}

#[tokio::test]
async fn ten_thousand_requests_through_kills_and_a_rolling_restart_are_booked_once() {
    let Some(pg) = relay_test_support::env_service("DATABASE_URL") else {
        return;
    };
    let dir = temp_dir("chaos");
    let Some(mut nats) = Nats::start(&dir) else {
        assert!(std::env::var("REQUIRE_SERVICES").as_deref() != Ok("1"), "nats-server not on PATH");
        eprintln!("SKIP: nats-server not on PATH");
        return;
    };
    let total: usize = std::env::var("CHAOS_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let mock = relay_test_support::MockOpenAi::start().await;
    let db_url = relay_test_support::fresh_postgres_url(&pg).await;
    let shared = format!(
        "[bus]\nnats_url = \"{}\"\noutbox_fsync = false\n[bus.jetstream]\nretry_delay_ms = 100\nack_wait_secs = 3\n\
         [database]\nurl = \"{db_url}\"\n[telemetry]\nlog_filter = \"warn\"\n",
        nats.url()
    );
    let backend_cfg = |services: &str, extra: &str| {
        format!(
            "[server]\nservice_token = \"relay-test-service-token\"\nservices = [{services}]\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{shared}{extra}"
        )
    };
    let billing = RelayProc::start(&dir, "billing", &backend_cfg("\"billing\"", "")).await;
    let extra = format!("{}{}", auth_section(), upstream_sections(&mock));
    let backend =
        RelayProc::start(&dir, "backend", &backend_cfg("\"auth\", \"routing\", \"adapter\"", &extra)).await;
    let edge_cfg = format!(
        "[server]\nservice_token = \"relay-test-service-token\"\nservices = [\"edge\"]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         shutdown_grace_secs = 5\n[remote]\nauth = \"{g}\"\nrouting = \"{g}\"\nadapter = \"{g}\"\n{shared}",
        g = backend.grpc()
    );
    let edge = RelayProc::start(&dir, "edge", &edge_cfg).await;

    let url = Arc::new(RwLock::new(edge.http()));
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let sent: Arc<Mutex<Vec<(String, Kind, String)>>> = Arc::default();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (c, url, next, answered, sent) =
            (c.clone(), url.clone(), next.clone(), answered.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    return;
                }
                loop {
                    let edge = url.read().unwrap().clone();
                    if let Some(done) = send(&c, &edge, i).await {
                        sent.lock().unwrap().push(done);
                        answered.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let at = |fraction: f64| (total as f64 * fraction) as usize;
    let wait_until = |n: usize| {
        let answered = answered.clone();
        async move {
            while answered.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    // Billing crashes and comes back.
    wait_until(at(0.15)).await;
    let billing_cfg = billing.kill().await;
    wait_until(at(0.30)).await;
    let billing = RelayProc::restart(billing_cfg, "billing-2").await;
    // NATS crashes; during the outage the edge is rolled: SIGTERM must end it within its grace.
    wait_until(at(0.40)).await;
    nats.kill();
    wait_until(at(0.45)).await;
    let t = Instant::now();
    edge.stop().await;
    let exit = t.elapsed();
    assert!(exit < Duration::from_secs(12), "edge took {exit:?} to exit during a NATS outage");
    let edge = RelayProc::restart(dir.join("edge.toml"), "edge-2").await;
    *url.write().unwrap() = edge.http();
    wait_until(at(0.60)).await;
    assert!(nats.spawn(), "nats-server restart");
    for w in workers {
        w.await.unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), total);

    // Everything answered reaches the books, exactly once.
    let db = Db::connect(&db_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = db.fetch("SELECT COUNT(*) FROM usage_records", &[], &[Col::I64]).await.unwrap();
        let n = rows[0][0].i64() as usize;
        if n >= total {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} of {total} requests booked");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let report = relay_billing::reconcile::check(&db).await.unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!((report.records as usize, report.transactions as usize), (total, total), "{report}");
    let rows = db
        .fetch(
            "SELECT request_id, input_tokens, output_tokens, outcome FROM usage_records",
            &[],
            &[Col::Text, Col::I64, Col::I64, Col::Text],
        )
        .await
        .unwrap();
    let booked: BTreeMap<String, (i64, i64, String)> = rows
        .into_iter()
        .map(|r| (r[0].text().to_owned(), (r[1].i64(), r[2].i64(), r[3].text().to_owned())))
        .collect();
    let ids: BTreeSet<&String> = sent.iter().map(|(id, _, _)| id).collect();
    assert_eq!(ids.len(), total, "every answer has its own billing id");
    assert!(ids.iter().all(|id| booked.contains_key(*id)), "an answered request is not booked");
    // Completed requests: exactly the mock's usage, summed and one by one.
    let (mut want, mut got) = ((0i64, 0i64), (0i64, 0i64));
    for (id, kind, text) in &sent {
        let (input, output, outcome) = &booked[id];
        if *kind == Kind::Abandoned {
            assert!(*input > 0, "abandoned {id} billed no input");
            continue;
        }
        let (p, cmp) = mock_usage(text);
        assert_eq!((*input, *output, outcome.as_str()), (p as i64, cmp as i64, "success"), "{id}: {text}");
        want = (want.0 + p as i64, want.1 + cmp as i64);
        got = (got.0 + input, got.1 + output);
    }
    assert_eq!(got, want);
    eprintln!("chaos: {total} requests booked once; {report}");

    edge.stop().await;
    billing.stop().await;
    backend.stop().await;
}
