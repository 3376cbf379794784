//! Cluster state of the core, sans-IO: peers, their interest, presence,
//! users and counts; routing of publishes to interested peers only.
//!
//! Links are the driver's business. The core is told when a link to a peer
//! is up (`peer_up`) or gone (`peer_down`), gets the peer's frames
//! (`handle_peer_frame`) and emits [`Output::Peer`] frames to send.
//!
//! Replication, NATS-style: each node tells every peer about its *own* local
//! state only: interest (a channel's local subscriber count went 0→1 or
//! N→0), presence members, signed-in users and subscriber counts. On a new
//! link it sends its whole state (`Sync`, tagged with its epoch and sequence
//! number); afterwards, numbered `Delta`s. A delta from another epoch or
//! with an old number is ignored; a gap asks for a resync. A `Publish` goes
//! to a peer only if that peer has declared interest in the channel, and a
//! node never forwards what it received from a peer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use indexmap::IndexMap;
use pushmesh_protocol::server::{self, WatchlistEvent};
use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::{ChannelName, CloseCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::core::{AppIdx, Core, Output};

/// Version byte in front of every encoded peer frame.
pub const FRAME_VERSION: u8 = 1;

/// A node of the cluster.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub Arc<str>);

impl NodeId {
    /// A node id from a string.
    pub fn new(s: &str) -> Self {
        Self(Arc::from(s))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a peer frame carries, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Channel messages.
    Data,
    /// Interest, presence, users, counts, sync.
    Control,
}

impl FrameKind {
    /// `data` or `control`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Control => "control",
        }
    }
}

/// A change of a node's own state, replicated to every peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delta {
    /// The node's interest in a channel (local subscribers > 0).
    Interest {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// Gained (true) or lost.
        add: bool,
    },
    /// A user is (or is no longer) a presence member on the node.
    Member {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// User.
        user: String,
        /// `user_info` JSON.
        info: Option<String>,
        /// Joined (true) or left.
        add: bool,
    },
    /// A user is (or is no longer) signed in on the node.
    User {
        /// App id.
        app: String,
        /// User.
        user: String,
        /// Online (true) or offline.
        online: bool,
    },
    /// The node's subscriber count of a channel.
    Count {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// Local subscribers.
        count: usize,
    },
}

/// The whole replicated state of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// (app, channel) with local interest.
    pub interest: Vec<(String, String)>,
    /// (app, channel, user, info) presence members.
    pub members: Vec<(String, String, String, Option<String>)>,
    /// (app, user) signed in.
    pub users: Vec<(String, String)>,
    /// (app, channel, count) subscriber counts.
    pub counts: Vec<(String, String, usize)>,
}

/// A frame between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// The sender's whole state.
    Sync {
        /// Sender's epoch (incarnation).
        epoch: u64,
        /// Sequence number of the last delta included.
        seq: u64,
        /// State.
        state: Snapshot,
    },
    /// One change of the sender's state.
    Delta {
        /// Sender's epoch.
        epoch: u64,
        /// Sequence number (one more than the previous delta's).
        seq: u64,
        /// The change.
        delta: Delta,
    },
    /// "Your state as I hold it is off: send me a Sync."
    ResyncRequest,
    /// A channel event to deliver locally (never forwarded again).
    Publish {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// Event name.
        event: String,
        /// Event data.
        data: String,
        /// Socket id to leave out.
        exclude: Option<String>,
        /// `user_id` of a presence client event.
        user_id: Option<String>,
    },
    /// The last event of a cache channel, for nodes without interest.
    CacheSet {
        /// App id.
        app: String,
        /// Channel.
        channel: String,
        /// Event name.
        event: String,
        /// Event data.
        data: String,
    },
    /// Close every connection of a user.
    Terminate {
        /// App id.
        app: String,
        /// User.
        user: String,
    },
}

