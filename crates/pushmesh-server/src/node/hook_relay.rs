//! The driver's part of the webhook backup (`pushmesh_core::hook_backup`):
//! every webhook event this node schedules is handed to the channel's
//! backup peer; its delivery (or cancellation) is confirmed to that peer;
//! events held for a peer that is gone are put in this node's scheduler,
//! ready at once, with their original ids.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use pushmesh_core::hook_backup::{BackupStats, Released};
use pushmesh_core::{AppIdx, Apps, HookBackup, NodeId, PeerFrame};
use pushmesh_protocol::webhook::WebhookEvent;

use super::{lock, Links, Node};

/// The webhook backup of a node, behind its own small lock (taken once per
/// batch of webhook events, per confirmation, per peer change).
pub struct HookRelay {
    backup: Mutex<HookBackup>,
    apps: Arc<ArcSwap<Apps>>,
    /// Held events released but whose app this node does not serve.
    pub unknown_app: AtomicU64,
}

impl HookRelay {
    pub(super) fn new(node: NodeId, epoch: u64, apps: Arc<ArcSwap<Apps>>) -> Self {
        Self {
            backup: Mutex::new(HookBackup::new(node, epoch)),
            apps,
            unknown_app: AtomicU64::new(0),
        }
    }

    /// Counters, events handed and not yet confirmed, events held for peers.
    pub fn snapshot(&self) -> (BackupStats, usize, usize) {
        let b = lock(&self.backup);
        (b.stats(), b.handed_count(), b.held_count())
    }
}

fn peers(links: &Links) -> BTreeSet<NodeId> {
    lock(&links.replicator).peers()
}

fn send(links: &Links, frames: Vec<(NodeId, PeerFrame)>) {
    if let Some(c) = &links.cluster {
        for (to, f) in frames {
            c.send(&to, f.kind(), f.encode());
        }
    }
}

fn release(links: &Links, released: Vec<Released>) {
    if released.is_empty() {
        return;
    }
    let relay = &links.hook_relay;
    let n = released.len();
    {
        let mut h = lock(&links.hooks);
        for r in released {
            match relay.apps.load().by_id(&r.app) {
                Some(app) => h.push_held(r.id, app, r.event),
                None => {
                    relay.unknown_app.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    tracing::info!(
        events = n,
        "delivering webhook events held for a peer that is gone"
    );
    links.hook_ready.notify_one();
}

/// Events this node just scheduled (handed to their backups) and ids the
/// scheduler cancelled (confirmed, so backups forget them). Called with
/// the scheduler's lock held, so an event is handed before the pump can
/// deliver and confirm it (lock order: scheduler, then replicator or
/// backup; nothing takes them the other way round).
pub(super) fn scheduled(
    links: &Links,
    scheduled: Vec<(String, AppIdx, WebhookEvent)>,
    cancelled: Vec<String>,
) {
    if links.cluster.is_none() {
        return;
    }
    let peers = peers(links);
    let relay = &links.hook_relay;
    let mut out = Vec::new();
    {
        let apps = relay.apps.load();
        let mut b = lock(&relay.backup);
        for (id, app, event) in &scheduled {
            b.hand(id, &apps.get(*app).id, event, &peers, &mut out);
        }
        b.done(cancelled.iter().map(String::as_str), &mut out);
    }
    send(links, out);
}

/// Events delivered or given up by the webhook senders: confirmed to their backups.
pub fn delivered(links: &Links, ids: &[String]) {
    if links.cluster.is_none() || ids.is_empty() {
        return;
    }
    let mut out = Vec::new();
    lock(&links.hook_relay.backup).done(ids.iter().map(String::as_str), &mut out);
    send(links, out);
}

pub(super) fn peer_up(links: &Links, peer: &NodeId, epoch: u64) {
    let mut peers = peers(links);
    peers.insert(peer.clone());
    let mut out = Vec::new();
    let released = lock(&links.hook_relay.backup).peer_up(peer, epoch, &peers, &mut out);
    send(links, out);
    release(links, released);
}

pub(super) fn frame(links: &Links, from: &NodeId, frame: PeerFrame) {
    let released = lock(&links.hook_relay.backup).handle(Instant::now(), from, frame);
    release(links, released);
}

impl Node {
    /// `peer` is gone for good (declared dead by gossip, or left): the
    /// webhook events it held for this node go to another backup, and the
    /// events this node held for it are delivered from here.
    ///
    /// Called from [`Node::peer_gone`] (a link that only drops is not gone).
    pub fn hooks_peer_gone(&self, peer: &NodeId) {
        let mut peers = peers(&self.links);
        peers.remove(peer);
        let mut out = Vec::new();
        let released = lock(&self.links.hook_relay.backup).peer_gone(peer, &peers, &mut out);
        send(&self.links, out);
        release(&self.links, released);
    }
}
