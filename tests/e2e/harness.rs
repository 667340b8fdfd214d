//! Starting `relay` processes for tests: a config file per process, port 0 everywhere, and the bound
//! addresses read back from the process's one JSON line on stdout.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const PEPPER: &str = "e2e-pepper-0123456789abcdef";
pub const KEY: &str = "sk-e2e-client-key";

/// `[auth]` section with one key, `KEY`.
pub fn auth_section() -> String {
    let hash = relay_auth::hash_key(&relay_core::Secret::new(PEPPER), KEY);
    format!(
        "[auth]\npepper = \"{PEPPER}\"\n[[auth.keys]]\nid = \"e2e\"\nteam = \"team-e2e\"\norg = \"org-e2e\"\nhash = \"{hash}\"\n"
    )
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-e2e-{tag}-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct RelayProc {
    child: Child,
    config: PathBuf,
    pub bound: Value,
    log: PathBuf,
}

impl RelayProc {
    pub async fn start(dir: &std::path::Path, name: &str, config: &str) -> Self {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        Self::spawn(path, dir.join(format!("{name}.log"))).await
    }

    async fn spawn(config: PathBuf, log: PathBuf) -> Self {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info,h2=warn,hyper=warn,tower=warn")
            // Billing processes store Responses state, sealed under this key.
            .env("RELAY__STATE__ENCRYPTION_KEY", "e2e-state-encryption-key-0123")
            // One outbox per process, the same across restarts of the same config (crash replay).
            .env("RELAY__BUS__OUTBOX_DIR", config.with_extension("outbox"))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn relay");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        let bound = match line {
            Ok(Ok(Some(l))) => serde_json::from_str::<Value>(&l).unwrap()["relay_listening"].clone(),
            other => panic!(
                "relay did not start ({other:?}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        };
        // Keep draining stdout (the access log) so the child never blocks on a full pipe: raw bytes into
        // a sink, not line by line, so a test under load does not spend its CPU splitting log lines.
        tokio::spawn(async move {
            let mut rest = lines.into_inner();
            let _ = tokio::io::copy(&mut rest, &mut tokio::io::sink()).await;
        });
        Self { child, config, bound, log }
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.bound["http"].as_str().expect("no http listener"))
    }

    pub fn grpc(&self) -> String {
        format!("http://{}", self.bound["grpc"].as_str().expect("no grpc listener"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        assert!(
            matches!(status, Ok(Ok(s)) if s.success()),
            "relay did not exit cleanly: {status:?}\n{}",
            self.log()
        );
    }

    /// SIGKILL: a crash, nothing flushed.
    pub async fn kill(mut self) -> PathBuf {
        let _ = self.child.kill().await;
        self.config.clone()
    }

    /// Starts a process again from a config file used before.
    pub async fn restart(config: PathBuf, log_name: &str) -> Self {
        let log = config.with_file_name(format!("{log_name}.log"));
        Self::spawn(config, log).await
    }
}
