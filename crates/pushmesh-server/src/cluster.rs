//! Wiring of the cluster layer to the core: peer events in, peer frames
//! out (through the hub), the interest digest into gossip, joining, and
//! the `/cluster`, `/metrics` and `/readyz` endpoints.
//!
//! **Joining**: a clustered node takes no publish (503 `joining`) and is
//! not ready until a seed answered and every live peer is linked with its
//! state synced, or `startup_timeout_ms` passed (then it runs alone if no
//! seed answered, and says so).
//!
//! **Readiness** depends on this node's own links only: it is ready unless
//! it reaches (link up, state synced) at most half of the live, ready
//! peers; at exactly half, the side holding the lowest node id stays ready.
//! A broken path between two other nodes never makes it unready; cutting
//! one node off makes that node, and only it, unready.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushmesh_cluster::{
    tls, Cluster, ClusterConfig, ClusterEvent, PeerCounters, PeerStatus, KEY_INTEREST, KEY_STATE,
};
use pushmesh_core::PeerLink;
use pushmesh_protocol::CloseCode;
use serde_json::json;
use tokio::sync::mpsc;

use crate::config::ClusterSettings;
use crate::metrics::{esc, scalar, with_labels};
use crate::{ServerError, Shared};

pub use crate::identity::refuse_duplicate_identity;

/// Why the cluster layer could not start (or this node may not join).
#[derive(Debug, thiserror::Error)]
pub enum ClusterStartError {
    /// The node's certificates could not be derived or loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The cluster's own runtime could not be built.
    #[error("cannot start the cluster runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The start task panicked or was cancelled.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    /// Gossip or the QUIC endpoint could not start.
    #[error(transparent)]
    Start(#[from] pushmesh_cluster::ClusterError),
    /// Another live node, started before this one, uses this node's id.
    #[error(
        "node_id {node_id:?} is already in use by a live node at {gossip_addr} (its epoch {epoch}): \
         refusing to start; give each node its own node_id"
    )]
    DuplicateIdentity {
        /// The id both use.
        node_id: String,
        /// The other node's gossip address.
        gossip_addr: std::net::SocketAddr,
        /// The other node's epoch.
        epoch: u64,
    },
}

