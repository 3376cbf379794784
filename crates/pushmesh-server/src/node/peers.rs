//! The node's side of the cluster: peer links coming and going, peer
//! frames, and the replicator's effects applied on the shards (in batches)
//! before they are acknowledged.

use std::sync::atomic::Ordering;
use std::time::Instant;

use pushmesh_core::history::Origin;
use pushmesh_core::machine::{copy_done_frames, split_apply, ShardInput};
use pushmesh_core::{Effects, NodeId, PeerFrame, PeerLink, Replicator};

use super::{hook_relay, lock, send_control, Cmd, Node};

impl Node {
    /// Peers with a link up, as the replicator knows them.
    pub fn peers(&self) -> Vec<NodeId> {
        lock(&self.links.replicator).peers().into_iter().collect()
    }

    /// This node's interest digest for gossip.
    pub fn digest(&self) -> String {
        lock(&self.links.replicator).digest()
    }

    /// Runs `f` on the replicator and sends its frames under its lock, so
    /// numbered changes and syncs reach every link in their order.
    fn with_replicator(&self, f: impl FnOnce(&mut Replicator, &mut Effects)) -> Effects {
        let mut fx = Effects::default();
        let mut r = lock(&self.links.replicator);
        f(&mut r, &mut fx);
        send_control(&self.links, std::mem::take(&mut fx.send));
        // Counted under the lock: whoever sees the new state in the
        // replicator also sees that its changes are still being applied.
        self.applying.fetch_add(1, Ordering::AcqRel);
        fx
    }

    /// Whether peers' changes are being handed to the shards right now.
    pub fn applying(&self) -> bool {
        self.applying.load(Ordering::Acquire) > 0
    }

    /// Applies a peer's changes on the shards and the user registry, then
    /// acknowledges them (the ack promises they are applied: a publish the
    /// peer then routes here queues behind them on the same shard).
    async fn effects(&self, fx: Effects, peers_changed: bool) {
        if peers_changed {
            let (peers, origins) = {
                let r = lock(&self.links.replicator);
                let origins: Vec<Origin> = r
                    .links()
                    .iter()
                    .map(|l| Origin::of(l.node.as_str(), l.epoch))
                    .collect();
                (r.peers(), origins)
            };
            for s in &self.shards {
                let input = ShardInput::Peers {
                    peers: peers.clone(),
                    origins: origins.clone(),
                };
                let _ = s.send(Cmd::Input(input)).await;
            }
            lock(&self.users).set_peers(peers);
        }
        // In batches per shard: a sync of a million channels is a million
        // changes, not a million commands.
        const APPLY_BATCH: usize = 1024;
        let split = split_apply(&self.apps(), self.shards.len(), fx.apply);
        for (peer, d) in split.users {
            self.with_users(|u, sink| u.apply_remote(&peer, &d, sink));
        }
        for (shard, mut changes) in self.shards.iter().zip(split.shards) {
            while !changes.is_empty() {
                let rest = changes.split_off(changes.len().min(APPLY_BATCH));
                let _ = shard.send(Cmd::Input(ShardInput::Apply(changes))).await;
                changes = rest;
            }
        }
        send_control(&self.links, fx.ack);
        self.applying.fetch_sub(1, Ordering::AcqRel);
        self.links.release_barrier(Instant::now());
    }

    /// A link to `peer` (incarnation `epoch`) is up: this node's state and
    /// its cached events go to it.
    pub async fn peer_up(&self, peer: NodeId, epoch: u64) {
        // A new incarnation replaces the old one: the old is gone.
        let replaced = self
            .peer_links()
            .into_iter()
            .find(|l| l.node == peer && l.epoch != epoch)
            .map(|l| Origin::of(l.node.as_str(), l.epoch));
        hook_relay::peer_up(&self.links, &peer, epoch);
        let fx = self.with_replicator(|r, fx| r.peer_up(peer.clone(), epoch, fx));
        self.effects(fx, true).await;
        let me = lock(&self.links.replicator).epoch();
        let parts = copy_done_frames(me, self.shards.len());
        for (s, done) in self.shards.iter().zip(parts) {
            // Each shard ends what it sends with its part of `CopyDone`.
            let input = ShardInput::SendCache {
                peer: peer.clone(),
                epoch,
                done,
            };
            let _ = s.send(Cmd::Input(input)).await;
            if let Some(origin) = replaced {
                let _ = s.send(Cmd::Input(ShardInput::ShareOrigin(origin))).await;
            }
        }
    }

