//! The durable outbox in front of the bus: a usage event is never lost to a bus outage, a restart or a
//! crash. `publish` returns once the event is on disk (group commit: one `fdatasync` per batch of
//! whatever arrived meanwhile); a relay task then publishes it to the real sink (JetStream, or the
//! in-process bus) until acknowledged, and only then marks it done. After a crash the log is replayed on
//! start and everything not marked done is published again (consumers are idempotent on request id).
//!
//! On disk: a directory (locked against a second process) of segment files `<first seq>.seg`, each a run
//! of records `[len u32][crc32c u32][kind u8][seq u64][protobuf event]` (kind 1 = event, 2 = done). A torn
//! tail (crash mid-write) fails its checksum and is cut off. A segment is deleted once every event in it
//! is done. In Kubernetes the directory must outlive the pod (a volume), or events wait there until the
//! pod returns.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use prost::Message as _;
use relay_core::contracts::{Result, UsageSink};
use relay_core::pb::events::v1::UsageEvent;
use relay_core::{ErrorCode, RelayError};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

const KIND_EVENT: u8 = 1;
const KIND_DONE: u8 = 2;
const HEADER: usize = 4 + 4;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
/// Start a new segment past this size, so finished ones can be deleted.
const SEGMENT_BYTES: u64 = 16 << 20;
/// How long one publish may take before it counts as failed (the bus is down or stuck).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

enum Cmd {
    Append(Box<UsageEvent>, oneshot::Sender<bool>),
    /// These events were delivered.
    Done(Vec<u64>),
    Stop,
}

/// Events held in memory at most (1-2 KB each); past this (a backlog, a bus outage) the rest wait on disk
/// only and are read back when their turn comes, so memory stays bounded however long it lasts.
const MAX_IN_MEMORY: usize = 2_000;
/// Batches read back from disk at once: each read is a blocking-pool task, and hundreds at once would
/// start hundreds of threads (their stacks and allocator heaps were most of a backlogged relay's memory).
const DISK_READS: usize = 4;
/// Shortest time between two syncs of the log. Under load a sync per batch of one or two events was most
/// of the edge's system time (`fdatasync` costs the same for one event as for a hundred); spacing them
/// bounds syncs to 500 a second, adding at most this much to when an event is handed to the bus (after
/// the response, off the request path) and nothing after a quiet spell.
const SYNC_SPACING: Duration = Duration::from_millis(2);
/// Most events the relay hands the sink in one call (one channel send embedded, one round trip of
/// pipelined publishes on JetStream).
const RELAY_BATCH: usize = 512;

struct Pending {
    seq: u64,
    /// Where its record is on disk (a retry, or an event past [`MAX_IN_MEMORY`], is read back from there).
    at: Location,
    /// The event itself, while it is held in memory.
    event: Option<Box<UsageEvent>>,
}

/// An event record's place on disk: (segment's first seq, byte offset, record length).
type Location = (u64, u64, usize);

/// The producer side: implements [`UsageSink`], so the edge hands events to it like to any bus.
#[derive(Clone)]
pub struct Outbox {
    cmds: std_mpsc::Sender<Cmd>,
    state: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    /// Events on disk and not yet acknowledged by the sink (seq -> enqueue time), for depth and age.
    pending: std::sync::Mutex<BTreeMap<u64, Instant>>,
    /// Pending events whose bodies are held in memory.
    in_memory: std::sync::atomic::AtomicUsize,
    stop: CancellationToken,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    relay: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, replays what a previous run left undelivered, and starts
    /// publishing to `sink`. At most `max_in_flight` publishes wait for their acknowledgement at once.
    pub fn open(
        dir: &Path,
        sink: Arc<dyn UsageSink>,
        max_in_flight: usize,
        fsync: bool,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let lock = File::create(dir.join("LOCK"))?;
        if lock.try_lock().is_err() {
            anyhow::bail!("outbox {} is in use by another process", dir.display());
        }
        let (log, replayed) = Log::open(dir, lock, fsync)?;
        let (cmds, rx) = std_mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let state = Arc::new(Shared {
            dir: dir.to_owned(),
            pending: std::sync::Mutex::new(BTreeMap::new()),
            in_memory: std::sync::atomic::AtomicUsize::new(0),
            stop: CancellationToken::new(),
            writer: std::sync::Mutex::new(None),
            relay: std::sync::Mutex::new(None),
        });
        if !replayed.is_empty() {
            tracing::info!(events = replayed.len(), dir = %dir.display(), "outbox: replaying undelivered usage events");
        }
        for (seq, at) in replayed {
            lock_map(&state.pending).insert(seq, Instant::now());
            let _ = ready_tx.send(Pending { seq, at, event: None });
        }
        let writer_state = state.clone();
        let writer = std::thread::Builder::new()
            .name("usage-outbox".into())
            .spawn(move || log.run(&rx, &ready_tx, &writer_state))?;
        let relay = tokio::spawn(relay(ready_rx, sink, cmds.clone(), state.clone(), max_in_flight.max(1)));
        *lock_map(&state.writer) = Some(writer);
        *lock_map(&state.relay) = Some(relay);
        Ok(Self { cmds, state })
    }

