//! Apps' counters: this node's (one walk over the connections, one
//! question to each shard) and the cluster's (asked of every linked peer
//! with `PeerFrame::AppStatsAsk`, summed over those that answer within
//! [`STATS_WAIT`]). The admin API asks for one app, the status page for
//! every app.

use std::sync::atomic::Ordering;

use pushmesh_core::app_registry::AppStats;
use pushmesh_core::{FrameKind, NodeId, PeerFrame};
use tokio::sync::oneshot;

use crate::Shared;

/// How long a node waits for a peer's counters.
pub const STATS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// One node's counters by app id.
pub type NodeStats = Vec<(String, AppStats)>;

/// This node's counters: of app `only` (one entry, zeros if this node does
/// not serve it), or of every app it serves.
pub async fn local(st: &Shared, only: Option<&str>) -> NodeStats {
    let apps = st.node.apps();
    let wanted: Vec<_> = match only {
        Some(id) => match apps.by_id(id) {
            Some(i) => vec![(i, id.to_owned())],
            None => return vec![(id.to_owned(), AppStats::default())],
        },
        None => apps.iter().map(|(i, a)| (i, a.id.clone())).collect(),
    };
    let occupancy = st.node.occupancy().await;
    let traffic = st.node.registry.traffic();
    wanted
        .into_iter()
        .map(|(i, id)| {
            let slot = i.0 as usize;
            let (channels, subscriptions) = occupancy.get(slot).copied().unwrap_or_default();
            let t = traffic.get(slot).copied().unwrap_or_default();
            let stats = AppStats {
                connections: t.connections,
                channels,
                subscriptions,
                messages_published: st.apps.published(i),
                messages_delivered: t.queued,
                bytes_sent: t.bytes,
                webhooks_sent: st.webhooks.app_sent(i),
            };
            (id, stats)
        })
        .collect()
}

/// The counters of this node (`local`) and of every linked peer that
/// answered within [`STATS_WAIT`] (`peers`).
pub struct ClusterStats {
    /// This node's.
    pub local: NodeStats,
    /// Each answering peer's (apps with only zero counters left out when
    /// every app was asked for).
    pub peers: Vec<(NodeId, NodeStats)>,
}

impl ClusterStats {
    /// App `id`'s counters summed over the nodes that answered.
    pub fn sum(&self, id: &str) -> AppStats {
        let mut total = AppStats::default();
        for stats in std::iter::once(&self.local).chain(self.peers.iter().map(|p| &p.1)) {
            for (_, s) in stats.iter().filter(|(i, _)| i == id) {
                total.add(s);
            }
        }
        total
    }

    /// Nodes that answered, this one included.
    pub fn nodes(&self) -> usize {
        1 + self.peers.len()
    }
}

/// Asks every linked peer for its counters (of app `only`, or of every
/// app) and waits at most [`STATS_WAIT`] for the answers.
pub async fn cluster(st: &Shared, only: Option<&str>) -> ClusterStats {
    let local = local(st, only).await;
    let mut peers = Vec::new();
    let Some(c) = &st.cluster else {
        return ClusterStats { local, peers };
    };
    let mut waits = Vec::new();
    for p in c.linked_peers() {
        let ask = st.apps.next_ask.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        crate::node::lock(&st.apps.asks).insert(ask, tx);
        let frame = PeerFrame::AppStatsAsk {
            ask,
            app: only.map(str::to_owned),
        };
        c.send(&p, FrameKind::Control, frame.encode());
        waits.push((p, ask, rx));
    }
    let deadline = tokio::time::Instant::now() + STATS_WAIT;
    for (peer, ask, rx) in waits {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(s)) => peers.push((peer, s)),
            _ => {
                crate::node::lock(&st.apps.asks).remove(&ask);
            }
        }
    }
    ClusterStats { local, peers }
}

/// A peer's question (answered) or answer (handed to the asker).
pub async fn peer_frame(st: &Shared, from: &NodeId, frame: PeerFrame) {
    match frame {
        PeerFrame::AppStatsAsk { ask, app } => {
            let mut apps = local(st, app.as_deref()).await;
            if app.is_none() {
                apps.retain(|(_, s)| *s != AppStats::default());
            }
            if let Some(c) = &st.cluster {
                c.send(
                    from,
                    FrameKind::Control,
                    PeerFrame::AppStatsReply { ask, apps }.encode(),
                );
            }
        }
        PeerFrame::AppStatsReply { ask, apps } => {
            if let Some(tx) = crate::node::lock(&st.apps.asks).remove(&ask) {
                let _ = tx.send(apps);
            }
        }
        _ => {}
    }
}
