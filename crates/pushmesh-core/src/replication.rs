//! Replication of each node's own state to its peers, NATS-style: interest
//! (a channel's local subscriber count went 0→1 or N→0), presence members,
//! signed-in users and subscriber counts.
//!
//! The [`Replicator`] is the node's single sequencer. Shards and the user
//! registry hand it their changes ([`Replicator::local`]); it numbers them
//! (epoch, seq), keeps a mirror of the node's replicated state (so a `Sync`
//! for a new link never has to visit the shards) and a mirror of what each
//! peer holds (so a peer's `Sync` turns into exactly the per-channel changes
//! the shards must apply). A delta from another epoch or with an old number
//! is ignored; a gap asks for one resync (and no more until it arrives).
//! Only state changes pass through here, never channel messages.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::peer_frame::{Delta, NodeId, PeerFrame, Snapshot};
use crate::routing::hash64;

/// What the driver must do after a call: frames to send, peer changes to apply.
#[derive(Debug, Default)]
pub struct Effects {
    /// Control frames for peers.
    pub send: Vec<(NodeId, Bytes)>,
    /// Changes of a peer's state, for the shard of their channel or the user registry.
    pub apply: Vec<(NodeId, Delta)>,
}

type ChannelKey = (String, String);

/// A replicated state, as sets (for diffing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Mirror {
    interest: BTreeSet<ChannelKey>,
    counts: BTreeMap<ChannelKey, usize>,
    members: BTreeMap<(String, String, String), Option<String>>,
    users: BTreeSet<ChannelKey>,
    /// XOR of hash64(app, channel) over `interest`.
    interest_hash: u64,
}

