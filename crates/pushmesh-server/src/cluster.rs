//! Wiring of the cluster layer to the core: peer events in, peer frames
//! out (through the hub), the interest digest into gossip, and the
//! `/cluster`, `/metrics` and `/readyz` endpoints.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushmesh_cluster::{tls, Cluster, ClusterConfig, ClusterEvent, KEY_INTEREST};
use serde_json::json;
use tokio::sync::mpsc;

use crate::config::ClusterSettings;
use crate::metrics::esc;
use crate::{ServerError, Shared};

pub use crate::identity::refuse_duplicate_identity;

/// Starts the cluster layer for these settings.
pub async fn start(
    c: &ClusterSettings,
    epoch: u64,
) -> Result<(Cluster, mpsc::Receiver<ClusterEvent>), ServerError> {
    let err = |e: String| ServerError::Cluster(e);
    let material = match &c.certs {
        None => tls::derive_from_secret(&c.secret).map_err(|e| err(e.to_string()))?,
        Some((ca, cert, key)) => tls::load(ca, cert, key).map_err(|e| err(e.to_string()))?,
    };
    let cfg = ClusterConfig {
        node_id: c.node_id.clone(),
        cluster_id: c.cluster_id.clone(),
        epoch,
        gossip_listen: c.gossip_listen,
        gossip_advertise: c.gossip_advertise,
        quic_listen: c.cluster_listen,
        quic_advertise: c.cluster_advertise,
        seeds: c.seeds.clone(),
        secret: c.secret.clone(),
        tls: material,
        gossip_interval: c.gossip_interval,
        phi_threshold: c.phi_threshold,
        dead_node_grace: c.dead_node_grace,
        peer_queue: c.peer_queue,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    Cluster::start(cfg).await.map_err(|e| err(e.to_string()))
}

/// The tasks that feed peer events to the core and publish the digest.
pub fn spawn_tasks(st: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(cluster) = st.cluster.clone() else {
        return Vec::new();
    };
    let mut tasks = Vec::new();
    let rx = st
        .cluster_events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(mut rx) = rx {
        let st = st.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let node = &st.node;
                match ev {
                    ClusterEvent::PeerUp { node: peer, epoch } => node.peer_up(peer, epoch).await,
                    ClusterEvent::PeerDown { node: peer } => node.peer_down(&peer).await,
                    ClusterEvent::Frame { from, frame } => {
                        if let Err(e) = node.peer_frame(&from, &frame).await {
                            tracing::warn!(peer = %from, error = %e, "bad frame from peer");
                        }
                    }
                    ClusterEvent::Digest { node: peer, digest } => {
                        node.check_peer_digest(&peer, &digest);
                    }
                }
            }
        }));
    }
    let st = st.clone();
    tasks.push(tokio::spawn(async move {
        let mut last = String::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let digest = st.node.digest();
            if digest != last {
                cluster.set_key(KEY_INTEREST, digest.clone()).await;
                last = digest;
            }
        }
    }));
    tasks
}

/// `GET /cluster`: this node, its peers, their links and counters.
pub async fn cluster_status(State(st): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let Some(c) = &st.cluster else {
        return Json(json!({ "enabled": false, "node": st.config.node_id, "peers": [] }));
    };
    let peers = c.status().await;
    let core_peers: Vec<String> = st.node.peers().iter().map(|p| p.to_string()).collect();
    let presence = st.node.presence_limit_stats().await;
    Json(json!({
        "enabled": true,
        "node": c.node_id().to_string(),
        "draining": st.draining.load(Ordering::Relaxed),
        "peers": peers,
        "synced_peers": core_peers,
        "gossip": {
            "accepted": c.gossip_stats().accepted.load(Ordering::Relaxed),
            "rejected": c.gossip_stats().rejected.load(Ordering::Relaxed),
            "replayed": c.gossip_stats().replayed.load(Ordering::Relaxed),
            "skewed": c.gossip_stats().skewed.load(Ordering::Relaxed),
            "send_failed": c.gossip_stats().send_failed.load(Ordering::Relaxed),
        },
        "links_refused": c.links_refused(),
        "identity_conflicts": c.identity_conflicts(),
        "presence_limit": {
            "claims": presence.claims,
            "granted": presence.granted,
            "refused": presence.refused,
            "local_decisions": presence.local_decisions,
        },
    }))
}

