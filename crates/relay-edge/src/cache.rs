//! A small TTL cache for hot-path lookups (keys, routes): a read lock and a hash probe on a hit.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;
use std::time::{Duration, Instant};

pub struct TtlCache<K, V> {
    map: RwLock<HashMap<K, (V, Instant)>>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { map: RwLock::new(HashMap::new()), capacity: capacity.max(1) }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((v, until)) if *until > Instant::now() => Some(v.clone()),
            _ => None,
        }
    }

    /// Drops every entry `keep` refuses.
    pub fn retain(&self, keep: impl Fn(&V) -> bool) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (v, _)| keep(v));
    }

    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity {
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= self.capacity {
                // Still full of live entries: start over rather than grow without bound.
                map.clear();
            }
        }
        map.insert(key, (value, now + ttl));
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
        c.insert(3, "c", Duration::from_secs(60)); // evicts expired 2
        assert_eq!((c.get(&1), c.get(&3)), (Some("a"), Some("c")));
        c.insert(4, "d", Duration::from_secs(60)); // full of live entries: cleared
        assert!(c.map.read().unwrap().len() <= 2);
        assert_eq!(c.get(&4), Some("d"));
    }
}
