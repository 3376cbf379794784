//! Webhooks that survive their owner's crash: the owner of a channel's
//! webhooks (rendezvous hashing, `routing.rs`) hands every event it
//! schedules to a backup, the next node in rendezvous order for that
//! channel, and tells the backup once the event is delivered (or cancelled).
//! The backup holds the events (bounded) and, when the owner is gone
//! (declared dead, or back with a new epoch), releases them for delivery.
//!
//! Both roles are in [`HookBackup`], which does no I/O: frames to send are
//! pushed to an `out` list, released events are returned. An event keeps
//! its id (`<owner>:<epoch>:<n>`, see `webhooks.rs`) on the backup, so a
//! receiver can drop the duplicates this allows: an event the owner
//! delivered but whose `HookDone` did not reach the backup before the owner
//! went is sent twice.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use pushmesh_protocol::webhook::WebhookEvent;

use crate::peer_frame::{NodeId, PeerFrame};
use crate::routing::hash64;

/// Events an owner keeps handed to backups at once; beyond, not backed up (counted).
pub const MAX_HANDED: usize = 65_536;
/// Events a backup holds at once, all owners together; beyond, refused (counted).
pub const MAX_HELD: usize = 65_536;
/// A held event whose owner never confirmed it is forgotten after this (counted).
pub const HELD_TTL: Duration = Duration::from_secs(600);

/// The backup of `(app_id, channel)` for `node`: the peer ranked first by
/// rendezvous hashing once `node` is left out, so the node that becomes
/// the channel's owner when `node` goes. `None` without peers.
pub fn backup_for(
    node: &NodeId,
    peers: &BTreeSet<NodeId>,
    app_id: &str,
    channel: &str,
) -> Option<NodeId> {
    peers
        .iter()
        .filter(|p| *p != node)
        .max_by_key(|p| (hash64(&[p.as_str(), app_id, channel]), *p))
        .cloned()
}

/// An event a backup released: deliver it (its owner is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Stable id, as the owner gave it.
    pub id: String,
    /// App id.
    pub app: String,
    /// The event.
    pub event: WebhookEvent,
}

/// Counters of [`HookBackup`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackupStats {
    /// Events handed to a backup (owner side).
    pub handed: u64,
    /// Events not handed: too many outstanding (owner side).
    pub not_handed: u64,
    /// Events taken to hold (backup side).
    pub held: u64,
    /// Held events released for delivery (backup side).
    pub released: u64,
    /// Held events refused: the backup was full, or the event unreadable.
    pub refused: u64,
    /// Held events forgotten after [`HELD_TTL`] without a word from the owner.
    pub expired: u64,
}

#[derive(Debug)]
struct Handed {
    app: String,
    channel: String,
    event: String,
    backup: Option<NodeId>,
}

#[derive(Debug)]
struct HeldEvent {
    app: String,
    event: String,
}

#[derive(Debug, Default)]
struct HeldFrom {
    epoch: u64,
    events: HashMap<String, HeldEvent>,
    /// Ids by arrival, for expiry (ids already confirmed are skipped).
    order: VecDeque<(Instant, String)>,
}

/// Both roles of the webhook backup; see the module docs.
#[derive(Debug)]
pub struct HookBackup {
    node: NodeId,
    epoch: u64,
    handed: HashMap<String, Handed>,
    held: HashMap<NodeId, HeldFrom>,
    held_total: usize,
    stats: BackupStats,
}

fn hold_frame(epoch: u64, id: &str, h: &Handed) -> PeerFrame {
    PeerFrame::HookHold {
        epoch,
        id: id.to_owned(),
        app: h.app.clone(),
        channel: h.channel.clone(),
        event: h.event.clone(),
    }
}

