//! The outbox against a flaky sink, restarts, torn files and long outages.
use std::sync::Mutex;

use super::*;

/// A sink that fails while `down` and records what it accepted.
#[derive(Default)]
struct Flaky {
    down: std::sync::atomic::AtomicBool,
    got: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl UsageSink for Flaky {
    async fn publish(&self, e: UsageEvent) -> Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RelayError::new(ErrorCode::Unavailable, "down"));
        }
        self.got.lock().unwrap().push(e.request_id);
        Ok(())
    }
}

fn ev(i: u32) -> UsageEvent {
    UsageEvent { request_id: format!("r{i}"), ..Default::default() }
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relay-outbox-{tag}-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn delivers_after_an_outage_and_survives_a_restart() {
    let d = dir("outage");
    let sink = Arc::new(Flaky::default());
    sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let ob = Outbox::open(&d, sink.clone(), 8, true).unwrap();
    for i in 0..20 {
        ob.publish(ev(i)).await.unwrap();
    }
    assert!(Outbox::open(&d, sink.clone(), 8, true).is_err(), "second process refused");
    // The bus stays down through a shutdown: it returns within the grace, events stay on disk.
    let t = Instant::now();
    assert_eq!(ob.shutdown(Duration::from_millis(300)).await, 20);
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(ob);
    sink.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let ob = Outbox::open(&d, sink.clone(), 8, true).unwrap();
    ob.publish(ev(20)).await.unwrap();
    assert_eq!(ob.shutdown(Duration::from_secs(10)).await, 0);
    let mut got = sink.got.lock().unwrap().clone();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 21);
    drop(ob);
    // Everything delivered: a new start replays nothing, and finished segments are gone.
    let sink2 = Arc::new(Flaky::default());
    let ob = Outbox::open(&d, sink2.clone(), 8, true).unwrap();
    assert_eq!(ob.shutdown(Duration::from_secs(1)).await, 0);
    assert!(sink2.got.lock().unwrap().is_empty());
    let segs = std::fs::read_dir(&d)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
        .count();
    assert_eq!(segs, 1, "only the active segment is left");
}

#[tokio::test]
async fn a_long_outage_keeps_memory_bounded_and_loses_nothing() {
    let d = dir("bounded");
    let sink = Arc::new(Flaky::default());
    sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let ob = Outbox::open(&d, sink.clone(), 64, false).unwrap();
    let n = MAX_IN_MEMORY as u32 + 2_000;
    for i in 0..n {
        ob.publish(ev(i)).await.unwrap();
    }
    assert!(ob.state.in_memory.load(std::sync::atomic::Ordering::SeqCst) <= MAX_IN_MEMORY);
    sink.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(ob.shutdown(Duration::from_secs(60)).await, 0);
    let mut got = sink.got.lock().unwrap().clone();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), n as usize, "the ones kept only on disk were read back and delivered");
}

/// A sink that takes whole batches and refuses every third event the first time it sees it.
#[derive(Default)]
struct Picky {
    refused: Mutex<std::collections::HashSet<String>>,
    got: Mutex<Vec<String>>,
    calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl UsageSink for Picky {
    async fn publish(&self, _: UsageEvent) -> Result<()> {
        panic!("the outbox hands over batches");
    }
    async fn publish_batch(&self, events: Vec<UsageEvent>) -> Vec<bool> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut refused = self.refused.lock().unwrap();
        events
            .into_iter()
            .map(|e| {
                let n: u32 = e.request_id[1..].parse().unwrap();
                if n.is_multiple_of(3) && refused.insert(e.request_id.clone()) {
                    return false;
                }
                self.got.lock().unwrap().push(e.request_id);
                true
            })
            .collect()
    }
}

#[tokio::test]
async fn batches_are_handed_over_whole_and_refused_events_come_back_from_disk() {
    let d = dir("batches");
    let sink = Arc::new(Picky::default());
    let ob = Outbox::open(&d, sink.clone(), 1024, false).unwrap();
    let n = 3_000;
    let publishes: Vec<_> = (0..n).map(|i| ob.publish(ev(i))).collect();
    for p in futures_util::future::join_all(publishes).await {
        p.unwrap();
    }
    assert_eq!(ob.shutdown(Duration::from_secs(30)).await, 0, "everything delivered in the end");
    let mut got = sink.got.lock().unwrap().clone();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), n as usize);
    assert_eq!(sink.refused.lock().unwrap().len(), 1_000, "the refused ones were offered again");
    let calls = sink.calls.load(std::sync::atomic::Ordering::SeqCst);
    assert!(calls < n as usize / 4, "events travel in batches: {calls} sink calls for {n} events");
}

#[test]
fn torn_tails_are_cut_and_intact_records_kept() {
    let mut buf = Vec::new();
    encode_record(&mut buf, KIND_EVENT, 1, &ev(1).encode_to_vec());
    encode_record(&mut buf, KIND_EVENT, 2, &ev(2).encode_to_vec());
    encode_record(&mut buf, KIND_DONE, 1, &[]);
    let whole = buf.len();
    encode_record(&mut buf, KIND_EVENT, 3, &ev(3).encode_to_vec());
    buf.truncate(buf.len() - 3);
    let d = dir("torn");
    std::fs::write(d.join(format!("{:020}.seg", 1)), &buf).unwrap();
    let lock = File::create(d.join("LOCK")).unwrap();
    let (log, replayed) = Log::open(&d, lock, false).unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![2]);
    let (segment, _, _) = replayed[0].1;
    let loaded = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(load(&d, vec![(segment, 0, 5), replayed[0].1, (segment + 7, 0, 9)]));
    let ids: Vec<Option<String>> = loaded.into_iter().map(|e| e.map(|e| e.request_id)).collect();
    assert_eq!(ids, vec![None, Some("r2".into()), None], "read back from its place on disk, in order");
    assert_eq!(log.next_seq, 3);
    assert_eq!(std::fs::metadata(d.join(format!("{:020}.seg", 1))).unwrap().len() as usize, whole);
    let mut flipped = buf[..whole].to_vec();
    flipped[HEADER + 3] ^= 0xff;
    assert!(read_record(&flipped).is_none(), "checksum catches corruption");
}