impl PeerFrame {
    /// Data or control.
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Publish { .. } => FrameKind::Data,
            _ => FrameKind::Control,
        }
    }

    /// Version byte + bincode.
    pub fn encode(&self) -> Bytes {
        let mut v = vec![FRAME_VERSION];
        match bincode::serde::encode_to_vec(self, bincode::config::standard()) {
            Ok(b) => v.extend_from_slice(&b),
            Err(e) => tracing::error!(error = %e, "cannot encode a peer frame"),
        }
        Bytes::from(v)
    }

    /// Decodes a frame made by [`PeerFrame::encode`].
    pub fn decode(b: &[u8]) -> Result<Self, PeerFrameError> {
        match b.split_first() {
            Some((&FRAME_VERSION, rest)) => bincode::serde::decode_from_slice(
                rest,
                bincode::config::standard().with_limit::<16_777_216>(),
            )
            .map(|(f, _)| f)
            .map_err(|e| PeerFrameError::Decode(e.to_string())),
            Some((v, _)) => Err(PeerFrameError::Version(*v)),
            None => Err(PeerFrameError::Decode("empty frame".into())),
        }
    }
}

/// A frame from a peer that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerFrameError {
    /// Unknown version.
    #[error("unsupported peer frame version {0}")]
    Version(u8),
    /// Not a frame.
    #[error("undecodable peer frame: {0}")]
    Decode(String),
}

