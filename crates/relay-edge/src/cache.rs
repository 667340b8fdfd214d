//! A bounded TTL cache for hot-path lookups (keys, routes): a read lock and a hash probe on a hit.
//!
//! When full, it evicts by CLOCK (second chance, an approximation of least-recently-used): entries read
//! since the hand last passed are spared once, expired ones go first. A full cache never drops
//! everything at once, so a flood of one-off keys cannot push every live caller back to the database.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Entry<V> {
    value: V,
    until: Instant,
    /// Read since the clock hand last passed it.
    referenced: AtomicBool,
    /// Which ring slot is this entry's (older slots of a re-inserted key are stale).
    seq: u64,
}

struct Inner<K, V> {
    map: HashMap<K, Entry<V>>,
    /// The clock: keys in insertion order, each with the sequence number of its entry at insertion.
    ring: VecDeque<(K, u64)>,
    next_seq: u64,
}

pub struct TtlCache<K, V> {
    inner: RwLock<Inner<K, V>>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        let inner = Inner { map: HashMap::new(), ring: VecDeque::new(), next_seq: 0 };
        Self { inner: RwLock::new(inner), capacity: capacity.max(1) }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        match inner.map.get(key) {
            Some(e) if e.until > Instant::now() => {
                if !e.referenced.load(Ordering::Relaxed) {
                    e.referenced.store(true, Ordering::Relaxed);
                }
                Some(e.value.clone())
            }
            _ => None,
        }
    }

    /// Is `key` here at all, live or expired (not yet evicted)?
    pub fn remembers(&self, key: &K) -> bool {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).map.contains_key(key)
    }

    /// Drops every entry `keep` refuses.
    pub fn retain(&self, keep: impl Fn(&V) -> bool) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.map.retain(|_, e| keep(&e.value));
        inner.compact();
    }

    pub fn clear(&self) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.map.clear();
        inner.ring.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).map.len()
    }

    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = inner.map.get_mut(&key) {
            e.value = value;
            e.until = now + ttl;
            return;
        }
        while inner.map.len() >= self.capacity {
            inner.evict_one(now);
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.ring.push_back((key.clone(), seq));
        inner.map.insert(key, Entry { value, until: now + ttl, referenced: AtomicBool::new(false), seq });
    }
}

impl<K: Eq + Hash + Clone, V> Inner<K, V> {
    /// Moves the clock hand until one entry leaves: a stale slot is skipped, an expired or unread
    /// entry is evicted, a read one is spared once.
    fn evict_one(&mut self, now: Instant) {
        while let Some((key, seq)) = self.ring.pop_front() {
            let Some(e) = self.map.get(&key) else { continue };
            if e.seq != seq {
                continue;
            }
            if e.until > now && e.referenced.swap(false, Ordering::Relaxed) {
                self.ring.push_back((key, seq));
                continue;
            }
            self.map.remove(&key);
            return;
        }
        // The ring lost track of an entry (cannot happen, but never loop): drop an arbitrary one.
        if let Some(k) = self.map.keys().next().cloned() {
            self.map.remove(&k);
        }
    }

    /// Forgets ring slots whose entries are gone, once they outnumber the live ones.
    fn compact(&mut self) {
        if self.ring.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.ring.retain(|(k, seq)| map.get(k).is_some_and(|e| e.seq == *seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_capacity_is_bounded() {
        let c = TtlCache::new(2);
        c.insert(1, "a", Duration::from_secs(60));
        c.insert(2, "b", Duration::from_millis(1));
        c.insert(9, "z", Duration::ZERO);
        assert_eq!(c.get(&1), Some("a"));
        assert_eq!(c.get(&9), None);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.get(&2), None);
        c.insert(3, "c", Duration::from_secs(60)); // evicts the expired 2, spares the read 1
        assert_eq!((c.get(&1), c.get(&3)), (Some("a"), Some("c")));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_flood_of_one_off_keys_does_not_evict_the_callers_in_use() {
        let c = TtlCache::new(100);
        for hot in 0..10 {
            c.insert(hot, hot, Duration::from_secs(60));
        }
        for bogus in 1_000..50_000 {
            for hot in 0..10 {
                if bogus % 50 == 0 {
                    assert_eq!(c.get(&hot), Some(hot), "hot key {hot} evicted at {bogus}");
                }
            }
            c.insert(bogus, bogus, Duration::from_secs(60));
            assert!(c.len() <= 100);
        }
        let inner = c.inner.read().unwrap();
        assert!(inner.ring.len() <= 2 * 100 + 64, "the ring stays bounded: {}", inner.ring.len());
    }

    #[test]
    fn retain_and_reinsert_keep_the_ring_consistent() {
        let c = TtlCache::new(3);
        for k in 0..3 {
            c.insert(k, k, Duration::from_secs(60));
        }
        c.retain(|v| *v != 1);
        c.insert(1, 10, Duration::from_secs(60));
        c.insert(1, 11, Duration::from_secs(60));
        assert_eq!(c.get(&1), Some(11));
        c.insert(4, 4, Duration::from_secs(60));
        c.insert(5, 5, Duration::from_secs(60));
        assert_eq!(c.len(), 3);
        c.clear();
        assert_eq!((c.len(), c.get(&5)), (0, None));
    }
}
