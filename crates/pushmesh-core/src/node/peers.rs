//! The test driver's side of the cluster: peer links coming and going,
//! peer frames, the replicator's effects, and the subscription barrier
//! (held connections released once every peer acknowledged).

use std::time::Instant;

use bytes::Bytes;

use super::{CollectSink, Core, Output, BARRIER_TICKS};
use crate::peer_frame::{Delta, FrameKind, NodeId, PeerFrame, PeerFrameError};
use crate::replication::Effects;
use crate::routing::shard_of;
use crate::sink::Sink;
use crate::ConnId;

impl Core {
    pub(super) fn effects(&mut self, fx: Effects) {
        // Applied before anything is acknowledged to the sender.
        for (peer, d) in fx.apply {
            let mut sink = sink!(self);
            if matches!(d, Delta::User { .. }) {
                self.users.apply_remote(&peer, &d, &mut sink);
            } else if let (Some(app), Some(ch)) = (self.apps.by_id(d.app()), d.channel()) {
                let i = shard_of(app, ch, self.shards.len());
                self.shards[i].apply_remote(&peer, d, &mut sink);
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

    /// Numbers this node's own state changes and queues them for the peers
    /// (the replicator's `local` never yields changes to apply here).
    pub(super) fn flush_deltas(&mut self) {
        if !self.deltas.is_empty() {
            let mut fx = Effects::default();
            for d in std::mem::take(&mut self.deltas) {
                self.replicator.local(d, &mut fx);
            }
            self.push_control(fx.send);
        }
        let seq = self.replicator.seq();
        for conn in std::mem::take(&mut self.held) {
            self.waiters.push((seq, 0, conn));
        }
        self.release_barrier();
    }

    /// Lets held connections go once every peer acknowledged the changes
    /// they wait for (or they waited `BARRIER_TICKS`).
    pub(super) fn release_barrier(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let acked = self.replicator.acked_by_all();
        let mut i = 0;
        while i < self.waiters.len() {
            let (seq, ticks, conn) = self.waiters[i];
            if seq <= acked || ticks >= BARRIER_TICKS {
                if seq > acked {
                    self.barrier_timeouts += 1;
                    self.timed_out.insert(conn);
                }
                self.waiters.swap_remove(i);
                self.release(conn);
            } else {
                i += 1;
            }
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

    pub(super) fn peers_changed(&mut self) {
        let peers = self.replicator.peers();
        let origins: Vec<_> = self
            .replicator
            .links()
            .iter()
            .map(|l| crate::history::Origin::of(l.node.as_str(), l.epoch))
            .collect();
        for s in &mut self.shards {
            s.set_peers(peers.clone());
            s.set_live_origins(origins.clone());
        }
        self.users.set_peers(peers);
    }

    /// A link to `peer` (incarnation `epoch`) is up.
    pub fn peer_up(&mut self, now: Instant, peer: NodeId, epoch: u64) {
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
        self.peers_changed();
        self.effects(fx);
        let shards = self.shards.len() as u32;
        let me = self.replicator.epoch();
        for i in 0..self.shards.len() {
            let mut sink = sink!(self);
            self.shards[i].send_cache(now, &peer, &mut sink);
            self.shards[i].send_history(now, &peer, epoch, &mut sink);
            let done = PeerFrame::CopyDone {
                epoch: me,
                shard: i as u32,
                shards,
            };
            sink.peer(&peer, FrameKind::Data, &done.encode());
            if let Some(origin) = replaced {
                self.shards[i].share_origin(now, origin, &mut sink);
            }
        }
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
        let mut fx = Effects::default();
        self.replicator.peer_gone(peer, &mut fx);
        self.peers_changed();
        self.effects(fx);
        if let Some(origin) = gone {
            for i in 0..self.shards.len() {
                let mut sink = sink!(self);
                self.shards[i].share_origin(now, origin, &mut sink);
            }
        }
        self.peer_gone(peer);
        self.presence_peers_changed(now);
    }

    /// A frame from `from`. Undecodable frames are refused, never fatal.
    pub fn handle_peer_frame(
        &mut self,
        now: Instant,
        from: &NodeId,
        bytes: &[u8],
    ) -> Result<(), PeerFrameError> {
        let frame = PeerFrame::decode(bytes)?;
        if !self.replicator.peers().contains(from) {
            return Ok(());
        }
        // A channel's frame: its shard handles it.
        if let Some((app, channel)) = frame.channel() {
            let shard = self.apps.by_id(app).map(|a| self.shard(a, channel));
            if let Some(i) = shard {
                let mut sink = sink!(self);
                self.shards[i].handle_channel_frame(now, frame, &mut sink);
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
                self.effects(fx);
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
        self.effects(fx);
        r
    }
}
