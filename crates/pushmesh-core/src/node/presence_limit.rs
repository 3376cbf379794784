//! [`Core`]'s view of the cluster-wide presence limit (`router/presence_limit.rs`).

use super::Core;
use crate::router::PresenceLimitStats;

impl Core {
    /// Counters of the cluster-wide presence limit, every shard together.
    pub fn presence_limit_stats(&self) -> PresenceLimitStats {
        let mut t = PresenceLimitStats::default();
        for s in &self.shards {
            let x = s.shard().presence_limit_stats();
            t.claims += x.claims;
            t.granted += x.granted;
            t.refused += x.refused;
            t.local_decisions += x.local_decisions;
        }
        t
    }
}
