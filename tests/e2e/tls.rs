//! HTTPS: the edge serves TLS from PEM files and picks up a renewed certificate without a restart; upstream
//! certificates are verified, and a private CA is trusted only where `ca_bundle` names it.

use std::time::Duration;

use relay_test_support::tls::{TestCa, tls_proxy};

use crate::client::user;
use crate::harness::{KEY, RelayProc, auth_section, temp_dir};

fn https_client(ca_pem: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .tls_info(true)
        // A new connection per request, so each one shows the certificate served at that moment.
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The certificate the server presented on this response's connection.
fn peer_certificate(r: &reqwest::Response) -> Vec<u8> {
    r.extensions().get::<reqwest::tls::TlsInfo>().and_then(|t| t.peer_certificate()).unwrap().to_vec()
}

#[tokio::test]
async fn edge_serves_https_swaps_certificates_live_and_verifies_upstreams() {
    let mock = relay_test_support::MockOpenAi::start().await;
    let dir = temp_dir("tls");
    // The edge's certificate, from one CA; the upstream's, from another (a private CA of the provider's).
    let edge_ca = TestCa::new("Relay edge test CA");
    let first = edge_ca.issue("edge-first");
    let (cert_file, key_file) = first.write(&dir);
    let upstream_ca = TestCa::new("Private upstream CA");
    let target = mock.base_url.trim_start_matches("http://").trim_end_matches("/v1").to_owned();
    let upstream = tls_proxy(&upstream_ca.issue("upstream"), target).await;
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, upstream_ca.pem()).unwrap();

    let config = format!(
        r#"[server]
http_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[server.tls]
cert_file = "{cert}"
key_file = "{key}"
reload_secs = 1
[database]
url = "sqlite://{db}"
{auth}
[[adapter.providers]]
name = "private"
kind = "openai"
base_url = "https://localhost:{port}/v1"
api_key = "mock-upstream-key"
ca_bundle = "{ca}"

[[adapter.providers]]
name = "unverified"
kind = "openai"
base_url = "https://localhost:{port}/v1"
api_key = "mock-upstream-key"

[[routing.models]]
name = "private"
deployments = [{{ provider = "private", model = "gpt-mock-upstream" }}]

[[routing.models]]
name = "unverified"
deployments = [{{ provider = "unverified", model = "gpt-mock-upstream" }}]
"#,
        cert = cert_file.display(),
        key = key_file.display(),
        db = dir.join("relay.db").display(),
        auth = auth_section(),
        port = upstream.port(),
        ca = ca_file.display(),
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let port = relay.bound["http"].as_str().unwrap().rsplit(':').next().unwrap().to_owned();
    let base = format!("https://localhost:{port}");
    let c = https_client(&edge_ca.pem());

    // HTTPS end to end: client → edge (TLS) → upstream behind its private CA (TLS, verified with the bundle).
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&user("private", "over tls"))
        .send();
    let r = r.await.unwrap();
    assert_eq!(peer_certificate(&r), first.der, "the configured certificate is served");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], relay_test_support::echo("over tls"));

    // Verification is on: the same upstream without the bundle is refused, and never receives the request.
    let before = mock.chat_requests();
    let r =
        c.post(format!("{base}/v1/chat/completions")).bearer_auth(KEY).json(&user("unverified", "x")).send();
    let r = r.await.unwrap();
    assert!(r.status().is_server_error(), "an unverifiable upstream must fail, got {}", r.status());
    assert_eq!(mock.chat_requests(), before, "nothing was sent over the unverified connection");

    // Plain HTTP on the HTTPS port gets no answer.
    let plain = crate::client::http().get(format!("http://127.0.0.1:{port}/v1/models")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() == 400, "plain HTTP must not be served");

    // Renewal: the files are replaced; new connections get the new certificate, with no restart.
    let second = edge_ca.issue("edge-renewed");
    assert_ne!(first.der, second.der);
    second.write(&dir);
    let began = std::time::Instant::now();
    loop {
        let r = c.get(format!("{base}/v1/models")).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if peer_certificate(&r) == second.der {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(15), "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A broken replacement keeps the good certificate in service.
    std::fs::write(&cert_file, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = c.get(format!("{base}/v1/models")).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(peer_certificate(&r), second.der);
    assert!(relay.log().contains("TLS certificate not reloaded"), "the failed reload is logged");
    relay.stop().await;
}
