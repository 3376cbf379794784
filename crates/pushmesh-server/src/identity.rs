//! Identity errors at the edge: a starting node refuses to run when
//! another live node already uses its `node_id`; the metrics of identity
//! and gossip authentication problems. The detection itself is in
//! `pushmesh_cluster::identity`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pushmesh_cluster::Cluster;

use crate::{ServerError, Shared};

/// How long after start a conflict makes this node refuse to run (its
/// startup); later, conflicts are only logged and shown on `GET /cluster`.
pub fn startup_window(gossip_interval: Duration) -> Duration {
    (gossip_interval * 20).max(Duration::from_secs(10))
}

/// Resolves with an error as soon as another live node, started before this
/// one (its epoch not greater), is seen using this node's id during the startup window (the cluster layer is then left);
/// with `Ok(())` once the window is over without conflict, or at once
/// without clustering. Run it beside [`crate::Server::run`] and stop with
/// the error: the binary exits with status 1.
pub async fn refuse_duplicate_identity(st: Arc<Shared>) -> Result<(), ServerError> {
    let (Some(c), Some(settings)) = (st.cluster.clone(), st.config.cluster.as_ref()) else {
        return Ok(());
    };
    let window = startup_window(settings.gossip_interval);
    let watch = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            // The newer node refuses; an older holder is refused by this one.
            let older = c
                .identity_conflicts()
                .into_iter()
                .find(|other| other.epoch <= c.epoch());
            if let Some(conflict) = older {
                return conflict;
            }
        }
    };
    match tokio::time::timeout(window, watch).await {
        Err(_) => Ok(()),
        Ok(conflict) => {
            c.shutdown(Duration::ZERO).await;
            Err(crate::cluster::ClusterStartError::DuplicateIdentity {
                node_id: conflict.node_id,
                gossip_addr: conflict.gossip_addr,
                epoch: conflict.epoch,
            }
            .into())
        }
    }
}

/// The identity lines of `/metrics`.
pub fn render_metrics(c: &Cluster, out: &mut String) {
    let _ = writeln!(out, "# HELP pushmesh_cluster_identity_conflicts Other live nodes gossiping under this node's id.\n# TYPE pushmesh_cluster_identity_conflicts gauge\npushmesh_cluster_identity_conflicts {}", c.identity_conflicts().len());
    let _ = writeln!(out, "# HELP pushmesh_gossip_auth_failures_total Gossip datagrams that failed authentication (wrong cluster secret or tampered; also in rejected).\n# TYPE pushmesh_gossip_auth_failures_total counter\npushmesh_gossip_auth_failures_total {}", c.gossip_stats().auth_failed.load(Ordering::Relaxed));
}
