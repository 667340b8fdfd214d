//! Child processes of the benchmark (the mock, the floor, Relay in each mode) and what `/proc` says
//! about them: CPU time and resident memory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Proc {
    child: Child,
    /// The JSON line the process printed when it was listening.
    pub hello: Value,
}

impl Proc {
    /// Starts `cmd` and waits for its first stdout line (JSON).
    pub async fn start(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let stderr = std::fs::File::create(log)?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        let hello: Value = match line {
            Ok(Ok(Some(l))) => serde_json::from_str(&l).with_context(|| format!("{name} said {l}"))?,
            _ => anyhow::bail!("{name} did not start; see {}", log.display()),
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, hello })
    }

    /// Relay, from a config file.
    pub async fn relay(bin: &Path, name: &str, config: &Path, dir: &Path) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--config"]).arg(config).env("RUST_LOG", "error");
        let p = Self::start(name, cmd, &dir.join(format!("{name}.log"))).await?;
        Ok(p)
    }

    /// `http://addr` of a listener this process reported (`http`, `admin`, `grpc`, or `listening`).
    pub fn url(&self, which: &str) -> String {
        let v = self.hello.get("relay_listening").unwrap_or(&self.hello);
        format!("http://{}", v[which].as_str().unwrap_or_default())
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// CPU time (user + system) a process has used so far.
pub fn cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = clock_ticks();
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz)
}

fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// (current, peak) resident memory in MB.
pub fn rss_mb(pid: u32) -> (f64, f64) {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return (0.0, 0.0) };
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

/// The `relay` binary next to this one (`make bench` builds both in release).
pub fn relay_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RELAY_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("relay")))
        .unwrap_or_else(|| "relay".into())
}