impl Mirror {
    fn apply(&mut self, d: &Delta) {
        match d {
            Delta::Interest { app, channel, add } => {
                let k = (app.clone(), channel.clone());
                let changed = if *add {
                    self.interest.insert(k)
                } else {
                    self.interest.remove(&k)
                };
                if changed {
                    self.interest_hash ^= hash64(&[app, channel]);
                }
            }
            Delta::Count {
                app,
                channel,
                count,
            } => {
                let k = (app.clone(), channel.clone());
                if *count == 0 {
                    self.counts.remove(&k);
                } else {
                    self.counts.insert(k, *count);
                }
            }
            Delta::Member {
                app,
                channel,
                user,
                info,
                add,
            } => {
                let k = (app.clone(), channel.clone(), user.clone());
                if *add {
                    self.members.insert(k, info.clone());
                } else {
                    self.members.remove(&k);
                }
            }
            Delta::User { app, user, online } => {
                let k = (app.clone(), user.clone());
                if *online {
                    self.users.insert(k);
                } else {
                    self.users.remove(&k);
                }
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            interest: self.interest.iter().cloned().collect(),
            members: self
                .members
                .iter()
                .map(|((a, c, u), i)| (a.clone(), c.clone(), u.clone(), i.clone()))
                .collect(),
            users: self.users.iter().cloned().collect(),
            counts: self
                .counts
                .iter()
                .map(|((a, c), n)| (a.clone(), c.clone(), *n))
                .collect(),
        }
    }

    fn from_snapshot(s: Snapshot) -> Self {
        let mut m = Self::default();
        for (app, channel) in s.interest {
            m.apply(&Delta::Interest {
                app,
                channel,
                add: true,
            });
        }
        for (app, channel, count) in s.counts {
            m.apply(&Delta::Count {
                app,
                channel,
                count,
            });
        }
        for (app, channel, user, info) in s.members {
            m.members.insert((app, channel, user), info);
        }
        m.users = s.users.into_iter().collect();
        m
    }

    /// The changes that turn `self` into `new`: removals first, then every
    /// addition of `new` (appliers are idempotent).
    fn diff(&self, new: &Self) -> Vec<Delta> {
        let mut out = Vec::new();
        for (app, channel, user) in self.members.keys() {
            if !new
                .members
                .contains_key(&(app.clone(), channel.clone(), user.clone()))
            {
                out.push(Delta::Member {
                    app: app.clone(),
                    channel: channel.clone(),
                    user: user.clone(),
                    info: None,
                    add: false,
                });
            }
        }
        for (app, user) in self.users.difference(&new.users) {
            out.push(Delta::User {
                app: app.clone(),
                user: user.clone(),
                online: false,
            });
        }
        for (app, channel) in self.interest.difference(&new.interest) {
            out.push(Delta::Interest {
                app: app.clone(),
                channel: channel.clone(),
                add: false,
            });
        }
        for (app, channel) in self.counts.keys() {
            if !new.counts.contains_key(&(app.clone(), channel.clone())) {
                out.push(Delta::Count {
                    app: app.clone(),
                    channel: channel.clone(),
                    count: 0,
                });
            }
        }
        for (app, channel) in &new.interest {
            out.push(Delta::Interest {
                app: app.clone(),
                channel: channel.clone(),
                add: true,
            });
        }
        for ((app, channel), count) in &new.counts {
            out.push(Delta::Count {
                app: app.clone(),
                channel: channel.clone(),
                count: *count,
            });
        }
        for ((app, channel, user), info) in &new.members {
            out.push(Delta::Member {
                app: app.clone(),
                channel: channel.clone(),
                user: user.clone(),
                info: info.clone(),
                add: true,
            });
        }
        for (app, user) in &new.users {
            out.push(Delta::User {
                app: app.clone(),
                user: user.clone(),
                online: true,
            });
        }
        out
    }
}

struct PeerState {
    epoch: u64,
    last_seq: u64,
    /// A resync was asked for and has not arrived yet.
    resync_pending: bool,
    held: Mirror,
}

/// The node's replication state machine.
pub struct Replicator {
    node: NodeId,
    epoch: u64,
    seq: u64,
    local: Mirror,
    peers: BTreeMap<NodeId, PeerState>,
}

impl Replicator {
    /// A node's replicator for incarnation `epoch`.
    pub fn new(node: NodeId, epoch: u64) -> Self {
        Self {
            node,
            epoch,
            seq: 0,
            local: Mirror::default(),
            peers: BTreeMap::new(),
        }
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Peers with a link up.
    pub fn peers(&self) -> BTreeSet<NodeId> {
        self.peers.keys().cloned().collect()
    }

    fn sync_frame(&self) -> Bytes {
        PeerFrame::Sync {
            epoch: self.epoch,
            seq: self.seq,
            state: self.local.snapshot(),
        }
        .encode()
    }

    /// A change of this node's own state: numbered and sent to every peer.
    pub fn local(&mut self, delta: Delta, out: &mut Effects) {
        self.seq += 1;
        self.local.apply(&delta);
        if self.peers.is_empty() {
            return;
        }
        let frame = PeerFrame::Delta {
            epoch: self.epoch,
            seq: self.seq,
            delta,
        }
        .encode();
        for p in self.peers.keys() {
            out.send.push((p.clone(), frame.clone()));
        }
    }

    /// A link to `peer` (incarnation `epoch`) is up: send it this node's state.
    pub fn peer_up(&mut self, peer: NodeId, epoch: u64, out: &mut Effects) {
        if self.peers.get(&peer).is_some_and(|p| p.epoch != epoch) {
            // A restart we did not see go down: forget the old incarnation.
            self.peer_down(&peer, out);
        }
        self.peers.entry(peer.clone()).or_insert(PeerState {
            epoch,
            last_seq: 0,
            resync_pending: false,
            held: Mirror::default(),
        });
        out.send.push((peer, self.sync_frame()));
    }

    /// The link to `peer` is gone, or the peer was declared dead: everything
    /// it held goes (its members leave, its users go offline).
    pub fn peer_down(&mut self, peer: &NodeId, out: &mut Effects) {
        let Some(p) = self.peers.remove(peer) else {
            return;
        };
        for d in p.held.diff(&Mirror::default()) {
            out.apply.push((peer.clone(), d));
        }
    }

    /// A control frame from `from` (`Sync`, `Delta`, `ResyncRequest`);
    /// other frames are not the replicator's and are ignored.
    pub fn handle(&mut self, from: &NodeId, frame: PeerFrame, out: &mut Effects) {
        let sync = self.sync_frame_if(matches!(frame, PeerFrame::ResyncRequest));
        let Some(peer) = self.peers.get_mut(from) else {
            tracing::debug!(peer = %from, "frame from a peer that is not up, ignored");
            return;
        };
        match frame {
            PeerFrame::Sync { epoch, seq, state } => {
                peer.epoch = epoch;
                peer.last_seq = seq;
                peer.resync_pending = false;
                let new = Mirror::from_snapshot(state);
                for d in peer.held.diff(&new) {
                    out.apply.push((from.clone(), d));
                }
                peer.held = new;
            }
            PeerFrame::Delta { epoch, seq, delta } => {
                if epoch != peer.epoch || seq <= peer.last_seq {
                    return;
                }
                if seq != peer.last_seq + 1 {
                    if !peer.resync_pending {
                        tracing::warn!(peer = %from, expected = peer.last_seq + 1, got = seq, "gap in peer deltas, asking for a resync");
                        peer.resync_pending = true;
                        out.send
                            .push((from.clone(), PeerFrame::ResyncRequest.encode()));
                    }
                    return;
                }
                peer.last_seq = seq;
                peer.held.apply(&delta);
                out.apply.push((from.clone(), delta));
            }
            PeerFrame::ResyncRequest => {
                if let Some(f) = sync {
                    out.send.push((from.clone(), f));
                }
            }
            _ => {}
        }
    }

    fn sync_frame_if(&self, yes: bool) -> Option<Bytes> {
        yes.then(|| self.sync_frame())
    }

    /// A constant-size digest of this node's interest for gossip: `epoch:seq:hash`.
    pub fn digest(&self) -> String {
        format!(
            "{}:{}:{:016x}",
            self.epoch, self.seq, self.local.interest_hash
        )
    }

    /// Compares a peer's gossiped digest with what this node holds of it;
    /// asks for a resync when they disagree at the same sequence number.
    /// Returns whether a resync was asked for.
    pub fn check_peer_digest(&mut self, peer: &NodeId, digest: &str, out: &mut Effects) -> bool {
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
        let Some(p) = self.peers.get_mut(peer) else {
            return false;
        };
        if p.epoch == epoch
            && p.last_seq == seq
            && p.held.interest_hash != hash
            && !p.resync_pending
        {
            tracing::warn!(peer = %peer, "interest digest mismatch, asking for a resync");
            p.resync_pending = true;
            out.send
                .push((peer.clone(), PeerFrame::ResyncRequest.encode()));
            return true;
        }
        false
    }
}
