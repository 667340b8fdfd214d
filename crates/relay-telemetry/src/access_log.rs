//! The access log: one JSON object per line per request, written by a background thread so the request
//! path never waits on a pipe or a disk. The edge builds each line (see its `observe` module) with every
//! client-supplied string already masked; the writer only formats and ships. When the writer falls behind
//! by [`QUEUE`] lines, new lines are dropped and counted (`relay_access_log_dropped_total`) rather than
//! held in memory.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use serde::Deserialize;

/// Lines waiting for the writer at most.
const QUEUE: usize = 16_384;

/// `[telemetry.access_log]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// One line per request (on by default).
    pub enabled: bool,
    /// `stdout`, `stderr`, or a file path (appended to).
    pub target: String,
    /// Keys (by id) whose prompts and answers are logged too, masked and cut at `max_content_bytes`.
    /// Everyone else's content never reaches the log.
    pub content_keys: Vec<String>,
    /// Longest prompt or answer text kept in a line.
    pub max_content_bytes: usize,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self { enabled: true, target: "stdout".into(), content_keys: Vec::new(), max_content_bytes: 8192 }
    }
}

enum Msg {
    Line(String),
    Flush(SyncSender<()>),
}

struct AccessLog {
    tx: SyncSender<Msg>,
    content_keys: Vec<String>,
    max_content_bytes: usize,
}

static LOG: OnceLock<AccessLog> = OnceLock::new();

/// Starts the writer (once per process; later calls are ignored). Off: [`enabled`] is false and nothing
/// is written.
pub fn install(cfg: &AccessLogConfig) -> anyhow::Result<()> {
    if !cfg.enabled || LOG.get().is_some() {
        return Ok(());
    }
    let out: Box<dyn Write + Send> = match cfg.target.as_str() {
        "stdout" => Box::new(std::io::stdout()),
        "stderr" => Box::new(std::io::stderr()),
        path => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("telemetry.access_log.target `{path}`: {e}"))?,
        ),
    };
    let (tx, rx) = sync_channel(QUEUE);
    std::thread::Builder::new().name("relay-access-log".into()).spawn(move || write_lines(&rx, out))?;
    let _ = LOG.set(AccessLog {
        tx,
        content_keys: cfg.content_keys.clone(),
        max_content_bytes: cfg.max_content_bytes,
    });
    Ok(())
}

/// Is the access log on in this process?
pub fn enabled() -> bool {
    LOG.get().is_some()
}

/// How much of this key's prompts and answers may be logged (`None`: none).
pub fn content_allowance(key_id: &str) -> Option<usize> {
    LOG.get().filter(|l| l.content_keys.iter().any(|k| k == key_id)).map(|l| l.max_content_bytes)
}

/// Queues one line (a JSON object without its newline).
pub fn write(line: String) {
    let Some(log) = LOG.get() else { return };
    match log.tx.try_send(Msg::Line(line)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => metrics::counter!("relay_access_log_dropped_total").increment(1),
        Err(TrySendError::Disconnected(_)) => {}
    }
}

/// Waits (up to `within`) until every line queued so far is written out (at shutdown).
pub fn flush(within: Duration) {
    let Some(log) = LOG.get() else { return };
    let (done, wait) = sync_channel(1);
    if log.tx.send(Msg::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(within);
    }
}

/// How long the writer lets lines gather while they keep coming: one write (and no wake-up of this
/// thread per request) every few milliseconds under load, instead of one per line.
const LINGER: Duration = Duration::from_millis(5);

fn write_lines(rx: &Receiver<Msg>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    // Idle: sleep until a line comes. Busy: write what came, then wait `LINGER` for more.
    while let Ok(msg) = rx.recv() {
        let mut next = Some(msg);
        loop {
            let mut wrote = false;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Line(line) => {
                        let _ = out.write_all(line.as_bytes());
                        let _ = out.write_all(b"\n");
                        wrote = true;
                    }
                    Msg::Flush(done) => {
                        let _ = out.flush();
                        let _ = done.try_send(());
                    }
                }
                next = rx.try_recv().ok();
            }
            let _ = out.flush();
            if !wrote {
                break;
            }
            std::thread::sleep(LINGER);
            match rx.try_recv() {
                Ok(msg) => next = Some(msg),
                Err(_) => break,
            }
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