/// `GET /readyz`: 200 when this node should get traffic; 503 while
/// draining, or while a live peer has no link (messages to it would be lost).
pub async fn readyz(State(st): State<Arc<Shared>>) -> Response {
    if st.draining.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "draining" })),
        )
            .into_response();
    }
    if let Some(c) = &st.cluster {
        let missing: Vec<String> = c
            .status()
            .await
            .into_iter()
            .filter(|p| p.live && !p.link && p.state.as_deref() != Some("draining"))
            .map(|p| p.node)
            .collect();
        if !missing.is_empty() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "ready": false, "reason": "peer links down", "peers": missing })),
            )
                .into_response();
        }
    }
    (StatusCode::OK, Json(json!({ "ready": true }))).into_response()
}

/// The cluster section of `/metrics`.
pub fn render_metrics(st: &Shared, out: &mut String) {
    let Some(c) = &st.cluster else { return };
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let counters = c.counters_snapshot();
    let _ = writeln!(out, "# HELP pushmesh_cluster_frames_sent_total Frames sent to a peer.\n# TYPE pushmesh_cluster_frames_sent_total counter");
    for (peer, k) in &counters {
        let p = esc(peer.as_str());
        let _ = writeln!(
            out,
            "pushmesh_cluster_frames_sent_total{{peer=\"{p}\",kind=\"data\"}} {}",
            l(&k.data_sent)
        );
        let _ = writeln!(
            out,
            "pushmesh_cluster_frames_sent_total{{peer=\"{p}\",kind=\"control\"}} {}",
            l(&k.control_sent)
        );
    }
    let _ = writeln!(out, "# HELP pushmesh_cluster_frames_received_total Frames received from a peer.\n# TYPE pushmesh_cluster_frames_received_total counter");
    for (peer, k) in &counters {
        let p = esc(peer.as_str());
        let _ = writeln!(
            out,
            "pushmesh_cluster_frames_received_total{{peer=\"{p}\",kind=\"data\"}} {}",
            l(&k.data_received)
        );
        let _ = writeln!(
            out,
            "pushmesh_cluster_frames_received_total{{peer=\"{p}\",kind=\"control\"}} {}",
            l(&k.control_received)
        );
    }
    let _ = writeln!(out, "# HELP pushmesh_cluster_frames_dropped_total Frames dropped for a peer (queue full or link down).\n# TYPE pushmesh_cluster_frames_dropped_total counter");
    for (peer, k) in &counters {
        let _ = writeln!(
            out,
            "pushmesh_cluster_frames_dropped_total{{peer=\"{}\"}} {}",
            esc(peer.as_str()),
            l(&k.dropped)
        );
    }
    let linked = c.linked_peers();
    let _ = writeln!(out, "# HELP pushmesh_cluster_peer_link_up Whether the QUIC link to a peer is up.\n# TYPE pushmesh_cluster_peer_link_up gauge");
    for (peer, _) in &counters {
        let _ = writeln!(
            out,
            "pushmesh_cluster_peer_link_up{{peer=\"{}\"}} {}",
            esc(peer.as_str()),
            u8::from(linked.contains(peer))
        );
    }
    let g = c.gossip_stats();
    let _ = writeln!(out, "# HELP pushmesh_gossip_packets_rejected_total Gossip datagrams that failed authentication.\n# TYPE pushmesh_gossip_packets_rejected_total counter\npushmesh_gossip_packets_rejected_total {}", l(&g.rejected));
    let _ = writeln!(out, "# HELP pushmesh_gossip_packets_replayed_total Authentic gossip datagrams dropped as replays (also in rejected).\n# TYPE pushmesh_gossip_packets_replayed_total counter\npushmesh_gossip_packets_replayed_total {}", l(&g.replayed));
    let _ = writeln!(out, "# HELP pushmesh_gossip_packets_skewed_total Authentic gossip datagrams dropped for a timestamp too far from this node's clock (also in rejected).\n# TYPE pushmesh_gossip_packets_skewed_total counter\npushmesh_gossip_packets_skewed_total {}", l(&g.skewed));
    let _ = writeln!(out, "# HELP pushmesh_gossip_send_failures_total Gossip envelopes not sent (too large once sealed, send error or timeout).\n# TYPE pushmesh_gossip_send_failures_total counter\npushmesh_gossip_send_failures_total {}", l(&g.send_failed));
    crate::identity::render_metrics(c, out);
    let _ = writeln!(out, "# HELP pushmesh_cluster_links_refused_total Peer links refused (node id not in the peer's certificate, wrong cluster).\n# TYPE pushmesh_cluster_links_refused_total counter\npushmesh_cluster_links_refused_total {}", c.links_refused());
}