    /// Events on disk not yet acknowledged by the bus.
    pub fn depth(&self) -> usize {
        lock_map(&self.state.pending).len()
    }

    /// Waits up to `grace` for every pending event to be delivered, then stops: what is still undelivered
    /// stays on disk for the next start. Returns the number left behind.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        while self.depth() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.state.stop.cancel();
        let relay = lock_map(&self.state.relay).take();
        if let Some(r) = relay {
            let _ = r.await;
        }
        let _ = self.cmds.send(Cmd::Stop);
        let writer = lock_map(&self.state.writer).take();
        if let Some(w) = writer {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        let left = self.depth();
        if left > 0 {
            tracing::warn!(events = left, "outbox: usage events left on disk for the next start");
        }
        left
    }
}

fn lock_map<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait::async_trait]
impl UsageSink for Outbox {
    /// Returns once the event is on disk (not once it is on the bus).
    async fn publish(&self, event: UsageEvent) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let failed = || RelayError::new(ErrorCode::Unavailable, "usage outbox unavailable");
        self.cmds.send(Cmd::Append(Box::new(event), tx)).map_err(|_| failed())?;
        match rx.await {
            Ok(true) => Ok(()),
            _ => Err(failed()),
        }
    }
}

/// Publishes ready events in batches, at most `max` waiting for their acknowledgement at once; what the
/// sink did not take is offered again (read back from disk) after a backoff, until it does.
async fn relay(
    mut ready: mpsc::UnboundedReceiver<Pending>,
    sink: Arc<dyn UsageSink>,
    cmds: std_mpsc::Sender<Cmd>,
    state: Arc<Shared>,
    max: usize,
) {
    let batch_max = RELAY_BATCH.min(max);
    let permits = Arc::new(Semaphore::new(max));
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<(Vec<Pending>, u32)>();
    let mut tasks = tokio::task::JoinSet::new();
    // Depth and age are reported at least this often, so a stuck outbox shows in its metrics.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut buf = Vec::with_capacity(batch_max);
    loop {
        let (items, attempt) = tokio::select! {
            biased;
            () = state.stop.cancelled() => break,
            Some(r) = retry_rx.recv() => r,
            n = ready.recv_many(&mut buf, batch_max) => {
                if n == 0 {
                    break;
                }
                (std::mem::replace(&mut buf, Vec::with_capacity(batch_max)), 0)
            }
            _ = tick.tick() => {
                report(&state);
                continue;
            }
        };
        let n = u32::try_from(items.len().min(max)).unwrap_or(u32::MAX);
        let Ok(permit) = permits.clone().acquire_many_owned(n).await else { break };
        let (sink, cmds, state, retry_tx) = (sink.clone(), cmds.clone(), state.clone(), retry_tx.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let failed = deliver(items, sink.as_ref(), &cmds, &state).await;
            if failed.is_empty() {
                return;
            }
            metrics::counter!("relay_outbox_publish_failures_total").increment(failed.len() as u64);
            if attempt % 10 == 0 {
                tracing::warn!(
                    events = failed.len(),
                    attempt,
                    "outbox: usage events not delivered yet; retrying"
                );
            }
            // Back off (the bus is likely down); the events stay on disk meanwhile.
            let delay =
                crate::retry_delay(Duration::from_millis(200), attempt + 1).min(Duration::from_secs(5));
            tokio::select! {
                () = tokio::time::sleep(delay) => { let _ = retry_tx.send((failed, attempt + 1)); }
                () = state.stop.cancelled() => {}
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Publishes one batch; marks what the sink took done and returns the rest (bodies dropped: a retry reads
/// them back from disk, so a long outage holds no memory).
async fn deliver(
    items: Vec<Pending>,
    sink: &dyn UsageSink,
    cmds: &std_mpsc::Sender<Cmd>,
    state: &Shared,
) -> Vec<Pending> {
    let held = items.iter().filter(|p| p.event.is_some()).count();
    let on_disk: Vec<Location> = items.iter().filter(|p| p.event.is_none()).map(|p| p.at).collect();
    let mut loaded =
        if on_disk.is_empty() { Vec::new() } else { load(&state.dir, on_disk).await }.into_iter();
    let (mut events, mut sent, mut done) = (Vec::with_capacity(items.len()), Vec::new(), Vec::new());
    for p in items {
        let event = match p.event {
            Some(e) => Some(*e),
            None => loaded.next().flatten(),
        };
        match event {
            Some(e) => {
                events.push(e);
                sent.push(Pending { seq: p.seq, at: p.at, event: None });
            }
            None => {
                // Unreadable after it was written: nothing can deliver it. Counted, never silent.
                metrics::counter!("relay_edge_usage_lost_total").increment(1);
                tracing::error!(seq = p.seq, "outbox: usage event unreadable on disk; lost");
                done.push(p.seq);
            }
        }
    }
    state.in_memory.fetch_sub(held, std::sync::atomic::Ordering::Relaxed);
    let n = events.len();
    let verdicts = tokio::time::timeout(PUBLISH_TIMEOUT, sink.publish_batch(events))
        .await
        .unwrap_or_else(|_| vec![false; n]);
    let mut failed = Vec::new();
    let mut verdicts = verdicts.into_iter();
    let published_before = done.len();
    for p in sent {
        if verdicts.next().unwrap_or(false) {
            done.push(p.seq);
        } else {
            failed.push(p);
        }
    }
    metrics::counter!("relay_outbox_published_total").increment((done.len() - published_before) as u64);
    if !done.is_empty() {
        {
            let mut pending = lock_map(&state.pending);
            for seq in &done {
                pending.remove(seq);
            }
        }
        let _ = cmds.send(Cmd::Done(done));
        report(state);
    }
    failed
}

/// Reads event records back from disk, one answer per location in order (`None`: unreadable); each
/// segment file is opened once per call.
async fn load(dir: &Path, at: Vec<Location>) -> Vec<Option<UsageEvent>> {
    static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DISK_READS);
    let n = at.len();
    let Ok(_turn) = READS.acquire().await else { return vec![None; n] };
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt as _;
        let mut open: Option<(u64, Option<File>)> = None;
        at.into_iter()
            .map(|(segment, offset, len)| {
                if open.as_ref().is_none_or(|(s, _)| *s != segment) {
                    open = Some((segment, File::open(dir.join(format!("{segment:020}.seg"))).ok()));
                }
                let file = open.as_ref().and_then(|(_, f)| f.as_ref())?;
                let mut buf = vec![0; len];
                file.read_exact_at(&mut buf, offset).ok()?;
                let (kind, _, payload, _) = read_record(&buf)?;
                (kind == KIND_EVENT).then(|| UsageEvent::decode(payload).ok()).flatten()
            })
            .collect()
    })
    .await
    .unwrap_or_else(|_| vec![None; n])
}

fn report(state: &Shared) {
    let pending = lock_map(&state.pending);
    metrics::gauge!("relay_outbox_pending_events").set(pending.len() as f64);
    let age = pending.values().next().map_or(0.0, |t| t.elapsed().as_secs_f64());
    metrics::gauge!("relay_outbox_oldest_pending_age_seconds").set(age);
}

// === impl Log ===

struct Segment {
    path: PathBuf,
    outstanding: usize,
}

/// The files, owned by the writer thread.
struct Log {
    dir: PathBuf,
    _lock: File,
    fsync: bool,
    active: File,
    active_first: u64,
    active_bytes: u64,
    next_seq: u64,
    segments: BTreeMap<u64, Segment>,
    /// seq -> first seq of its segment, for events not yet done.
    owner: HashMap<u64, u64>,
}

impl Log {
    /// Reads every segment (cutting torn tails), and returns where the events not marked done are:
    /// seq -> (segment, offset, record length).
    fn open(dir: &Path, lock: File, fsync: bool) -> anyhow::Result<(Self, Vec<(u64, Location)>)> {
        let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let first = p.file_stem()?.to_str()?.parse::<u64>().ok()?;
                (p.extension()? == "seg").then_some((first, p))
            })
            .collect();
        files.sort();
        let mut events: BTreeMap<u64, Location> = BTreeMap::new();
        let mut segments = BTreeMap::new();
        let mut next_seq = 1;
        for (first, path) in files {
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            let mut at = 0;
            while let Some((kind, seq, payload, len)) = read_record(&bytes[at..]) {
                let offset = at as u64;
                at += len;
                next_seq = next_seq.max(seq + 1);
                match kind {
                    KIND_EVENT => {
                        if UsageEvent::decode(payload).is_ok() {
                            events.insert(seq, (first, offset, len));
                        }
                    }
                    _ => {
                        events.remove(&seq);
                    }
                }
            }
            if at < bytes.len() {
                tracing::warn!(file = %path.display(), cut = bytes.len() - at, "outbox: torn record at the end cut off");
                OpenOptions::new().write(true).open(&path)?.set_len(at as u64)?;
            }
            segments.insert(first, Segment { path, outstanding: 0 });
        }
        let mut owner = HashMap::new();
        for (seq, (first, _, _)) in &events {
            owner.insert(*seq, *first);
            if let Some(s) = segments.get_mut(first) {
                s.outstanding += 1;
            }
        }
        // Segments with nothing outstanding are finished.
        segments.retain(|_, s| {
            let keep = s.outstanding > 0;
            if !keep {
                let _ = std::fs::remove_file(&s.path);
            }
            keep
        });
        let (active, path) = new_segment(dir, next_seq)?;
        segments.insert(next_seq, Segment { path, outstanding: 0 });
        let log = Self {
            dir: dir.to_owned(),
            _lock: lock,
            fsync,
            active,
            active_first: next_seq,
            active_bytes: 0,
            next_seq,
            segments,
            owner,
        };
        Ok((log, events.into_iter().collect()))
    }

    /// The writer thread: batches whatever is waiting, one write and one sync per batch. Syncs are at
    /// least [`SYNC_SPACING`] apart: an event arriving sooner after the last sync waits for the rest of
    /// that gap and shares the next one with whatever else arrives meanwhile (events after a quiet spell
    /// are written at once).
    fn run(mut self, rx: &std_mpsc::Receiver<Cmd>, ready: &mpsc::UnboundedSender<Pending>, state: &Shared) {
        let mut buf = Vec::with_capacity(64 << 10);
        let mut last_sync: Option<Instant> = None;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let due = last_sync.filter(|_| self.fsync).map(|t| t + SYNC_SPACING);
            while batch.len() < 4096 {
                let next = match due.map(|d| d.saturating_duration_since(Instant::now())) {
                    Some(wait) if !wait.is_zero() && !batch.iter().any(|c| matches!(c, Cmd::Stop)) => {
                        rx.recv_timeout(wait).ok()
                    }
                    _ => rx.try_recv().ok(),
                };
                match next {
                    Some(c) => batch.push(c),
                    None => break,
                }
            }
            let stop = batch.iter().any(|c| matches!(c, Cmd::Stop));
            let (mut appended, mut done) = (Vec::new(), Vec::<u64>::new());
            buf.clear();
            for cmd in batch {
                match cmd {
                    Cmd::Append(ev, ack) => {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        let at = buf.len();
                        encode_record(&mut buf, KIND_EVENT, seq, &ev.encode_to_vec());
                        appended.push((seq, ev, ack, at, buf.len() - at));
                    }
                    Cmd::Done(seqs) => {
                        for seq in seqs {
                            encode_record(&mut buf, KIND_DONE, seq, &[]);
                            done.push(seq);
                        }
                    }
                    Cmd::Stop => {}
                }
            }
            let base = self.active_bytes;
            // Only new events need the sync: a done mark lost to a crash means one more delivery, which
            // consumers drop by request id (half the syncs of a busy relay were for done marks alone).
            let written = self.write(&buf, !appended.is_empty());
            if !appended.is_empty() {
                last_sync = Some(Instant::now());
            }
            if let Err(e) = &written {
                metrics::counter!("relay_outbox_write_errors_total").increment(1);
                tracing::error!(error = %e, "outbox: write failed");
            }
            for (seq, ev, ack, at, len) in appended {
                if written.is_ok() {
                    self.owner.insert(seq, self.active_first);
                    if let Some(s) = self.segments.get_mut(&self.active_first) {
                        s.outstanding += 1;
                    }
                    lock_map(&state.pending).insert(seq, Instant::now());
                    let held = state.in_memory.load(std::sync::atomic::Ordering::Relaxed);
                    let event = (held < MAX_IN_MEMORY).then(|| {
                        state.in_memory.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        ev
                    });
                    let _ =
                        ready.send(Pending { seq, at: (self.active_first, base + at as u64, len), event });
                }
                let _ = ack.send(written.is_ok());
            }
            for seq in done {
                self.finish(seq);
            }
            report(state);
            if written.is_ok() && self.active_bytes > SEGMENT_BYTES {
                self.rotate();
            }
            if stop {
                return;
            }
        }
    }

    fn write(&mut self, buf: &[u8], durable: bool) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.active.write_all(buf)?;
        if self.fsync && durable {
            self.active.sync_data()?;
        }
        self.active_bytes += buf.len() as u64;
        Ok(())
    }

    /// An event was delivered: its segment may now be finished.
    fn finish(&mut self, seq: u64) {
        let Some(first) = self.owner.remove(&seq) else { return };
        let Some(seg) = self.segments.get_mut(&first) else { return };
        seg.outstanding = seg.outstanding.saturating_sub(1);
        if seg.outstanding == 0 && first != self.active_first {
            let _ = std::fs::remove_file(&seg.path);
            self.segments.remove(&first);
        }
    }

    fn rotate(&mut self) {
        match new_segment(&self.dir, self.next_seq) {
            Ok((file, path)) => {
                let old = self.active_first;
                self.active = file;
                self.active_first = self.next_seq;
                self.active_bytes = 0;
                self.segments.insert(self.next_seq, Segment { path, outstanding: 0 });
                if self.segments.get(&old).is_some_and(|s| s.outstanding == 0)
                    && let Some(s) = self.segments.remove(&old)
                {
                    let _ = std::fs::remove_file(&s.path);
                }
            }
            Err(e) => tracing::error!(error = %e, "outbox: cannot start a new segment"),
        }
    }
}

fn new_segment(dir: &Path, first: u64) -> std::io::Result<(File, PathBuf)> {
    let path = dir.join(format!("{first:020}.seg"));
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    Ok((file, path))
}

fn encode_record(buf: &mut Vec<u8>, kind: u8, seq: u64, payload: &[u8]) {
    let len = 1 + 8 + payload.len();
    let start = buf.len();
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(kind);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = CRC.checksum(&buf[start + HEADER..]);
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// One whole, intact record at the start of `b`: (kind, seq, payload, bytes used).
fn read_record(b: &[u8]) -> Option<(u8, u64, &[u8], usize)> {
    let len = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
    let body = b.get(HEADER..HEADER + len)?;
    if len < 9 || CRC.checksum(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body.get(1..9)?.try_into().ok()?);
    Some((body[0], seq, &body[9..], HEADER + len))
}

#[cfg(test)]
mod tests;
