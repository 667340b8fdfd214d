//! Metric handles resolved once per label set. `metrics::counter!(name, labels)` builds the key, hashes
//! it and looks it up in the recorder's registry on every call: with a handful of labels that cost more
//! per request than the rest of the request's metrics. A [`HandleCache`] keeps the handles (or a struct
//! of handles) of each label set a process has seen, found again by the label values without allocating.
//!
//! Label values must come from a bounded set (configured names, status codes); past [`HandleCache::new`]'s
//! limit, handles are resolved each time instead of kept.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, PoisonError, RwLock};

/// Label values and their handles, by the values' hash.
type Buckets<V> = HashMap<u64, Vec<(Box<[Box<str>]>, Arc<V>)>>;

/// Handles of type `V` by label values.
pub struct HandleCache<V> {
    kept: RwLock<Buckets<V>>,
    len: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl<V> HandleCache<V> {
    /// A cache of at most `max` label sets.
    pub fn new(max: usize) -> Self {
        Self { kept: RwLock::default(), len: std::sync::atomic::AtomicUsize::new(0), max }
    }

    /// The handles of `values`, made by `make` the first time they are seen.
    pub fn get(&self, values: &[&str], make: impl FnOnce() -> V) -> Arc<V> {
        let hash = hash_of(values);
        let same = |(k, _): &&(Box<[Box<str>]>, Arc<V>)| {
            k.len() == values.len() && k.iter().zip(values).all(|(a, b)| **a == **b)
        };
        if let Some((_, v)) = self
            .kept
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hash)
            .and_then(|b| b.iter().find(same))
        {
            return v.clone();
        }
        let made = Arc::new(make());
        if self.len.load(std::sync::atomic::Ordering::Relaxed) >= self.max {
            return made;
        }
        let mut kept = self.kept.write().unwrap_or_else(PoisonError::into_inner);
        let bucket = kept.entry(hash).or_default();
        if let Some((_, v)) = bucket.iter().find(same) {
            return v.clone();
        }
        bucket.push((values.iter().map(|v| Box::<str>::from(*v)).collect(), made.clone()));
        self.len.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        made
    }
}

/// Labels `names` = `values`, pairwise.
pub fn labels(names: &[&'static str], values: &[&str]) -> Vec<metrics::Label> {
    names.iter().zip(values).map(|(k, v)| metrics::Label::new(*k, (*v).to_owned())).collect()
}

impl HandleCache<metrics::Counter> {
    /// The counter `name` with labels `names` = `values`.
    pub fn counter(
        &self,
        name: &'static str,
        names: &[&'static str],
        values: &[&str],
    ) -> Arc<metrics::Counter> {
        self.get(values, || metrics::counter!(name, labels(names, values)))
    }
}

impl HandleCache<metrics::Histogram> {
    /// The histogram `name` with labels `names` = `values`.
    pub fn histogram(
        &self,
        name: &'static str,
        names: &[&'static str],
        values: &[&str],
    ) -> Arc<metrics::Histogram> {
        self.get(values, || metrics::histogram!(name, labels(names, values)))
    }
}

/// `n` in decimal, written into `buf` (a status code as a label value, without allocating).
pub fn decimal(buf: &mut [u8; 10], mut n: u32) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

fn hash_of(values: &[&str]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    values.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn each_label_set_is_made_once_and_found_again() {
        let cache = HandleCache::new(10);
        let made = AtomicUsize::new(0);
        let make = |n: usize| {
            made.fetch_add(1, Ordering::Relaxed);
            n
        };
        assert_eq!(*cache.get(&["a", "b"], || make(1)), 1);
        assert_eq!(*cache.get(&["a", "b"], || make(2)), 1);
        // Same characters, other split: another label set.
        assert_eq!(*cache.get(&["ab", ""], || make(3)), 3);
        assert_eq!(*cache.get(&["a"], || make(4)), 4);
        assert_eq!(made.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn decimals_are_written_without_allocating() {
        let mut buf = [0; 10];
        for n in [0, 7, 200, 404, 503, 4_294_967_295] {
            assert_eq!(decimal(&mut buf, n), n.to_string());
        }
    }

    #[test]
    fn past_the_limit_handles_are_made_each_time() {
        let cache = HandleCache::new(1);
        assert_eq!(*cache.get(&["x"], || 1), 1);
        assert_eq!(*cache.get(&["y"], || 2), 2);
        assert_eq!(*cache.get(&["y"], || 3), 3, "not kept");
        assert_eq!(*cache.get(&["x"], || 4), 1, "the first stays");
    }
}
