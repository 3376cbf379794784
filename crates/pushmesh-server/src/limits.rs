//! Rate limits that protect the node: token buckets per key (client IP,
//! app), bounded in memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// Most keys tracked before idle (full) buckets are pruned.
const MAX_KEYS: usize = 100_000;

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A token bucket per key: `rate` per second, bursts of `burst`.
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter; a `rate` of 0 allows everything.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` has a token at `now`, taking none.
    pub fn has_token(&self, key: &K, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).is_none_or(|b| {
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * self.rate >= 1.0
        })
    }

    /// Takes one token for `key` at `now`; false when none is left.
    pub fn allow(&self, key: &K, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_KEYS && !map.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * self.rate)
            .min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_refills() {
        let l = RateLimiter::new(10.0, 3.0);
        let t0 = Instant::now();
        assert!(l.allow(&1, t0) && l.allow(&1, t0) && l.allow(&1, t0));
        assert!(!l.allow(&1, t0), "burst spent");
        assert!(l.allow(&2, t0), "other keys unaffected");
        assert!(
            l.allow(&1, t0 + Duration::from_millis(100)),
            "one token back after 100 ms at 10/s"
        );
        assert!(!l.allow(&1, t0 + Duration::from_millis(100)));
        let off = RateLimiter::new(0.0, 0.0);
        assert!((0..1000).all(|_| off.allow(&1, t0)));
    }
}
