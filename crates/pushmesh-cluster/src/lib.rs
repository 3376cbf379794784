//! Cluster I/O of pushmesh: membership by gossip (chitchat, sealed with a
//! key derived from the cluster secret), one QUIC connection per peer pair
//! with mutual TLS, and the length-delimited frame codec on it.
//!
//! It knows nothing of channels: it reports [`ClusterEvent`]s (a peer link
//! is up or down, a peer is gone, a frame arrived, a peer's interest
//! digest) and sends frames the core produced. Each link has two QUIC uni
//! streams per direction, control and data, so a large state sync never
//! holds channel messages back. Data frames are numbered and held per peer
//! until acknowledged ([`pushmesh_core::peer_buffer`]): a link that comes
//! back to the same incarnation of the peer gets them again, exactly once.
//! Buffers are bounded: [`Cluster::has_room`] is asked before a publish is
//! delivered, so a full buffer refuses the publish (503) rather than lose it.

mod arrivals;
mod codec;
pub mod gossip;
pub mod identity;
mod link;
mod peers;
mod receipt;
pub mod tls;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use pushmesh_core::{FrameKind, NodeId};
use serde::Serialize;
use tokio::sync::mpsc;

pub use gossip::GossipStats;
pub use identity::IdentityConflict;
pub use receipt::{all_acked, first_ack, Receipt};
pub use tls::TlsMaterial;

/// Gossip key: the node's QUIC address (a node is live only once it has it).
pub const KEY_QUIC: &str = "quic";
/// Gossip key: `joining`, `ready` or `draining`.
pub const KEY_STATE: &str = "state";
/// Gossip key: the pushmesh version.
pub const KEY_VERSION: &str = "version";
/// Gossip key: the node's interest digest (constant size).
pub const KEY_INTEREST: &str = "interest";
/// Gossip key: the node's epoch.
pub const KEY_EPOCH: &str = "epoch";

/// Settings of the cluster layer.
pub struct ClusterConfig {
    /// This node's id.
    pub node_id: String,
    /// Cluster id: gossip from another cluster is ignored.
    pub cluster_id: String,
    /// This node's incarnation.
    pub epoch: u64,
    /// UDP address gossip listens on.
    pub gossip_listen: SocketAddr,
    /// Gossip address other nodes reach this one at.
    pub gossip_advertise: SocketAddr,
    /// UDP address QUIC listens on.
    pub quic_listen: SocketAddr,
    /// QUIC address advertised to peers.
    pub quic_advertise: SocketAddr,
    /// Seeds, `host:port`, re-resolved by chitchat.
    pub seeds: Vec<String>,
    /// Cluster secret (gossip key).
    pub secret: String,
    /// Certificates for mutual TLS.
    pub tls: TlsMaterial,
    /// Gossip round interval.
    pub gossip_interval: Duration,
    /// Phi threshold of the failure detector.
    pub phi_threshold: f64,
    /// How long a dead node stays known before it is forgotten.
    pub dead_node_grace: Duration,
    /// Frames queued per peer before new ones are dropped.
    pub peer_queue: usize,
    /// This node's version string.
    pub version: String,
}

/// Why the cluster layer cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// TLS material problem.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// QUIC endpoint could not be bound.
    #[error("cannot bind QUIC on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The node id is unusable.
    #[error("invalid node id {0:?}")]
    NodeId(String),
    /// Gossip could not start.
    #[error("cannot start gossip on {addr}: {message}")]
    Gossip {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        message: String,
    },
}

/// What the cluster layer reports.
#[derive(Debug, Clone)]
pub enum ClusterEvent {
    /// A link to a peer is up (after the hello exchange).
    PeerUp {
        /// Peer.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
    },
    /// The link is gone; the peer may come back (its state is kept).
    PeerDown {
        /// Peer.
        node: NodeId,
    },
    /// The peer is gone for good: gossip declared it dead, or it left.
    PeerGone {
        /// Peer.
        node: NodeId,
    },
    /// The peer forgot this node for a while (declared it dead while it
    /// was alive): messages for this node's subscribers may have been lost.
    ContinuityBroken {
        /// Peer.
        node: NodeId,
    },
    /// A frame from a peer.
    Frame {
        /// Sender.
        from: NodeId,
        /// The frame.
        frame: Bytes,
    },
    /// A peer's gossiped interest digest changed.
    Digest {
        /// Peer.
        node: NodeId,
        /// Digest.
        digest: String,
    },
}

