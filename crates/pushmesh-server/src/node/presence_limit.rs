//! The counters of the cluster-wide presence limit
//! (`pushmesh_core::router::presence_limit`), summed over the shards.

use std::fmt::Write as _;

use pushmesh_core::router::PresenceLimitStats;

use super::Node;
use crate::metrics::family;

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

/// The presence limit lines of `/metrics` (asks every shard).
pub async fn render_metrics(node: &Node, out: &mut String) {
    let s = node.presence_limit_stats().await;
    family(
        out,
        "pushmesh_presence_claims_total",
        "counter",
        "Presence joins of new members and the channel owner's decisions: claims sent to owners, claims granted and refused as owner, joins decided locally (owner silent for 1 s or gone).",
    );
    for (o, v) in [
        ("sent", s.claims),
        ("granted", s.granted),
        ("refused", s.refused),
        ("local_decision", s.local_decisions),
    ] {
        let _ = writeln!(out, "pushmesh_presence_claims_total{{outcome=\"{o}\"}} {v}");
    }
}
