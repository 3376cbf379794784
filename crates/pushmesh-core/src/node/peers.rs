//! The test driver's side of the cluster: peer links coming and going,
//! peer frames, the replicator's effects, and the subscription barrier
//! (held connections released once every peer acknowledged).

use std::time::Instant;

use bytes::Bytes;

use super::{CollectSink, Core, Output, BARRIER_WAIT};
use crate::machine::{copy_done_frames, split_apply, Released, ShardInput};
use crate::peer_frame::{FrameKind, NodeId, PeerFrame, PeerFrameError};
use crate::replication::Effects;
use crate::ConnId;

impl Core {
    /// Applies a peer's changes (before anything is acknowledged to the
    /// sender), then sends the replicator's frames and acknowledgements.
    pub(super) fn effects(&mut self, now: Instant, fx: Effects) {
        let split = split_apply(&self.apps, self.shards.len(), fx.apply);
        for (peer, d) in split.users {
            let mut sink = sink!(self);
            self.users.apply_remote(&peer, &d, &mut sink);
        }
        for (i, changes) in split.shards.into_iter().enumerate() {
            if !changes.is_empty() {
                let mut sink = sink!(self);
                self.shards[i].handle(now, ShardInput::Apply(changes), &mut sink);
            }
        }
        self.push_control(fx.send);
        self.push_control(fx.ack);
        self.flush_deltas();
    }

    pub(super) fn push_control(&mut self, frames: Vec<(NodeId, Bytes)>) {
        for (to, frame) in frames {
            self.out.push_back(Output::Peer {
                to,
                kind: FrameKind::Control,
                frame,
            });
        }
    }

    /// Ends the batch: this node's state changes numbered for the peers,
    /// its holds registered with the barrier, its webhook events out.
    pub(super) fn flush_deltas(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        let end = batch.end(
            self.now,
            Some(&mut self.replicator),
            &mut self.barrier,
            BARRIER_WAIT,
        );
        self.push_control(end.control);
        self.released(end.released);
        for (app, event) in end.hooks {
            self.out.push_back(Output::Hook { app, event });
        }
    }

    /// Lets held connections go once every peer acknowledged the changes
    /// they wait for (or their deadline passed).
    pub(super) fn release_barrier(&mut self) {
        if self.barrier.is_empty() {
            return;
        }
        let mut released = Vec::new();
        let acked = self.replicator.acked_by_all();
        self.barrier.release(self.now, acked, &mut released);
        self.released(released);
    }

    fn released(&mut self, released: Vec<Released<ConnId>>) {
        for r in released {
            if r.timed_out {
                self.barrier_timeouts += 1;
                self.timed_out.insert(r.conn);
            }
            self.release(r.conn);
        }
    }

    fn release(&mut self, conn: ConnId) {
        let Some(g) = self.gates.get_mut(&conn) else {
            return;
        };
        g.holds = g.holds.saturating_sub(1);
        if g.holds == 0 {
            if let Some(g) = self.gates.remove(&conn) {
                self.out.extend(g.frames);
            }
        }
    }

    /// Subscriptions whose barrier timed out (peers did not acknowledge in time).
    pub fn barrier_timeouts(&self) -> u64 {
        self.barrier_timeouts
    }

    /// Whether a barrier of this connection ever timed out.
    pub fn barrier_timed_out(&self, conn: ConnId) -> bool {
        self.timed_out.contains(&conn)
    }

    /// Every known peer with its link state.
    pub fn peer_links(&self) -> Vec<crate::replication::PeerLink> {
        self.replicator.links()
    }

    /// Peers with a link up.
    pub fn peers(&self) -> Vec<NodeId> {
        self.replicator.peers().into_iter().collect()
    }

    /// The peers with a link up changed: every shard learns it (and
    /// decides presence joins parked for an owner that is gone).
    pub(super) fn peers_changed(&mut self, now: Instant) {
        let peers = self.replicator.peers();
        let origins: Vec<_> = self
            .replicator
            .links()
            .iter()
            .map(|l| crate::history::Origin::of(l.node.as_str(), l.epoch))
            .collect();
        for i in 0..self.shards.len() {
            let mut sink = sink!(self);
            let input = ShardInput::Peers {
                peers: peers.clone(),
                origins: origins.clone(),
            };
            self.shards[i].handle(now, input, &mut sink);
        }
        self.users.set_peers(peers);
    }

