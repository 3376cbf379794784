//! Replication of each node's own state to its peers, NATS-style: interest
//! (a channel's local subscriber count went 0→1 or N→0), presence members,
//! signed-in users and subscriber counts.
//!
//! The [`Replicator`] is the node's single sequencer. Shards and the user
//! registry hand it their changes ([`Replicator::local`]); it numbers them
//! (epoch, seq), keeps a mirror of the node's replicated state (so a sync
//! for a new link never has to visit the shards) and a mirror of what each
//! peer holds (so a peer's sync turns into exactly the per-channel changes
//! the shards must apply).
//!
//! - A sync is streamed in bounded `SyncChunk`s (a million channels link
//!   like ten) and applied when its last part arrives.
//! - A delta from another epoch or with an old number is ignored; a gap asks
//!   for one resync (and no more until it arrives).
//! - Every applied sync or delta is acknowledged (`StateAck`), so the node
//!   knows when every peer holds a change: the subscription barrier waits
//!   for [`Replicator::acked_by_all`] to pass the change's number.
//! - A link that goes down keeps the peer's state (its subscribers are
//!   still there; data for them is held and replayed); only
//!   [`Replicator::peer_gone`] (declared dead, or a new incarnation) drops it.
//!
//! Only state changes pass through here, never channel messages.

mod mirror;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::peer_frame::{Delta, NodeId, PeerFrame};
use mirror::Mirror;

/// Entries per `SyncChunk`.
pub const SYNC_CHUNK: usize = 4096;

/// What the driver must do after a call: frames to send, peer changes to apply.
#[derive(Debug, Default)]
pub struct Effects {
    /// Control frames for peers (in order, before anything else is sent).
    pub send: Vec<(NodeId, Bytes)>,
    /// Acknowledgements: sent once `apply` is done (a peer that reads one
    /// may rely on this node routing by the acknowledged state).
    pub ack: Vec<(NodeId, Bytes)>,
    /// Changes of a peer's state, for the shard of their channel or the user registry.
    pub apply: Vec<(NodeId, Delta)>,
}

struct PeerState {
    epoch: u64,
    last_seq: u64,
    /// A resync was asked for and has not arrived yet.
    resync_pending: bool,
    /// What this node holds of the peer's state.
    held: Mirror,
    /// A link is up.
    link: bool,
    /// A whole sync arrived on the current link.
    synced: bool,
    /// A sync being received: (epoch, seq, next part, parts so far).
    incoming: Option<(u64, u64, u32, Mirror)>,
    /// The last of this node's changes the peer acknowledged.
    acked: u64,
}

/// A peer as readiness sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLink {
    /// The peer.
    pub node: NodeId,
    /// Its incarnation.
    pub epoch: u64,
    /// A link is up.
    pub link: bool,
    /// Its whole state arrived on the current link.
    pub synced: bool,
    /// Its whole copy (cached events, history) of this incarnation
    /// arrived and was applied.
    pub copied: bool,
}

impl PeerLink {
    /// Whether this node reaches the peer: link up and its state synced.
    pub fn reached(&self) -> bool {
        self.link && self.synced
    }
}

/// The node's replication state machine.
pub struct Replicator {
    node: NodeId,
    epoch: u64,
    seq: u64,
    local: Mirror,
    peers: BTreeMap<NodeId, PeerState>,
    /// Syncs sent (link up or resync asked).
    syncs_sent: u64,
    /// Each peer's copy: its incarnation, the parts (shards) that arrived,
    /// and whether it is complete and applied. Apart from the peer's
    /// state, so a part that arrives before the link is counted here is kept.
    copies: BTreeMap<NodeId, PeerCopy>,
}