/// Counters of one peer.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Data frames sent.
    pub data_sent: AtomicU64,
    /// Control frames sent.
    pub control_sent: AtomicU64,
    /// Data frames received.
    pub data_received: AtomicU64,
    /// Control frames received.
    pub control_received: AtomicU64,
    /// Data frames not taken: the peer's buffer was full, or the peer has
    /// no buffer (never linked, or gone). A message did not reach it.
    pub dropped: AtomicU64,
    /// Control frames not sent for want of a link (the peer restarting, a
    /// drain, a cut): nothing is lost, the next link starts with a full
    /// state sync.
    pub control_unsent: AtomicU64,
    /// Links that came up to this peer.
    pub links_up: AtomicU64,
    /// Bytes written to the peer's streams (control and data).
    pub bytes_sent: AtomicU64,
    /// Bytes read from the peer's streams.
    pub bytes_received: AtomicU64,
}

impl PeerCounters {
    fn sent(&self, kind: FrameKind) -> &AtomicU64 {
        match kind {
            FrameKind::Data => &self.data_sent,
            FrameKind::Control => &self.control_sent,
        }
    }

    fn received(&self, kind: FrameKind) -> &AtomicU64 {
        match kind {
            FrameKind::Data => &self.data_received,
            FrameKind::Control => &self.control_received,
        }
    }
}

/// A peer as `GET /cluster` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Node id.
    pub node: String,
    /// Whether gossip considers it live.
    pub live: bool,
    /// Its advertised state (`ready`, `draining`).
    pub state: Option<String>,
    /// Its QUIC address.
    pub quic: Option<String>,
    /// Whether a link is up.
    pub link: bool,
    /// Frame counters.
    pub frames: BTreeMap<&'static str, u64>,
}

struct Link {
    id: u64,
    /// The peer's incarnation on this link.
    epoch: u64,
    conn: quinn::Connection,
}

struct Inner {
    node: NodeId,
    epoch: u64,
    cluster_id: String,
    links: Mutex<HashMap<NodeId, Link>>,
    peers: peers::Peers,
    /// The incarnation of each peer last linked (until it is gone).
    epochs: Mutex<HashMap<NodeId, u64>>,
    /// Incarnations gossip declared dead: if one links again, this node
    /// confirmed subscriptions without it meanwhile.
    forgotten: Mutex<HashMap<NodeId, u64>>,
    dialing: Mutex<HashSet<NodeId>>,
    counters: Mutex<HashMap<NodeId, Arc<PeerCounters>>>,
    events: mpsc::Sender<ClusterEvent>,
    endpoint: quinn::Endpoint,
    chitchat: ChitchatHandle,
    next_link: AtomicU64,
    peer_queue: usize,
    stopping: AtomicBool,
    /// Gossip counters.
    gossip: Arc<GossipStats>,
    /// Links refused: wrong cluster, node or certificate.
    links_refused: AtomicU64,
    /// Other live holders of this node's id.
    identity: identity::IdentityState,
    /// Peer frames handed to the node and handled by it.
    arrivals: arrivals::Arrivals,
}