fn hash64(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

pub(crate) struct Peer {
    epoch: u64,
    last_seq: u64,
    /// XOR of hash64(app, channel) over the peer's interest, as held here.
    interest_hash: u64,
}

pub(crate) struct ClusterState {
    pub(crate) node: NodeId,
    epoch: u64,
    seq: u64,
    interest_hash: u64,
    pub(crate) peers: BTreeMap<NodeId, Peer>,
}

impl ClusterState {
    pub(crate) fn new(node: NodeId, epoch: u64) -> Self {
        Self {
            node,
            epoch,
            seq: 0,
            interest_hash: 0,
            peers: BTreeMap::new(),
        }
    }
}

/// What the node holds about other nodes for one channel.
#[derive(Default)]
pub(crate) struct Remote {
    pub(crate) interested: BTreeSet<NodeId>,
    pub(crate) counts: BTreeMap<NodeId, usize>,
    pub(crate) members: IndexMap<String, RemoteMember>,
}

impl Remote {
    fn is_empty(&self) -> bool {
        self.interested.is_empty() && self.counts.is_empty() && self.members.is_empty()
    }
}

pub(crate) struct RemoteMember {
    pub(crate) info: Option<Box<RawValue>>,
    pub(crate) nodes: BTreeSet<NodeId>,
}

fn raw(info: Option<&str>) -> Option<Box<RawValue>> {
    info.and_then(|s| RawValue::from_string(s.to_owned()).ok())
}

impl Core {
    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.cluster.node
    }

    /// Peers with a link up, as the core knows them.
    pub fn peers(&self) -> Vec<NodeId> {
        self.cluster.peers.keys().cloned().collect()
    }

    fn emit_peer(&mut self, to: NodeId, frame: &PeerFrame) {
        let kind = frame.kind();
        let bytes = frame.encode();
        self.out.push_back(Output::Peer {
            to,
            kind,
            frame: bytes,
        });
    }

    fn broadcast_frame(&mut self, frame: &PeerFrame) {
        if self.cluster.peers.is_empty() {
            return;
        }
        let kind = frame.kind();
        let bytes = frame.encode();
        let peers: Vec<NodeId> = self.cluster.peers.keys().cloned().collect();
        for to in peers {
            self.out.push_back(Output::Peer {
                to,
                kind,
                frame: bytes.clone(),
            });
        }
    }

    /// Replicates a change of this node's state to every peer.
    pub(crate) fn broadcast_delta(&mut self, delta: Delta) {
        self.cluster.seq += 1;
        if self.cluster.peers.is_empty() {
            return;
        }
        let frame = PeerFrame::Delta {
            epoch: self.cluster.epoch,
            seq: self.cluster.seq,
            delta,
        };
        self.broadcast_frame(&frame);
    }

    /// Whether this node fires the webhooks of a channel: rendezvous hashing
    /// over this node and the peers it has a link to.
    pub(crate) fn is_owner(&self, app: AppIdx, channel: &str) -> bool {
        if self.cluster.peers.is_empty() {
            return true;
        }
        let app_id = &self.apps[app.0 as usize].cfg.id;
        let mine = hash64(&[self.cluster.node.as_str(), app_id, channel]);
        self.cluster
            .peers
            .keys()
            .all(|p| (hash64(&[p.as_str(), app_id, channel]), p) < (mine, &self.cluster.node))
    }

    pub(crate) fn hook(&mut self, app: AppIdx, channel: &str, event: WebhookEvent) {
        if self.apps[app.0 as usize].cfg.webhooks && self.is_owner(app, channel) {
            self.out.push_back(Output::Hook { app, event });
        }
    }

    /// Whether any peer has interest in the channel.
    pub(crate) fn remote_interest(&self, app: AppIdx, name: &ChannelName) -> bool {
        self.apps[app.0 as usize]
            .remote
            .get(name)
            .is_some_and(|r| !r.interested.is_empty())
    }

    /// The local subscriber count of a channel went 0→1 (`add`) or N→0.
    pub(crate) fn local_interest(&mut self, app: AppIdx, name: &ChannelName, add: bool) {
        let app_id = self.apps[app.0 as usize].cfg.id.clone();
        self.cluster.interest_hash ^= hash64(&[&app_id, name.as_str()]);
        self.broadcast_delta(Delta::Interest {
            app: app_id,
            channel: name.to_string(),
            add,
        });
        if !self.remote_interest(app, name) {
            let channel = name.to_string();
            let event = if add {
                WebhookEvent::ChannelOccupied { channel }
            } else {
                WebhookEvent::ChannelVacated { channel }
            };
            self.hook(app, name.as_str(), event);
        }
    }

    /// Whether a user is a presence member of a channel on some peer.
    pub(crate) fn remote_member(&self, app: AppIdx, name: &str, user: &str) -> bool {
        self.apps[app.0 as usize]
            .remote
            .get(name)
            .is_some_and(|r| r.members.contains_key(user))
    }

    /// Whether a user is signed in on some peer.
    pub(crate) fn remote_online(&self, app: AppIdx, user: &str) -> bool {
        self.apps[app.0 as usize]
            .remote_users
            .get(user)
            .is_some_and(|n| !n.is_empty())
    }

    /// Sends `member_added` / `member_removed` to the local subscribers of a channel.
    pub(crate) fn member_event(
        &mut self,
        app: AppIdx,
        name: &str,
        user: &str,
        info: Option<&RawValue>,
        add: bool,
    ) {
        let frame = if add {
            server::member_added(name, user, info)
        } else {
            server::member_removed(name, user)
        };
        let a = &self.apps[app.0 as usize];
        let subs: Vec<_> = a
            .channels
            .get(name)
            .map(|c| c.subscribers.iter().copied().collect())
            .unwrap_or_default();
        for conn in subs {
            self.out.push_back(Output::Send {
                conn,
                frame: frame.clone(),
            });
        }
        let channel = name.to_owned();
        let user_id = user.to_owned();
        let event = if add {
            WebhookEvent::MemberAdded { channel, user_id }
        } else {
            WebhookEvent::MemberRemoved { channel, user_id }
        };
        self.hook(app, name, event);
    }

    /// Tells local watchers of `user` that it came online / went offline cluster-wide.
    pub(crate) fn watchlist_event(&mut self, app: AppIdx, user: &str, online: bool) {
        let Some(u) = self.apps[app.0 as usize].users.get(user) else {
            return;
        };
        if u.watchers.is_empty() {
            return;
        }
        let watchers: Vec<_> = u.watchers.iter().copied().collect();
        let f = server::watchlist_events(&[WatchlistEvent {
            name: if online { "online" } else { "offline" },
            user_ids: vec![user],
        }]);
        for conn in watchers {
            self.out.push_back(Output::Send {
                conn,
                frame: f.clone(),
            });
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for a in &self.apps {
            let id = &a.cfg.id;
            for (name, ch) in &a.channels {
                if ch.count() > 0 {
                    s.interest.push((id.clone(), name.to_string()));
                    s.counts.push((id.clone(), name.to_string(), ch.count()));
                }
                for (user, m) in &ch.members {
                    s.members.push((
                        id.clone(),
                        name.to_string(),
                        user.clone(),
                        m.info.as_ref().map(|i| i.get().to_owned()),
                    ));
                }
            }
            for (user, u) in &a.users {
                if !u.conns.is_empty() {
                    s.users.push((id.clone(), user.clone()));
                }
            }
        }
        s
    }

    /// A link to `peer` (incarnation `epoch`) is up: send it this node's state.
    pub fn peer_up(&mut self, now: Instant, peer: NodeId, epoch: u64) {
        if let Some(p) = self.cluster.peers.get(&peer) {
            if p.epoch != epoch {
                // A restart we did not see go down: forget the old incarnation.
                self.peer_down(now, &peer);
            }
        }
        self.cluster.peers.entry(peer.clone()).or_insert(Peer {
            epoch,
            last_seq: 0,
            interest_hash: 0,
        });
        let frame = PeerFrame::Sync {
            epoch: self.cluster.epoch,
            seq: self.cluster.seq,
            state: self.snapshot(),
        };
        self.emit_peer(peer, &frame);
    }

    /// The link to `peer` is gone, or the peer was declared dead: purge what
    /// it held (its members leave, its users go offline) and stop sending to it.
    pub fn peer_down(&mut self, now: Instant, peer: &NodeId) {
        if self.cluster.peers.remove(peer).is_none() {
            return;
        }
        self.apply_snapshot(now, peer, Snapshot::default());
    }

    /// Replaces everything held about `peer` with `state`, emitting the
    /// events that the difference implies.
    fn apply_snapshot(&mut self, now: Instant, peer: &NodeId, state: Snapshot) {
        let mut old = Snapshot::default();
        for a in &self.apps {
            let id = &a.cfg.id;
            for (name, r) in &a.remote {
                if r.interested.contains(peer) {
                    old.interest.push((id.clone(), name.to_string()));
                }
                if let Some(c) = r.counts.get(peer) {
                    old.counts.push((id.clone(), name.to_string(), *c));
                }
                for (user, m) in &r.members {
                    if m.nodes.contains(peer) {
                        old.members
                            .push((id.clone(), name.to_string(), user.clone(), None));
                    }
                }
            }
            for (user, nodes) in &a.remote_users {
                if nodes.contains(peer) {
                    old.users.push((id.clone(), user.clone()));
                }
            }
        }
        let new_interest: BTreeSet<_> = state.interest.iter().cloned().collect();
        let new_members: BTreeSet<_> = state
            .members
            .iter()
            .map(|(a, c, u, _)| (a.clone(), c.clone(), u.clone()))
            .collect();
        let new_users: BTreeSet<_> = state.users.iter().cloned().collect();
        let new_counts: BTreeSet<_> = state
            .counts
            .iter()
            .map(|(a, c, _)| (a.clone(), c.clone()))
            .collect();
        // Removals first, then additions.
        for (app, channel, user, _) in old.members {
            if !new_members.contains(&(app.clone(), channel.clone(), user.clone())) {
                self.apply_delta(
                    now,
                    peer,
                    Delta::Member {
                        app,
                        channel,
                        user,
                        info: None,
                        add: false,
                    },
                );
            }
        }
        for (app, user) in old.users {
            if !new_users.contains(&(app.clone(), user.clone())) {
                self.apply_delta(
                    now,
                    peer,
                    Delta::User {
                        app,
                        user,
                        online: false,
                    },
                );
            }
        }
        for (app, channel) in old.interest {
            if !new_interest.contains(&(app.clone(), channel.clone())) {
                self.apply_delta(
                    now,
                    peer,
                    Delta::Interest {
                        app,
                        channel,
                        add: false,
                    },
                );
            }
        }
        for (app, channel, _) in old.counts {
            if !new_counts.contains(&(app.clone(), channel.clone())) {
                self.apply_delta(
                    now,
                    peer,
                    Delta::Count {
                        app,
                        channel,
                        count: 0,
                    },
                );
            }
        }
        for (app, channel) in state.interest {
            self.apply_delta(
                now,
                peer,
                Delta::Interest {
                    app,
                    channel,
                    add: true,
                },
            );
        }
        for (app, channel, count) in state.counts {
            self.apply_delta(
                now,
                peer,
                Delta::Count {
                    app,
                    channel,
                    count,
                },
            );
        }
        for (app, channel, user, info) in state.members {
            self.apply_delta(
                now,
                peer,
                Delta::Member {
                    app,
                    channel,
                    user,
                    info,
                    add: true,
                },
            );
        }
        for (app, user) in state.users {
            self.apply_delta(
                now,
                peer,
                Delta::User {
                    app,
                    user,
                    online: true,
                },
            );
        }
    }

    /// Applies one change of `peer`'s state (idempotent).
    fn apply_delta(&mut self, _now: Instant, peer: &NodeId, delta: Delta) {
        let app_id = match &delta {
            Delta::Interest { app, .. }
            | Delta::Member { app, .. }
            | Delta::User { app, .. }
            | Delta::Count { app, .. } => app,
        };
        let Some(app) = self.by_id.get(app_id).copied() else {
            return;
        };
        match delta {
            Delta::Interest { channel, add, .. } => {
                let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) else {
                    return;
                };
                let local = self.apps[app.0 as usize]
                    .channels
                    .get(&name)
                    .is_some_and(|c| c.count() > 0);
                let before = self.remote_interest(app, &name);
                let r = self.apps[app.0 as usize]
                    .remote
                    .entry(name.clone())
                    .or_default();
                let changed = if add {
                    r.interested.insert(peer.clone())
                } else {
                    r.interested.remove(peer)
                };
                if !changed {
                    return;
                }
                let after = !r.interested.is_empty();
                if r.is_empty() {
                    self.apps[app.0 as usize].remote.remove(&name);
                }
                if let Some(p) = self.cluster.peers.get_mut(peer) {
                    p.interest_hash ^= hash64(&[&self.apps[app.0 as usize].cfg.id, name.as_str()]);
                }
                if !local && before != after {
                    let event = if after {
                        WebhookEvent::ChannelOccupied {
                            channel: channel.clone(),
                        }
                    } else {
                        WebhookEvent::ChannelVacated {
                            channel: channel.clone(),
                        }
                    };
                    self.hook(app, &channel, event);
                }
            }
            Delta::Count { channel, count, .. } => {
                let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) else {
                    return;
                };
                let a = &mut self.apps[app.0 as usize];
                let r = a.remote.entry(name.clone()).or_default();
                let changed = if count == 0 {
                    r.counts.remove(peer).is_some()
                } else {
                    r.counts.insert(peer.clone(), count) != Some(count)
                };
                if r.is_empty() {
                    a.remote.remove(&name);
                }
                if changed && (a.cfg.subscription_count_events || a.cfg.webhooks) {
                    a.dirty_events.insert(name);
                }
            }
            Delta::Member {
                channel,
                user,
                info,
                add,
                ..
            } => {
                let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) else {
                    return;
                };
                let a = &mut self.apps[app.0 as usize];
                let local = a
                    .channels
                    .get(&name)
                    .is_some_and(|c| c.members.contains_key(&user));
                let r = a.remote.entry(name.clone()).or_default();
                let was = r.members.contains_key(&user);
                if add {
                    let m = r
                        .members
                        .entry(user.clone())
                        .or_insert_with(|| RemoteMember {
                            info: raw(info.as_deref()),
                            nodes: BTreeSet::new(),
                        });
                    if !m.nodes.insert(peer.clone()) {
                        return;
                    }
                    if !was && !local {
                        let info = r
                            .members
                            .get(&user)
                            .and_then(|m| m.info.as_ref().map(|i| i.get().to_owned()));
                        let info = raw(info.as_deref());
                        self.member_event(app, &channel, &user, info.as_deref(), true);
                    }
                } else {
                    let Some(m) = r.members.get_mut(&user) else {
                        return;
                    };
                    if !m.nodes.remove(peer) {
                        return;
                    }
                    let gone = m.nodes.is_empty();
                    if gone {
                        r.members.swap_remove(&user);
                    }
                    if r.is_empty() {
                        a.remote.remove(&name);
                    }
                    if gone && !local {
                        self.member_event(app, &channel, &user, None, false);
                    }
                }
            }
            Delta::User { user, online, .. } => {
                let a = &mut self.apps[app.0 as usize];
                let local = a.users.get(&user).is_some_and(|u| !u.conns.is_empty());
                let nodes = a.remote_users.entry(user.clone()).or_default();
                let was = !nodes.is_empty();
                let changed = if online {
                    nodes.insert(peer.clone())
                } else {
                    nodes.remove(peer)
                };
                let now_online = !nodes.is_empty();
                if nodes.is_empty() {
                    a.remote_users.remove(&user);
                }
                if changed && !local && was != now_online {
                    self.watchlist_event(app, &user, now_online);
                }
            }
        }
    }

    /// A frame from `from`. Undecodable frames are refused, never fatal.
    pub fn handle_peer_frame(
        &mut self,
        now: Instant,
        from: &NodeId,
        bytes: &[u8],
    ) -> Result<(), PeerFrameError> {
        let frame = PeerFrame::decode(bytes)?;
        let Some(peer) = self.cluster.peers.get_mut(from) else {
            tracing::debug!(peer = %from, "frame from a peer that is not up, ignored");
            return Ok(());
        };
        match frame {
            PeerFrame::Sync { epoch, seq, state } => {
                if epoch != peer.epoch {
                    peer.epoch = epoch;
                }
                peer.last_seq = seq;
                self.apply_snapshot(now, from, state);
            }
            PeerFrame::Delta { epoch, seq, delta } => {
                if epoch != peer.epoch || seq <= peer.last_seq {
                    return Ok(());
                }
                if seq != peer.last_seq + 1 {
                    tracing::warn!(peer = %from, expected = peer.last_seq + 1, got = seq, "gap in peer deltas, asking for a resync");
                    self.emit_peer(from.clone(), &PeerFrame::ResyncRequest);
                    return Ok(());
                }
                peer.last_seq = seq;
                self.apply_delta(now, from, delta);
            }
            PeerFrame::ResyncRequest => {
                let frame = PeerFrame::Sync {
                    epoch: self.cluster.epoch,
                    seq: self.cluster.seq,
                    state: self.snapshot(),
                };
                self.emit_peer(from.clone(), &frame);
            }
            PeerFrame::Publish {
                app,
                channel,
                event,
                data,
                exclude,
                user_id,
            } => {
                let Some(app) = self.by_id.get(&app).copied() else {
                    return Ok(());
                };
                let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) else {
                    return Ok(());
                };
                let exclude = exclude.as_deref().and_then(|s| self.local_conn_of(s));
                self.deliver_local(
                    now,
                    app,
                    &name,
                    &event,
                    &data,
                    None,
                    exclude,
                    user_id.as_deref(),
                );
            }
            PeerFrame::CacheSet {
                app,
                channel,
                event,
                data,
            } => {
                let Some(app) = self.by_id.get(&app).copied() else {
                    return Ok(());
                };
                let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) else {
                    return Ok(());
                };
                self.cache_event(now, app, &name, &event, &data, None);
            }
            PeerFrame::Terminate { app, user } => {
                if let Some(app) = self.by_id.get(&app).copied() {
                    self.terminate_local(app, &user);
                }
            }
        }
        Ok(())
    }

    /// Sends a publish to every peer interested in the channel (once each),
    /// or, for a cache channel, its new cached event to the others.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
        event: &str,
        data: &str,
        exclude: Option<&str>,
        user_id: Option<&str>,
    ) {
        if self.cluster.peers.is_empty() {
            return;
        }
        let a = &self.apps[app.0 as usize];
        let interested: Vec<NodeId> = a
            .remote
            .get(name)
            .map(|r| r.interested.iter().cloned().collect())
            .unwrap_or_default();
        if !interested.is_empty() {
            let frame = PeerFrame::Publish {
                app: a.cfg.id.clone(),
                channel: name.to_string(),
                event: event.to_owned(),
                data: data.to_owned(),
                exclude: exclude.map(str::to_owned),
                user_id: user_id.map(str::to_owned),
            }
            .encode();
            for to in &interested {
                self.out.push_back(Output::Peer {
                    to: to.clone(),
                    kind: FrameKind::Data,
                    frame: frame.clone(),
                });
            }
        }
        if name.is_cache() && interested.len() < self.cluster.peers.len() {
            let frame = PeerFrame::CacheSet {
                app: a.cfg.id.clone(),
                channel: name.to_string(),
                event: event.to_owned(),
                data: data.to_owned(),
            }
            .encode();
            let others: Vec<NodeId> = self
                .cluster
                .peers
                .keys()
                .filter(|p| !interested.contains(p))
                .cloned()
                .collect();
            for to in others {
                self.out.push_back(Output::Peer {
                    to,
                    kind: FrameKind::Control,
                    frame: frame.clone(),
                });
            }
        }
    }

    /// Asks every peer to close the user's connections.
    pub(crate) fn forward_terminate(&mut self, app: AppIdx, user: &str) {
        let frame = PeerFrame::Terminate {
            app: self.apps[app.0 as usize].cfg.id.clone(),
            user: user.to_owned(),
        };
        self.broadcast_frame(&frame);
    }

    /// A constant-size digest of this node's interest for gossip:
    /// `epoch:seq:hash`.
    pub fn interest_digest(&self) -> String {
        format!(
            "{}:{}:{:016x}",
            self.cluster.epoch, self.cluster.seq, self.cluster.interest_hash
        )
    }

    /// Compares a peer's gossiped digest with what this node holds of it;
    /// asks for a resync when they disagree at the same sequence number.
    /// Returns whether a resync was asked for.
    pub fn check_peer_digest(&mut self, peer: &NodeId, digest: &str) -> bool {
        let mut parts = digest.split(':');
        let (Some(e), Some(s), Some(h)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let (Ok(epoch), Ok(seq), Ok(hash)) = (
            e.parse::<u64>(),
            s.parse::<u64>(),
            u64::from_str_radix(h, 16),
        ) else {
            return false;
        };
        let Some(p) = self.cluster.peers.get(peer) else {
            return false;
        };
        if p.epoch == epoch && p.last_seq == seq && p.interest_hash != hash {
            tracing::warn!(peer = %peer, "interest digest mismatch, asking for a resync");
            self.emit_peer(peer.clone(), &PeerFrame::ResyncRequest);
            return true;
        }
        false
    }

    /// Whether a channel is occupied anywhere in the cluster.
    pub(crate) fn cluster_occupied(&self, app: AppIdx, name: &ChannelName) -> bool {
        self.apps[app.0 as usize]
            .channels
            .get(name)
            .is_some_and(|c| c.count() > 0)
            || self.remote_interest(app, name)
    }

    /// Subscribers of a channel on other nodes.
    pub(crate) fn remote_count(&self, app: AppIdx, name: &ChannelName) -> usize {
        self.apps[app.0 as usize]
            .remote
            .get(name)
            .map_or(0, |r| r.counts.values().sum())
    }

    /// Closes this node's connections of a user.
    pub(crate) fn terminate_local(&mut self, app: AppIdx, user: &str) -> usize {
        let conns: Vec<_> = self.apps[app.0 as usize]
            .users
            .get(user)
            .map(|u| u.conns.iter().copied().collect())
            .unwrap_or_default();
        for c in &conns {
            self.close_connection(
                *c,
                CloseCode::Unauthorized,
                "connection terminated by the server",
            );
        }
        conns.len()
    }
}