/// Starts the cluster layer for these settings.
pub async fn start(
    c: &ClusterSettings,
    epoch: u64,
) -> Result<(Cluster, mpsc::Receiver<ClusterEvent>), ServerError> {
    let material = match &c.certs {
        None => tls::derive_from_secret(&c.secret).map_err(ClusterStartError::from)?,
        Some((ca, cert, key)) => tls::load(ca, cert, key).map_err(ClusterStartError::from)?,
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
    // Gossip and the peer links run on a runtime of their own: a node busy
    // routing (or applying a million-channel sync) must not starve its
    // failure detector's heartbeats, or its peers would declare it dead.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("pushmesh-cluster")
        .enable_all()
        .build()
        .map_err(ClusterStartError::Runtime)?;
    let started = rt.spawn(Cluster::start(cfg));
    // It lives as long as the process.
    std::mem::forget(rt);
    let started = started.await.map_err(ClusterStartError::from)?;
    Ok(started.map_err(ClusterStartError::from)?)
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
        let cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let node = &st.node;
                match ev {
                    ClusterEvent::PeerUp { node: peer, epoch } => {
                        crate::apps::peer_up(&st, &peer);
                        node.peer_up(peer, epoch).await
                    }
                    ClusterEvent::PeerDown { node: peer } => node.link_down(&peer),
                    ClusterEvent::PeerGone { node: peer } => node.peer_gone(&peer).await,
                    ClusterEvent::ContinuityBroken { node: peer } => {
                        // Messages for local subscribers may be lost: they
                        // reconnect and resubscribe rather than miss them silently.
                        tracing::warn!(peer = %peer, "closing every client with 4200: a peer forgot this node, messages for its subscribers may be lost");
                        node.registry.close_all(
                            CloseCode::ReconnectImmediately,
                            "cluster continuity lost, reconnect",
                        );
                    }
                    ClusterEvent::Frame { from, frame } => {
                        let handled = node.peer_frame(&from, &frame).await;
                        // On its shard's queue: a publish taken here may go.
                        cluster.frame_handled();
                        match handled {
                            Ok(Some(admin)) => {
                                // Off this loop: a stats question waits on the shards.
                                let (st, from) = (st.clone(), from.clone());
                                tokio::spawn(async move {
                                    crate::apps::peer_frame(&st, &from, admin).await;
                                });
                            }
                            Ok(None) => {}
                            Err(e) => tracing::warn!(peer = %from, error = %e, "bad frame from peer"),
                        }
                    }
                    ClusterEvent::Digest { node: peer, digest } => {
                        node.check_peer_digest(&peer, &digest);
                    }
                }
            }
        }));
    }
    tasks.push(tokio::spawn(join(st.clone(), cluster.clone())));
    let st2 = st.clone();
    tasks.push(tokio::spawn(async move {
        // The subscription barrier's deadlines.
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            st2.node.links.release_barrier(std::time::Instant::now());
        }
    }));
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
    let copied: Vec<String> = st
        .node
        .peer_links()
        .iter()
        .filter(|l| l.copied)
        .map(|l| l.node.to_string())
        .collect();
    let presence = st.node.presence_limit_stats().await;
    Json(json!({
        "enabled": true,
        "node": c.node_id().to_string(),
        "draining": st.draining.load(Ordering::Relaxed),
        "joined": st.node.gate.joined(),
        "state": if st.draining.load(Ordering::Relaxed) { "draining" } else if st.node.gate.joined() { "ready" } else { "joining" },
        "peers": peers,
        "synced_peers": core_peers,
        "copied_peers": copied,
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

/// Whether a joining node has joined: a seed answered (or it has no seed
/// but itself) and every live peer is linked with its state synced and
/// its copy of cached events and history applied.
fn joined(st: &Shared, peers: &[PeerStatus], links: &[PeerLink]) -> bool {
    let Some(c) = &st.config.cluster else {
        return true;
    };
    let me = c.gossip_advertise.to_string();
    let other_seeds = c.seeds.iter().any(|s| *s != me);
    let live: Vec<&PeerStatus> = peers
        .iter()
        .filter(|p| p.live && p.state.as_deref() != Some("draining"))
        .collect();
    if live.is_empty() {
        return !other_seeds;
    }
    // Reached, and its copy (cached events, history) applied: a client
    // that recovers here right after the node joined finds the history.
    live.iter().all(|p| {
        links
            .iter()
            .any(|l| l.node.as_str() == p.node && l.reached() && l.copied)
    })
}

/// Nodes joined, this one included: live peers linked with their state
/// synced and their copy applied.
fn joined_size(peers: &[PeerStatus], links: &[PeerLink]) -> usize {
    1 + peers
        .iter()
        .filter(|p| p.live && p.state.as_deref() != Some("draining"))
        .filter(|p| {
            links
                .iter()
                .any(|l| l.node.as_str() == p.node && l.reached() && l.copied)
        })
        .count()
}

/// Joins: opens publishes and advertises `ready` once joined, or after
/// `startup_timeout_ms` anyway (saying why).
async fn join(st: Arc<Shared>, cluster: Cluster) {
    let Some(c) = st.config.cluster.as_ref() else {
        return;
    };
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut said_waiting = false;
    loop {
        tick.tick().await;
        let peers = cluster.status().await;
        let links = st.node.peer_links();
        let size = joined_size(&peers, &links);
        if size < c.min_cluster_size {
            // Not even the timeout makes a node ready below this size: an
            // island (wrong secret, unreachable seeds) takes no traffic.
            if start.elapsed() >= c.startup_timeout && !said_waiting {
                said_waiting = true;
                tracing::warn!(
                    joined = size,
                    min_cluster_size = c.min_cluster_size,
                    seeds = ?c.seeds,
                    "not ready: fewer nodes joined than min_cluster_size (check the seeds, the cluster secret and the network)"
                );
            }
            continue;
        }
        // (After reading the links: a sync they show is fully applied.)
        if joined(&st, &peers, &links) && !st.node.applying() {
            tracing::info!(peers = links.len(), "joined the cluster");
            break;
        }
        if start.elapsed() >= c.startup_timeout {
            if peers.iter().any(|p| p.live) {
                tracing::warn!(
                    timeout_ms = c.startup_timeout.as_millis() as u64,
                    "not every live peer linked and synced in time; ready anyway"
                );
            } else {
                tracing::warn!(seeds = ?c.seeds, timeout_ms = c.startup_timeout.as_millis() as u64, "no seed answered: running as a cluster of one (check the seeds, the cluster secret and the network)");
            }
            break;
        }
    }
    if !st.draining.load(Ordering::Relaxed) {
        st.node.gate.open();
        cluster.set_key(KEY_STATE, "ready".into()).await;
    }
}

/// Why this node should not get traffic, if it should not.
pub(crate) async fn unready(st: &Shared) -> Option<serde_json::Value> {
    if st.draining.load(Ordering::Relaxed) {
        return Some(json!({ "ready": false, "reason": "draining" }));
    }
    if !st.node.gate.joined() {
        let mut body = json!({ "ready": false, "reason": "joining" });
        if let (Some(c), Some(settings)) = (&st.cluster, &st.config.cluster) {
            if settings.min_cluster_size > 1 {
                let size = joined_size(&c.status().await, &st.node.peer_links());
                body["joined_nodes"] = json!(size);
                body["min_cluster_size"] = json!(settings.min_cluster_size);
            }
        }
        return Some(body);
    }
    let c = st.cluster.as_ref()?;
    let links = st.node.peer_links();
    let reached = |n: &str| links.iter().any(|l| l.node.as_str() == n && l.reached());
    let live: Vec<String> = c
        .status()
        .await
        .into_iter()
        .filter(|p| p.live && p.state.as_deref() == Some("ready"))
        .map(|p| p.node)
        .collect();
    let (ok, missing): (Vec<String>, Vec<String>) = live.into_iter().partition(|n| reached(n));
    if missing.is_empty() {
        return None;
    }
    let me = c.node_id().as_str().to_owned();
    let (reach, total) = (1 + ok.len(), 1 + ok.len() + missing.len());
    let lowest_here = ok.iter().chain(std::iter::once(&me)).min();
    let minority = reach * 2 < total || (reach * 2 == total && lowest_here > missing.iter().min());
    minority.then(
        || json!({ "ready": false, "reason": "minority", "unreachable": missing, "reachable": ok }),
    )
}

/// `GET /readyz`: 200 when this node should get traffic; 503 while it
/// drains, joins, or reaches only a minority of its live peers.
/// A node id conflict (another live process with this node's id) is shown
/// beside the answer, whatever it is: the operator must see it.
pub async fn readyz(State(st): State<Arc<Shared>>) -> Response {
    let (status, mut body) = match unready(&st).await {
        Some(body) => (StatusCode::SERVICE_UNAVAILABLE, body),
        None => (StatusCode::OK, json!({ "ready": true })),
    };
    if let Some(c) = &st.cluster {
        let conflicts = c.identity_conflicts();
        if !conflicts.is_empty() {
            body["identity_conflicts"] = json!(conflicts);
        }
    }
    (status, Json(body)).into_response()
}

/// The cluster section of `/metrics`.
pub fn render_metrics(st: &Shared, out: &mut String) {
    let Some(c) = &st.cluster else { return };
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let counters = c.counters_snapshot();
    let peer = |p: &pushmesh_core::NodeId| format!("peer=\"{}\"", esc(p.as_str()));
    let by_kind = |data: fn(&PeerCounters) -> &std::sync::atomic::AtomicU64,
                   control: fn(&PeerCounters) -> &std::sync::atomic::AtomicU64| {
        counters.iter().flat_map(move |(p, k)| {
            [
                (format!("{},kind=\"data\"", peer(p)), l(data(k))),
                (format!("{},kind=\"control\"", peer(p)), l(control(k))),
            ]
        })
    };
    with_labels(
        out,
        (
            "pushmesh_cluster_frames_sent_total",
            "counter",
            "Frames sent to a peer.",
        ),
        by_kind(|k| &k.data_sent, |k| &k.control_sent),
    );
    with_labels(
        out,
        (
            "pushmesh_cluster_frames_received_total",
            "counter",
            "Frames received from a peer.",
        ),
        by_kind(|k| &k.data_received, |k| &k.control_received),
    );
    with_labels(
        out,
        (
            "pushmesh_cluster_frames_dropped_total",
            "counter",
            "Data frames dropped for a peer (its buffer full, or the peer unknown): loss.",
        ),
        counters.iter().map(|(p, k)| (peer(p), l(&k.dropped))),
    );
    with_labels(
        out,
        (
            "pushmesh_cluster_control_frames_unsent_total",
            "counter",
            "Control frames not sent for want of a link (drain, restart, cut); nothing lost: the next link starts with a full sync.",
        ),
        counters.iter().map(|(p, k)| (peer(p), l(&k.control_unsent))),
    );
    let linked = c.linked_peers();
    with_labels(
        out,
        (
            "pushmesh_cluster_peer_link_up",
            "gauge",
            "Whether the QUIC link to a peer is up.",
        ),
        counters
            .iter()
            .map(|(p, _)| (peer(p), u8::from(linked.contains(p)))),
    );
    let buffers = c.buffers();
    with_labels(
        out,
        (
            "pushmesh_cluster_frames_replayed_total",
            "counter",
            "Data frames sent again to a peer (link back to the same incarnation, or retransmission).",
        ),
        buffers.iter().map(|(p, _, replayed)| (peer(p), replayed)),
    );
    with_labels(
        out,
        (
            "pushmesh_cluster_peer_buffer_frames",
            "gauge",
            "Data frames held for a peer (not yet acknowledged).",
        ),
        buffers.iter().map(|(p, held, _)| (peer(p), held)),
    );
    let g = c.gossip_stats();
    for (name, help, v) in [
        (
            "pushmesh_gossip_packets_rejected_total",
            "Gossip datagrams that failed authentication.",
            &g.rejected,
        ),
        (
            "pushmesh_gossip_packets_replayed_total",
            "Authentic gossip datagrams dropped as replays (also in rejected).",
            &g.replayed,
        ),
        (
            "pushmesh_gossip_packets_skewed_total",
            "Authentic gossip datagrams dropped for a timestamp too far from this node's clock (also in rejected).",
            &g.skewed,
        ),
        (
            "pushmesh_gossip_send_failures_total",
            "Gossip envelopes not sent (too large once sealed, send error or timeout).",
            &g.send_failed,
        ),
    ] {
        scalar(out, name, "counter", help, l(v));
    }
    crate::identity::render_metrics(c, out);
    scalar(
        out,
        "pushmesh_cluster_links_refused_total",
        "counter",
        "Peer links refused (node id not in the peer's certificate, wrong cluster).",
        c.links_refused(),
    );
}
