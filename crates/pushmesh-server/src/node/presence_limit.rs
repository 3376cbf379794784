//! The counters of the cluster-wide presence limit
//! (`pushmesh_core::router::presence_limit`), summed over the shards.

use pushmesh_core::router::PresenceLimitStats;

use super::Node;

impl Node {
    /// Claims sent to owners, claims granted and refused as owner, joins
    /// decided locally (owner silent for 1 s, or its link down): every shard.
    pub async fn presence_limit_stats(&self) -> PresenceLimitStats {
        let mut t = PresenceLimitStats::default();
        for s in &self.shards {
            if let Some(x) = self.ask(s, |s, _| s.presence_limit_stats()).await {
                t.claims += x.claims;
                t.granted += x.granted;
                t.refused += x.refused;
                t.local_decisions += x.local_decisions;
            }
        }
        t
    }
}
