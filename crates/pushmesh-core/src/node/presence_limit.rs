//! [`Core`]'s view of the cluster-wide presence limit (`router/presence_limit.rs`).

use std::time::Instant;

use super::{CollectSink, Core};
use crate::router::PresenceLimitStats;

impl Core {
    /// Counters of the cluster-wide presence limit, every shard together.
    pub fn presence_limit_stats(&self) -> PresenceLimitStats {
        let mut t = PresenceLimitStats::default();
        for s in &self.shards {
            let x = s.presence_limit_stats();
            t.claims += x.claims;
            t.granted += x.granted;
            t.refused += x.refused;
            t.local_decisions += x.local_decisions;
        }
        t
    }

    /// After a peer change: presence joins parked for an owner that is gone
    /// are decided locally.
    pub(super) fn presence_peers_changed(&mut self, now: Instant) {
        for i in 0..self.shards.len() {
            let mut sink = CollectSink {
                out: &mut self.out,
                sessions: &mut self.sessions,
                deltas: &mut self.deltas,
                gates: &mut self.gates,
                held: &mut self.held,
            };
            self.shards[i].presence_peers_changed(now, &mut sink);
        }
        self.flush_deltas();
    }
}