/// A running cluster layer.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    /// Binds QUIC, starts gossip and the membership loop.
    pub async fn start(
        mut cfg: ClusterConfig,
    ) -> Result<(Self, mpsc::Receiver<ClusterEvent>), ClusterError> {
        if cfg.node_id.is_empty() {
            return Err(ClusterError::NodeId(cfg.node_id));
        }
        // The certificate must name this node: peers check it against our hello.
        cfg.tls = cfg.tls.for_node(&cfg.node_id)?;
        Self::start_unchecked(cfg).await
    }

    /// [`Cluster::start`] without checking that the certificate names the
    /// node (tests use it to impersonate a node).
    async fn start_unchecked(
        cfg: ClusterConfig,
    ) -> Result<(Self, mpsc::Receiver<ClusterEvent>), ClusterError> {
        let server = tls::server_config(&cfg.tls)?;
        let client = tls::client_config(&cfg.tls)?;
        let mut endpoint = quinn::Endpoint::server(server, cfg.quic_listen).map_err(|source| {
            ClusterError::Bind {
                addr: cfg.quic_listen,
                source,
            }
        })?;
        endpoint.set_default_client_config(client);
        let gossip = Arc::new(GossipStats::default());
        let transport =
            gossip::SealedTransport::new(gossip::gossip_key(&cfg.secret), gossip.clone());
        let chitchat_cfg = ChitchatConfig {
            chitchat_id: ChitchatId::new(cfg.node_id.clone(), cfg.epoch, cfg.gossip_advertise),
            cluster_id: cfg.cluster_id.clone(),
            gossip_interval: cfg.gossip_interval,
            listen_addr: cfg.gossip_listen,
            seed_nodes: cfg.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: cfg.phi_threshold,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10),
                initial_interval: cfg.gossip_interval,
                dead_node_grace_period: cfg.dead_node_grace,
            },
            marked_for_deletion_grace_period: cfg.dead_node_grace,
            catchup_callback: None,
            // Live only once the QUIC address is advertised.
            extra_liveness_predicate: Some(Box::new(|state| state.get(KEY_QUIC).is_some())),
            protocol_version: chitchat::ProtocolVersion::V1,
        };
        let initial = vec![
            (KEY_QUIC.to_string(), cfg.quic_advertise.to_string()),
            (KEY_STATE.to_string(), "joining".to_string()),
            (KEY_VERSION.to_string(), cfg.version.clone()),
            (KEY_EPOCH.to_string(), cfg.epoch.to_string()),
        ];
        let chitchat = spawn_chitchat(chitchat_cfg, initial, &transport)
            .await
            .map_err(|e| ClusterError::Gossip {
                addr: cfg.gossip_listen,
                message: format!("{e:#}"),
            })?;
        if let (Some(gossip), Ok(quic)) = (transport.local_addr(), endpoint.local_addr()) {
            tracing::info!(%gossip, %quic, "cluster sockets bound");
        }
        let (tx, rx) = mpsc::channel(65_536);
        let inner = Arc::new(Inner {
            node: NodeId::new(&cfg.node_id),
            epoch: cfg.epoch,
            cluster_id: cfg.cluster_id,
            links: Mutex::new(HashMap::new()),
            peers: peers::Peers::new(cfg.epoch, cfg.peer_queue.max(16)),
            epochs: Mutex::new(HashMap::new()),
            forgotten: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashSet::new()),
            counters: Mutex::new(HashMap::new()),
            events: tx,
            endpoint,
            chitchat,
            next_link: AtomicU64::new(1),
            peer_queue: cfg.peer_queue.max(16),
            stopping: AtomicBool::new(false),
            gossip,
            links_refused: AtomicU64::new(0),
            identity: identity::IdentityState::new(&cfg.node_id, cfg.gossip_interval),
            arrivals: arrivals::Arrivals::default(),
        });
        let c = Self { inner };
        tokio::spawn(c.clone().accept_loop());
        tokio::spawn(c.clone().membership_loop());
        Ok((c, rx))
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.node
    }

    /// Gossip counters.
    pub fn gossip_stats(&self) -> &GossipStats {
        &self.inner.gossip
    }

    /// Peer links refused so far (wrong cluster, node id or certificate).
    pub fn links_refused(&self) -> u64 {
        self.inner.links_refused.load(Ordering::Relaxed)
    }

    fn counters(&self, node: &NodeId) -> Arc<PeerCounters> {
        lock(&self.inner.counters)
            .entry(node.clone())
            .or_default()
            .clone()
    }

    /// Sets a gossip key of this node.
    pub async fn set_key(&self, key: &str, value: String) {
        let key = key.to_owned();
        self.inner
            .chitchat
            .with_chitchat(move |c| c.self_node_state().set(key.clone(), value.clone()))
            .await;
    }

    /// Peers as gossip and the links see them.
    pub async fn status(&self) -> Vec<PeerStatus> {
        let me = self.inner.node.clone();
        let states: Vec<(String, bool, Option<String>, Option<String>)> = self
            .inner
            .chitchat
            .with_chitchat(move |c| {
                let live: HashSet<ChitchatId> = c.live_nodes().cloned().collect();
                c.node_states()
                    .iter()
                    .filter(|(id, _)| *id.node_id != *me.as_str())
                    .map(|(id, st)| {
                        (
                            id.node_id.to_string(),
                            live.contains(id),
                            st.get(KEY_STATE).map(str::to_owned),
                            st.get(KEY_QUIC).map(str::to_owned),
                        )
                    })
                    .collect()
            })
            .await;
        let links = lock(&self.inner.links);
        let counters = lock(&self.inner.counters);
        let mut out: BTreeMap<String, PeerStatus> = BTreeMap::new();
        for (node, live, state, quic) in states {
            // Several generations of a node may be known; a live one wins.
            let e = out.entry(node.clone()).or_insert(PeerStatus {
                node: node.clone(),
                live,
                state: state.clone(),
                quic: quic.clone(),
                link: false,
                frames: BTreeMap::new(),
            });
            if live {
                e.live = true;
                e.state = state;
                e.quic = quic;
            }
        }
        for (node, c) in counters.iter() {
            let e = out.entry(node.to_string()).or_insert(PeerStatus {
                node: node.to_string(),
                live: false,
                state: None,
                quic: None,
                link: false,
                frames: BTreeMap::new(),
            });
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            e.frames.insert("data_sent", l(&c.data_sent));
            e.frames.insert("control_sent", l(&c.control_sent));
            e.frames.insert("data_received", l(&c.data_received));
            e.frames.insert("control_received", l(&c.control_received));
            e.frames.insert("dropped", l(&c.dropped));
            e.frames.insert("control_unsent", l(&c.control_unsent));
            e.frames.insert("links_up", l(&c.links_up));
            e.frames.insert("bytes_sent", l(&c.bytes_sent));
            e.frames.insert("bytes_received", l(&c.bytes_received));
        }
        for (node, _) in links.iter() {
            if let Some(e) = out.get_mut(node.as_str()) {
                e.link = true;
            }
        }
        out.into_values().collect()
    }

    /// Per-peer frame counters, for metrics.
    pub fn counters_snapshot(&self) -> Vec<(NodeId, Arc<PeerCounters>)> {
        lock(&self.inner.counters)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Peers with a link up.
    pub fn linked_peers(&self) -> Vec<NodeId> {
        lock(&self.inner.links).keys().cloned().collect()
    }

    /// Stops: closes every link (peers read it as leaving, not as a
    /// failure), then leaves gossip.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        for (_, s) in self.inner.peers.all() {
            // Dropping the control sender lets its writer finish the stream.
            lock(&s.control).take();
        }
        let conns: Vec<quinn::Connection> = lock(&self.inner.links)
            .drain()
            .map(|(_, l)| l.conn)
            .collect();
        let deadline = tokio::time::Instant::now() + grace.min(Duration::from_millis(500));
        for c in &conns {
            let _ = tokio::time::timeout_at(deadline, c.closed()).await;
        }
        for c in &conns {
            c.close(link::CLOSE_LEAVING.into(), b"shutdown");
        }
        let _ = self.inner.chitchat.initiate_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }

    /// Every 200 ms: dial live peers without a link (the lower node id
    /// dials, so a pair has one connection), close links to peers gossip
    /// declared dead, report changed interest digests.
    async fn membership_loop(self) {
        let mut digests: HashMap<NodeId, String> = HashMap::new();
        // Incarnations gossip has shown live at least once: chitchat lists a
        // node it has only just heard of among the dead until its heartbeats
        // arrive, which is no death (a link may come up before that).
        let mut seen_live: HashSet<(NodeId, u64)> = HashSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if self.inner.stopping.load(Ordering::Relaxed) {
                return;
            }
            self.check_identity().await;
            let me = self.inner.node.clone();
            type Live = Vec<(NodeId, u64, Option<SocketAddr>, Option<String>)>;
            let (live, dead): (Live, HashSet<(NodeId, u64)>) = self
                .inner
                .chitchat
                .with_chitchat(move |c| {
                    let live = c
                        .live_nodes()
                        .filter(|id| *id.node_id != *me.as_str())
                        .filter_map(|id| {
                            let st = c.node_state(id)?;
                            Some((
                                NodeId::new(&id.node_id),
                                id.generation_id,
                                st.get(KEY_QUIC).and_then(|a| a.parse().ok()),
                                st.get(KEY_INTEREST).map(str::to_owned),
                            ))
                        })
                        .collect();
                    let dead = c
                        .dead_nodes()
                        .map(|id| (NodeId::new(&id.node_id), id.generation_id))
                        .collect();
                    (live, dead)
                })
                .await;
            let live_ids: HashSet<NodeId> = live.iter().map(|(n, ..)| n.clone()).collect();
            seen_live.extend(live.iter().map(|(n, e, ..)| (n.clone(), *e)));
            for (node, _, quic, digest) in &live {
                let linked = lock(&self.inner.links).contains_key(node);
                if !linked && self.inner.node < *node {
                    if let Some(addr) = quic {
                        if lock(&self.inner.dialing).insert(node.clone()) {
                            tokio::spawn(self.clone().dial(node.clone(), *addr));
                        }
                    }
                }
                if let Some(d) = digest {
                    if digests.get(node) != Some(d) {
                        digests.insert(node.clone(), d.clone());
                        let _ = self.inner.events.try_send(ClusterEvent::Digest {
                            node: node.clone(),
                            digest: d.clone(),
                        });
                    }
                }
            }
            // A peer is gone once gossip declares the incarnation this node
            // linked to dead after having shown it live (and no other
            // incarnation of it is live). A node merely not seen live yet
            // (its gossip still on the way) is not.
            let gone: Vec<NodeId> = lock(&self.inner.epochs)
                .iter()
                .filter(|(n, e)| {
                    let key = ((*n).clone(), **e);
                    !live_ids.contains(*n) && dead.contains(&key) && seen_live.contains(&key)
                })
                .map(|(n, _)| n.clone())
                .collect();
            for node in gone {
                if let Some(e) = lock(&self.inner.epochs).remove(&node) {
                    lock(&self.inner.forgotten).insert(node.clone(), e);
                }
                tracing::warn!(peer = %node, "peer declared dead by gossip");
                self.forget(&node);
                let _ = self
                    .inner
                    .events
                    .send(ClusterEvent::PeerGone { node })
                    .await;
            }
            digests.retain(|n, _| live_ids.contains(n));
            // Forget what gossip itself forgot (after the dead-node grace).
            seen_live.retain(|k| live_ids.contains(&k.0) || dead.contains(k));
        }
    }
}

#[cfg(test)]
mod tests;