impl HookBackup {
    /// The backup state of `node`, incarnation `epoch`.
    pub fn new(node: NodeId, epoch: u64) -> Self {
        Self {
            node,
            epoch,
            handed: HashMap::new(),
            held: HashMap::new(),
            held_total: 0,
            stats: BackupStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> BackupStats {
        self.stats
    }

    /// Events handed to backups and not yet confirmed (owner side).
    pub fn handed_count(&self) -> usize {
        self.handed.len()
    }

    /// Events held for other owners (backup side).
    pub fn held_count(&self) -> usize {
        self.held_total
    }

    /// Owner side: an event this node scheduled under `id`; hands it to the
    /// channel's backup among `peers`.
    pub fn hand(
        &mut self,
        id: &str,
        app_id: &str,
        event: &WebhookEvent,
        peers: &BTreeSet<NodeId>,
        out: &mut Vec<(NodeId, PeerFrame)>,
    ) {
        if self.handed.len() >= MAX_HANDED {
            self.stats.not_handed += 1;
            return;
        }
        let Ok(json) = serde_json::to_string(event) else {
            self.stats.not_handed += 1;
            return;
        };
        let channel = event.channel().to_owned();
        let backup = backup_for(&self.node, peers, app_id, &channel);
        let h = Handed {
            app: app_id.to_owned(),
            channel,
            event: json,
            backup,
        };
        if let Some(b) = &h.backup {
            out.push((b.clone(), hold_frame(self.epoch, id, &h)));
            self.stats.handed += 1;
        }
        self.handed.insert(id.to_owned(), h);
    }

    /// Owner side: events delivered (or given up, or cancelled): their
    /// backups may forget them.
    pub fn done<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a str>,
        out: &mut Vec<(NodeId, PeerFrame)>,
    ) {
        let mut by_backup: HashMap<NodeId, Vec<String>> = HashMap::new();
        for id in ids {
            if let Some(Handed {
                backup: Some(b), ..
            }) = self.handed.remove(id)
            {
                by_backup.entry(b).or_default().push(id.to_owned());
            }
        }
        let mut v: Vec<_> = by_backup.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        for (b, ids) in v {
            out.push((b, PeerFrame::HookDone { ids }));
        }
    }

    /// A link to `peer` (incarnation `epoch`) is up; `peers` includes it.
    /// Owner side: events it backs up are handed again (it may have
    /// restarted), events without a backup get one. Backup side: events
    /// held from an earlier incarnation of `peer` are released.
    pub fn peer_up(
        &mut self,
        peer: &NodeId,
        epoch: u64,
        peers: &BTreeSet<NodeId>,
        out: &mut Vec<(NodeId, PeerFrame)>,
    ) -> Vec<Released> {
        self.rehand(|b| b.is_none_or(|b| b == peer), peers, out);
        match self.held.get(peer) {
            Some(h) if h.epoch != epoch => self.release(peer),
            _ => Vec::new(),
        }
    }

    /// `peer` is gone for good (declared dead); `peers` no longer holds it.
    /// Owner side: the events it backed up go to their next backup. Backup
    /// side: everything held for it is released.
    pub fn peer_gone(
        &mut self,
        peer: &NodeId,
        peers: &BTreeSet<NodeId>,
        out: &mut Vec<(NodeId, PeerFrame)>,
    ) -> Vec<Released> {
        self.rehand(|b| b.is_some_and(|b| b == peer), peers, out);
        self.release(peer)
    }

    fn rehand(
        &mut self,
        which: impl Fn(Option<&NodeId>) -> bool,
        peers: &BTreeSet<NodeId>,
        out: &mut Vec<(NodeId, PeerFrame)>,
    ) {
        let mut ids: Vec<&String> = self
            .handed
            .iter()
            .filter(|(_, h)| which(h.backup.as_ref()))
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        let ids: Vec<String> = ids.into_iter().cloned().collect();
        for id in ids {
            if let Some(h) = self.handed.get_mut(&id) {
                h.backup = backup_for(&self.node, peers, &h.app, &h.channel);
                if let Some(b) = &h.backup {
                    out.push((b.clone(), hold_frame(self.epoch, &id, h)));
                    self.stats.handed += 1;
                }
            }
        }
    }

    fn release(&mut self, owner: &NodeId) -> Vec<Released> {
        let Some(from) = self.held.remove(owner) else {
            return Vec::new();
        };
        self.held_total -= from.events.len();
        let mut events = from.events;
        let mut out = Vec::new();
        // In the order the owner handed them.
        for (_, id) in from.order {
            if let Some(e) = events.remove(&id) {
                match serde_json::from_str::<WebhookEvent>(&e.event) {
                    Ok(event) => out.push(Released {
                        id,
                        app: e.app,
                        event,
                    }),
                    Err(_) => self.stats.refused += 1,
                }
            }
        }
        self.stats.released += out.len() as u64;
        out
    }

    fn expire(&mut self, now: Instant) {
        for from in self.held.values_mut() {
            while let Some((at, id)) = from.order.front() {
                if now.saturating_duration_since(*at) < HELD_TTL {
                    break;
                }
                if from.events.remove(id).is_some() {
                    self.held_total -= 1;
                    self.stats.expired += 1;
                }
                from.order.pop_front();
            }
        }
        self.held
            .retain(|_, f| !f.order.is_empty() || !f.events.is_empty());
    }

    /// Backup side: a `HookHold` or `HookDone` from `from` (other frames are
    /// ignored). A hold from a newer incarnation of `from` releases what the
    /// older one left.
    pub fn handle(&mut self, now: Instant, from: &NodeId, frame: PeerFrame) -> Vec<Released> {
        match frame {
            PeerFrame::HookHold {
                epoch,
                id,
                app,
                channel: _,
                event,
            } => {
                self.expire(now);
                let released = match self.held.get(from) {
                    Some(h) if h.epoch < epoch => self.release(from),
                    // A late hold from an earlier incarnation: it is gone.
                    Some(h) if h.epoch > epoch => return Vec::new(),
                    _ => Vec::new(),
                };
                let h = self.held.entry(from.clone()).or_insert_with(|| HeldFrom {
                    epoch,
                    ..HeldFrom::default()
                });
                if h.events.contains_key(&id) {
                    return released;
                }
                if self.held_total >= MAX_HELD {
                    self.stats.refused += 1;
                    return released;
                }
                h.order.push_back((now, id.clone()));
                h.events.insert(id, HeldEvent { app, event });
                self.held_total += 1;
                self.stats.held += 1;
                released
            }
            PeerFrame::HookDone { ids } => {
                if let Some(h) = self.held.get_mut(from) {
                    for id in ids {
                        if h.events.remove(&id).is_some() {
                            self.held_total -= 1;
                        }
                    }
                    // Confirmed ids stay in `order` until they expire or are
                    // released; compact when most of it is stale.
                    if h.order.len() > 64 && h.order.len() > 2 * h.events.len() {
                        let events = &h.events;
                        h.order.retain(|(_, id)| events.contains_key(id));
                    }
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