    /// A link to `peer` (incarnation `epoch`) is up.
    pub fn peer_up(&mut self, now: Instant, peer: NodeId, epoch: u64) {
        self.now = self.now.max(now);
        // A new incarnation replaces the old one: the old is gone.
        let replaced = self
            .replicator
            .links()
            .into_iter()
            .find(|l| l.node == peer && l.epoch != epoch)
            .map(|l| crate::history::Origin::of(l.node.as_str(), l.epoch));
        self.backup_peer_up(&peer, epoch);
        let mut fx = Effects::default();
        self.replicator.peer_up(peer.clone(), epoch, &mut fx);
        self.peers_changed(now);
        self.effects(now, fx);
        let me = self.replicator.epoch();
        for (i, done) in copy_done_frames(me, self.shards.len())
            .into_iter()
            .enumerate()
        {
            let mut sink = sink!(self);
            let input = ShardInput::SendCache {
                peer: peer.clone(),
                epoch,
                done,
            };
            self.shards[i].handle(now, input, &mut sink);
            if let Some(origin) = replaced {
                self.shards[i].handle(now, ShardInput::ShareOrigin(origin), &mut sink);
            }
        }
        self.flush_deltas();
    }

    /// The link to `peer` is down: its state stays (it may come back).
    pub fn link_down(&mut self, _now: Instant, peer: &NodeId) {
        self.replicator.link_down(peer);
    }

    /// The peer is gone (declared dead or left): its state goes.
    pub fn peer_down(&mut self, now: Instant, peer: &NodeId) {
        let gone = self
            .replicator
            .links()
            .into_iter()
            .find(|l| l.node == *peer)
            .map(|l| crate::history::Origin::of(l.node.as_str(), l.epoch));
        self.now = self.now.max(now);
        let mut fx = Effects::default();
        self.replicator.peer_gone(peer, &mut fx);
        self.peers_changed(now);
        self.effects(now, fx);
        if let Some(origin) = gone {
            for i in 0..self.shards.len() {
                let mut sink = sink!(self);
                self.shards[i].handle(now, ShardInput::ShareOrigin(origin), &mut sink);
            }
        }
        self.peer_gone(peer);
        self.flush_deltas();
    }

    /// A frame from `from`. Undecodable frames are refused, never fatal.
    pub fn handle_peer_frame(
        &mut self,
        now: Instant,
        from: &NodeId,
        bytes: &[u8],
    ) -> Result<(), PeerFrameError> {
        let frame = PeerFrame::decode(bytes)?;
        self.now = self.now.max(now);
        if !self.replicator.peers().contains(from) {
            return Ok(());
        }
        // A channel's frame: its shard handles it.
        if let Some((app, channel)) = frame.channel() {
            let shard = self.apps.by_id(app).map(|a| self.shard(a, channel));
            if let Some(i) = shard {
                let mut sink = sink!(self);
                self.shards[i].handle(now, ShardInput::PeerFrame(frame), &mut sink);
                self.flush_deltas();
            }
            return Ok(());
        }
        match frame {
            PeerFrame::Terminate { app, user } => {
                if let Some(a) = self.apps.by_id(&app) {
                    let mut sink = sink!(self);
                    self.users.terminate_local(a, &user, &mut sink);
                }
            }
            PeerFrame::CopyDone {
                epoch,
                shard,
                shards,
            } => {
                // Everything before it is applied already (one thread).
                if self.replicator.copy_part(from, epoch, shard, shards) {
                    self.replicator.copied(from, epoch);
                }
            }
            hook @ (PeerFrame::HookHold { .. } | PeerFrame::HookDone { .. }) => {
                let released = self.hook_backup.handle(now, from, hook);
                self.push_released(released);
            }
            control => {
                let mut fx = Effects::default();
                self.replicator.handle(from, control, &mut fx);
                self.effects(now, fx);
                self.release_barrier();
            }
        }
        Ok(())
    }

    /// A constant-size digest of this node's interest for gossip.
    pub fn interest_digest(&self) -> String {
        self.replicator.digest()
    }

    /// Compares a peer's gossiped digest with what this node holds of it.
    pub fn check_peer_digest(&mut self, peer: &NodeId, digest: &str) -> bool {
        let mut fx = Effects::default();
        let r = self.replicator.check_peer_digest(peer, digest, &mut fx);
        self.effects(self.now, fx);
        r
    }
}