/// What arrived of a peer incarnation's copy (see [`PeerFrame::CopyDone`]).
#[derive(Debug, Default)]
struct PeerCopy {
    epoch: u64,
    parts: BTreeSet<u32>,
    applied: bool,
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
            syncs_sent: 0,
            copies: BTreeMap::new(),
        }
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// This node's incarnation.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Peers whose state this node holds (link up, or briefly down).
    pub fn peers(&self) -> BTreeSet<NodeId> {
        self.peers.keys().cloned().collect()
    }

    /// Every known peer with its link state.
    pub fn links(&self) -> Vec<PeerLink> {
        self.peers
            .iter()
            .map(|(n, p)| PeerLink {
                node: n.clone(),
                epoch: p.epoch,
                link: p.link,
                synced: p.synced,
                copied: self
                    .copies
                    .get(n)
                    .is_some_and(|c| c.epoch == p.epoch && c.applied),
            })
            .collect()
    }

    /// This node's last change number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Syncs sent so far.
    pub fn syncs_sent(&self) -> u64 {
        self.syncs_sent
    }

    /// The last change every known peer acknowledged (this node's own
    /// number when it has no peers).
    pub fn acked_by_all(&self) -> u64 {
        self.peers
            .values()
            .map(|p| p.acked)
            .min()
            .unwrap_or(self.seq)
    }

    fn push_sync(&mut self, to: &NodeId, out: &mut Effects) {
        self.syncs_sent += 1;
        let parts = self.local.chunks(SYNC_CHUNK);
        let n = parts.len();
        for (i, state) in parts.into_iter().enumerate() {
            let f = PeerFrame::SyncChunk {
                epoch: self.epoch,
                seq: self.seq,
                index: i as u32,
                last: i + 1 == n,
                state,
            };
            out.send.push((to.clone(), f.encode()));
        }
    }

    /// A change of this node's own state: numbered and sent to every peer
    /// with a link up (the others get a sync when their link comes back).
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
        for (p, st) in &self.peers {
            if st.link {
                out.send.push((p.clone(), frame.clone()));
            }
        }
    }

    /// A link to `peer` (incarnation `epoch`) is up: send it this node's
    /// state. A new incarnation replaces the old one (whose state goes).
    pub fn peer_up(&mut self, peer: NodeId, epoch: u64, out: &mut Effects) {
        if self.peers.get(&peer).is_some_and(|p| p.epoch != epoch) {
            self.peer_gone(&peer, out);
        }
        let p = self.peers.entry(peer.clone()).or_insert(PeerState {
            epoch,
            last_seq: 0,
            resync_pending: false,
            held: Mirror::default(),
            link: false,
            synced: false,
            incoming: None,
            acked: 0,
        });
        p.link = true;
        p.synced = false;
        p.incoming = None;
        p.resync_pending = false;
        self.push_sync(&peer, out);
    }

    /// A part of `from`'s copy arrived (`PeerFrame::CopyDone`): true once
    /// every part of incarnation `epoch` has. The driver then makes sure
    /// the frames before them are applied and calls [`Replicator::copied`].
    pub fn copy_part(&mut self, from: &NodeId, epoch: u64, shard: u32, shards: u32) -> bool {
        let c = self.copies.entry(from.clone()).or_default();
        if epoch < c.epoch {
            return false; // an older incarnation's part, late
        }
        if c.epoch != epoch {
            *c = PeerCopy {
                epoch,
                ..PeerCopy::default()
            };
        }
        if shard < shards {
            c.parts.insert(shard);
        }
        shards > 0 && !c.applied && c.parts.len() >= shards as usize
    }

    /// `from`'s copy of incarnation `epoch` is applied.
    pub fn copied(&mut self, from: &NodeId, epoch: u64) {
        if let Some(c) = self.copies.get_mut(from).filter(|c| c.epoch == epoch) {
            c.applied = true;
        }
    }

    /// The link to `peer` is down; its state stays (it may come back).
    pub fn link_down(&mut self, peer: &NodeId) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.link = false;
            p.synced = false;
            p.incoming = None;
        }
    }

    /// The peer is gone (declared dead, left, or restarted): everything it
    /// held goes (its members leave, its users go offline).
    pub fn peer_gone(&mut self, peer: &NodeId, out: &mut Effects) {
        let Some(p) = self.peers.remove(peer) else {
            return;
        };
        for d in p.held.diff(&Mirror::default()) {
            out.apply.push((peer.clone(), d));
        }
    }

    /// A control frame from `from` (`SyncChunk`, `Delta`, `StateAck`,
    /// `ResyncRequest`); other frames are not the replicator's and are ignored.
    pub fn handle(&mut self, from: &NodeId, frame: PeerFrame, out: &mut Effects) {
        let (my_epoch, my_seq) = (self.epoch, self.seq);
        let Some(peer) = self.peers.get_mut(from) else {
            tracing::debug!(peer = %from, "frame from a peer that is not up, ignored");
            return;
        };
        match frame {
            PeerFrame::SyncChunk {
                epoch,
                seq,
                index,
                last,
                state,
            } => {
                let fits = matches!(&peer.incoming, Some((e, s, next, _)) if *e == epoch && *s == seq && *next == index);
                if index == 0 {
                    peer.incoming = Some((epoch, seq, 0, Mirror::default()));
                } else if !fits {
                    // A part is missing (a frame was dropped): start over.
                    peer.incoming = None;
                    if !peer.resync_pending {
                        peer.resync_pending = true;
                        out.send
                            .push((from.clone(), PeerFrame::ResyncRequest.encode()));
                    }
                    return;
                }
                let Some((_, _, next, m)) = peer.incoming.as_mut() else {
                    return;
                };
                m.absorb(state);
                *next += 1;
                if !last {
                    return;
                }
                let Some((_, _, _, new)) = peer.incoming.take() else {
                    return;
                };
                peer.epoch = epoch;
                peer.last_seq = seq;
                peer.resync_pending = false;
                peer.synced = true;
                for d in peer.held.diff(&new) {
                    out.apply.push((from.clone(), d));
                }
                peer.held = new;
                out.ack
                    .push((from.clone(), PeerFrame::StateAck { epoch, seq }.encode()));
            }
            PeerFrame::Delta { epoch, seq, delta } => {
                if epoch != peer.epoch || seq <= peer.last_seq || !peer.synced {
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
                out.ack
                    .push((from.clone(), PeerFrame::StateAck { epoch, seq }.encode()));
            }
            PeerFrame::StateAck { epoch, seq } if epoch == my_epoch && seq > peer.acked => {
                peer.acked = seq.min(my_seq);
            }
            PeerFrame::ResyncRequest if peer.link => self.push_sync(from, out),
            _ => {}
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn copied(r: &Replicator, peer: &str) -> bool {
        r.links()
            .iter()
            .any(|l| l.node.as_str() == peer && l.copied)
    }

    #[test]
    fn a_peer_copy_counts_once_every_part_of_its_incarnation_arrived() {
        let mut r = Replicator::new(NodeId::new("a"), 1);
        let b = NodeId::new("b");
        r.peer_up(b.clone(), 7, &mut Effects::default());
        assert!(!copied(&r, "b"));
        // Parts of three, one twice, one of an older incarnation.
        assert!(!r.copy_part(&b, 7, 0, 3));
        assert!(!r.copy_part(&b, 7, 0, 3));
        assert!(!r.copy_part(&b, 6, 1, 3));
        assert!(!r.copy_part(&b, 7, 2, 3));
        assert!(r.copy_part(&b, 7, 1, 3), "the last part completes it");
        // Not applied until the driver says so.
        assert!(!copied(&r, "b"));
        r.copied(&b, 7);
        assert!(copied(&r, "b"));
        assert!(!r.copy_part(&b, 7, 1, 3), "complete once");
        // A link flap to the same incarnation keeps it.
        r.link_down(&b);
        r.peer_up(b.clone(), 7, &mut Effects::default());
        assert!(copied(&r, "b"));
        // A new incarnation starts again, whatever arrived before.
        r.peer_up(b.clone(), 8, &mut Effects::default());
        assert!(!copied(&r, "b"));
        r.copied(&b, 7);
        assert!(!copied(&r, "b"), "an old incarnation's copy does not count");
        // A part that arrives before the link is counted is kept.
        let c = NodeId::new("c");
        assert!(r.copy_part(&c, 3, 0, 1));
        r.copied(&c, 3);
        r.peer_up(c, 3, &mut Effects::default());
        assert!(copied(&r, "c"));
    }

    #[test]
    fn a_part_out_of_range_never_completes_a_copy() {
        let mut r = Replicator::new(NodeId::new("a"), 1);
        let b = NodeId::new("b");
        assert!(!r.copy_part(&b, 1, 5, 2));
        assert!(!r.copy_part(&b, 1, 0, 0));
        assert!(!r.copy_part(&b, 1, 0, 2));
        assert!(r.copy_part(&b, 1, 1, 2));
    }
}
