//! Hostile clients against an embedded relay (demo upstream, so any 5xx is the relay's own): a fuzzer's
//! worth of malformed requests, a client that sends its headers one line at a time, and a flood of
//! bogus keys while a real key keeps working.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client;
use crate::harness::{KEY, RelayProc, auth_section, temp_dir};

async fn embedded(tag: &str, edge: &str) -> RelayProc {
    let dir = temp_dir(tag);
    let config = format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n[edge]\n{edge}\n{}\
         [[adapter.providers]]\nname = \"demo\"\nkind = \"demo\"\n\
         [[routing.models]]\nname = \"demo\"\ndeployments = [{{ provider = \"demo\", model = \"relay-demo-1\" }}]\n",
        dir.join("relay.db").display(),
        auth_section(),
    );
    RelayProc::start(&dir, "relay", &config).await
}

#[tokio::test]
async fn malformed_requests_get_client_errors_and_the_relay_stays_up() {
    let relay = embedded("fuzz", "header_read_timeout_ms = 2000\nbody_read_timeout_ms = 2000").await;
    let report = relay_test_support::fuzz::run(&relay.http(), KEY, "demo", 3_000, 8, 0x5eed).await;
    let rss = relay.pid().and_then(relay_test_support::fuzz::peak_rss_kib).unwrap_or(0);
    eprintln!("fuzz: {report}; relay peak RSS {} MiB", rss / 1024);
    assert_eq!(report.findings(), 0, "{report}: {:#?}", report.samples);
    assert!(report.by_class[2] > 100 && report.by_class[4] > 1000, "the run exercised both: {report}");
    let c = client::http();
    let a = client::chat(&c, &relay.http(), client::user("demo", "still here")).await;
    assert_eq!(a.status, 200, "the relay serves normally after the fuzz");
    assert!(!relay.log().contains("panicked"), "a handler panicked:\n{}", relay.log());
}

#[tokio::test]
async fn a_client_sending_headers_slowly_is_cut_off() {
    let relay = embedded("slowloris", "header_read_timeout_ms = 500").await;
    let addr = relay.http().trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let began = Instant::now();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: relay\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            n = slow.read(&mut buf) => {
                let n = n.unwrap_or(0);
                assert!(n == 0 || buf[..n].starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&buf[..n]));
                break;
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if slow.write_all(b"x-one-more-line: 1\r\n").await.is_err() { break; }
            }
        }
        assert!(began.elapsed() < Duration::from_secs(5), "never cut off");
    }
    assert!(began.elapsed() < Duration::from_secs(2), "cut off after {:?}", began.elapsed());
    // A connection that sends nothing at all is closed too.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "a silent connection stays open: {n:?}");
}

#[tokio::test]
async fn a_bogus_key_flood_is_refused_cheaply_while_real_keys_work() {
    // The failure delay is the default 150 ms in production; short here so 4,000 requests finish fast.
    let relay = embedded("flood", "auth_failures_per_minute = 20\nauth_failure_delay_ms = 5").await;
    let c = client::http();
    let base = relay.http();
    let flood = {
        let (c, base) = (c.clone(), base.clone());
        tokio::spawn(async move {
            let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
            let tasks: Vec<_> = (0..16)
                .map(|w| {
                    let (c, base) = (c.clone(), base.clone());
                    tokio::spawn(async move {
                        let mut seen = Vec::new();
                        for i in 0..250 {
                            let r = c
                                .get(format!("{base}/v1/models"))
                                .bearer_auth(format!("rk_bogus{w}x{i}_secret{i}"))
                                .send()
                                .await
                                .unwrap();
                            seen.push(r.status().as_u16());
                        }
                        seen
                    })
                })
                .collect();
            for t in tasks {
                for s in t.await.unwrap() {
                    *statuses.entry(s).or_default() += 1;
                }
            }
            statuses
        })
    };
    for i in 0..20 {
        let a = client::chat(&c, &base, client::user("demo", &format!("real {i}"))).await;
        assert_eq!(a.status, 200, "a valid key is served during the flood");
    }
    let statuses = flood.await.unwrap();
    assert_eq!(statuses.values().sum::<u64>(), 4_000);
    assert!(statuses.keys().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 3_900,
        "past 20 failures the address is throttled: {statuses:?}"
    );
}