    /// The link to `peer` is down; its state stays, frames for it are held.
    pub fn link_down(&self, peer: &NodeId) {
        lock(&self.links.replicator).link_down(peer);
    }

    /// The peer is gone (declared dead, left, or restarted): its state
    /// goes, and webhook events it owned and this node holds are released.
    pub async fn peer_gone(&self, peer: &NodeId) {
        let gone = self
            .peer_links()
            .into_iter()
            .find(|l| l.node == *peer)
            .map(|l| Origin::of(l.node.as_str(), l.epoch));
        let fx = self.with_replicator(|r, fx| r.peer_gone(peer, fx));
        self.effects(fx, true).await;
        if let Some(origin) = gone {
            // The survivors exchange what they hold of its history.
            for s in &self.shards {
                let _ = s.send(Cmd::Input(ShardInput::ShareOrigin(origin))).await;
            }
        }
        self.hooks_peer_gone(peer);
    }

    /// Peers as readiness sees them.
    pub fn peer_links(&self) -> Vec<PeerLink> {
        lock(&self.links.replicator).links()
    }

    /// A frame from a peer. Undecodable frames are refused, never fatal.
    /// The admin API's frames (`Apps`, `AppStats*`) are given back: the
    /// server's `apps` module handles them.
    pub async fn peer_frame(
        &self,
        from: &NodeId,
        bytes: &[u8],
    ) -> Result<Option<PeerFrame>, pushmesh_core::PeerFrameError> {
        let frame = PeerFrame::decode(bytes)?;
        if matches!(
            frame,
            PeerFrame::Apps(_) | PeerFrame::AppStatsAsk { .. } | PeerFrame::AppStatsReply { .. }
        ) {
            return Ok(Some(frame));
        }
        // A channel's frame: its shard handles it.
        if let Some((app, channel)) = frame.channel() {
            if let Some(a) = self.apps().by_id(app) {
                // A closed queue means the node is stopping.
                let shard = self.shard(a, channel).clone();
                let _ = shard.send(Cmd::Input(ShardInput::PeerFrame(frame))).await;
            }
            return Ok(None);
        }
        match frame {
            PeerFrame::Terminate { app, user } => {
                if let Some(a) = self.apps().by_id(&app) {
                    self.with_users(|u, sink| u.terminate_local(a, &user, sink));
                }
            }
            PeerFrame::CopyDone {
                epoch,
                shard,
                shards,
            } => {
                let complete = lock(&self.links.replicator).copy_part(from, epoch, shard, shards);
                if complete {
                    // The frames before it were handed to the shards: once
                    // each has answered a query queued behind them, they are
                    // applied. Waited for in a task of its own, so the
                    // peers' frames keep flowing meanwhile (a big sync's
                    // changes may still be queued on the shards).
                    let (shards, links, from) =
                        (self.shards.clone(), self.links.clone(), from.clone());
                    tokio::spawn(async move {
                        for s in &shards {
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            let q: super::Query = Box::new(move |_, _| {
                                let _ = tx.send(());
                            });
                            if s.send(Cmd::Query(q)).await.is_ok() {
                                let _ = rx.await;
                            }
                        }
                        lock(&links.replicator).copied(&from, epoch);
                    });
                }
            }
            hook @ (PeerFrame::HookHold { .. } | PeerFrame::HookDone { .. }) => {
                hook_relay::frame(&self.links, from, hook);
            }
            control => {
                let fx = self.with_replicator(|r, fx| r.handle(from, control, fx));
                self.effects(fx, false).await;
            }
        }
        Ok(None)
    }

    /// Compares a peer's gossiped digest with what this node holds of it.
    pub fn check_peer_digest(&self, peer: &NodeId, digest: &str) {
        self.with_replicator(|r, fx| {
            r.check_peer_digest(peer, digest, fx);
        });
        self.applying.fetch_sub(1, Ordering::AcqRel);
    }
}
