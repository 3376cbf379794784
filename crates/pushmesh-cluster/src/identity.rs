//! Loud identity errors: another live node gossiping under this node's
//! `node_id`, and gossip sealed with another cluster secret.
//!
//! chitchat keys a node by its whole `ChitchatId` (node id, generation,
//! gossip address), so a second process started with our node id is, to
//! chitchat, just another node: nothing in chitchat warns. We look at the
//! live nodes after every membership round for a `ChitchatId` that carries
//! our node id but is not ours.
//!
//! A previous incarnation of this node (restarted with the same id) is not
//! a conflict: its heartbeat is frozen, and chitchat never calls a node
//! with fewer than two distinct heartbeats live. Because peers that lag a
//! round can still hand us two or three stale heartbeats of that old
//! incarnation, a holder counts as a conflict only once we saw its
//! heartbeat advance [`MIN_ADVANCES`] times over at least the confirmation
//! time (a few gossip intervals): only a running process does that.
//!
//! The trackers here take `now` and do no I/O; [`Cluster::identity_conflicts`]
//! and the membership loop's hook are the only parts that touch chitchat.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chitchat::ChitchatId;
use serde::Serialize;

use crate::{lock, Cluster};

/// Heartbeat advances of another holder of our node id seen before it is a conflict.
pub const MIN_ADVANCES: u32 = 3;
/// Shortest confirmation time, whatever the gossip interval.
pub const MIN_CONFIRM: Duration = Duration::from_secs(1);
/// A conflict that persists is logged again this often.
pub const RELOG_EVERY: Duration = Duration::from_secs(30);
/// Lines logged per sender address for gossip failing authentication.
pub const AUTH_LOG_EVERY: Duration = Duration::from_secs(10);
/// Sender addresses remembered by [`PerSenderLimiter`].
pub const MAX_TRACKED_SENDERS: usize = 4096;

/// Another live node using this node's id, as `GET /cluster` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityConflict {
    /// The node id both use.
    pub node_id: String,
    /// The other holder's gossip address.
    pub gossip_addr: SocketAddr,
    /// The other holder's epoch (chitchat generation).
    pub epoch: u64,
}

/// What gossip shows of a node that carries our node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// Its generation (our epoch).
    pub generation: u64,
    /// Its gossip address.
    pub gossip_addr: SocketAddr,
    /// Its latest heartbeat.
    pub heartbeat: u64,
    /// Whether chitchat's failure detector calls it live.
    pub live: bool,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    heartbeat: u64,
    advances: u32,
    first_at: Instant,
    last_advance_at: Instant,
    logged_at: Option<Instant>,
}

/// Decides, from successive views of gossip, which other holders of our
/// node id are real, running processes.
#[derive(Debug)]
pub struct IdentityTracker {
    node_id: String,
    confirm: Duration,
    seen: HashMap<(u64, SocketAddr), Seen>,
    conflicts: Vec<IdentityConflict>,
}

/// What one [`IdentityTracker::observe`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Conflicts to log now (new ones, and persisting ones every [`RELOG_EVERY`]).
    pub to_log: Vec<IdentityConflict>,
    /// Holders that stopped being a conflict.
    pub resolved: Vec<IdentityConflict>,
}

impl IdentityTracker {
    /// A tracker for `node_id`; `gossip_interval` sets the confirmation
    /// time (four intervals, at least [`MIN_CONFIRM`]).
    pub fn new(node_id: &str, gossip_interval: Duration) -> Self {
        Self {
            node_id: node_id.to_owned(),
            confirm: (gossip_interval * 4).max(MIN_CONFIRM),
            seen: HashMap::new(),
            conflicts: Vec::new(),
        }
    }

    /// The conflicts as of the last observation.
    pub fn conflicts(&self) -> &[IdentityConflict] {
        &self.conflicts
    }

    /// Takes the nodes gossip knows under our node id (ours excluded) at `now`.
    pub fn observe(&mut self, now: Instant, holders: &[Holder]) -> Observation {
        self.seen
            .retain(|k, _| holders.iter().any(|h| (h.generation, h.gossip_addr) == *k));
        let mut out = Observation::default();
        let mut conflicts = Vec::new();
        for h in holders {
            let s = self
                .seen
                .entry((h.generation, h.gossip_addr))
                .or_insert(Seen {
                    heartbeat: h.heartbeat,
                    advances: 0,
                    first_at: now,
                    last_advance_at: now,
                    logged_at: None,
                });
            if h.heartbeat > s.heartbeat {
                s.heartbeat = h.heartbeat;
                s.advances = s.advances.saturating_add(1);
                s.last_advance_at = now;
            }
            let running = h.live
                && s.advances >= MIN_ADVANCES
                && now.duration_since(s.first_at) >= self.confirm
                && now.duration_since(s.last_advance_at) < self.confirm;
            if !running {
                s.logged_at = None;
                continue;
            }
            let c = IdentityConflict {
                node_id: self.node_id.clone(),
                gossip_addr: h.gossip_addr,
                epoch: h.generation,
            };
            if s.logged_at
                .is_none_or(|at| now.duration_since(at) >= RELOG_EVERY)
            {
                s.logged_at = Some(now);
                out.to_log.push(c.clone());
            }
            conflicts.push(c);
        }
        conflicts.sort_by_key(|c| (c.epoch, c.gossip_addr));
        out.resolved = self
            .conflicts
            .iter()
            .filter(|c| !conflicts.contains(c))
            .cloned()
            .collect();
        self.conflicts = conflicts;
        out
    }
}

/// Allows one log line per sender address per [`AUTH_LOG_EVERY`], and
/// counts what it suppressed in between. Bounded: past
/// [`MAX_TRACKED_SENDERS`] addresses, quiet ones are forgotten and a new
/// address is refused until there is room.
#[derive(Debug, Default)]
pub struct PerSenderLimiter {
    last: HashMap<SocketAddr, (Instant, u64)>,
}

impl PerSenderLimiter {
    /// Whether a line about `from` may be logged at `now`; `Some(n)` with
    /// the number of lines suppressed since the last one.
    pub fn allow(&mut self, now: Instant, from: SocketAddr) -> Option<u64> {
        if let Some((at, suppressed)) = self.last.get_mut(&from) {
            if now.duration_since(*at) < AUTH_LOG_EVERY {
                *suppressed += 1;
                return None;
            }
            let n = *suppressed;
            *at = now;
            *suppressed = 0;
            return Some(n);
        }
        if self.last.len() >= MAX_TRACKED_SENDERS {
            self.last
                .retain(|_, (at, _)| now.duration_since(*at) < AUTH_LOG_EVERY);
            if self.last.len() >= MAX_TRACKED_SENDERS {
                return None;
            }
        }
        self.last.insert(from, (now, 0));
        Some(0)
    }
}

/// The identity state a [`Cluster`] keeps.
#[derive(Debug)]
pub(crate) struct IdentityState {
    tracker: Mutex<IdentityTracker>,
}

impl IdentityState {
    pub(crate) fn new(node_id: &str, gossip_interval: Duration) -> Self {
        Self {
            tracker: Mutex::new(IdentityTracker::new(node_id, gossip_interval)),
        }
    }
}

/// The nodes gossip knows under `me`'s node id, other than `me`.
pub fn holders_of<'a>(
    me: &ChitchatId,
    known: impl Iterator<Item = (&'a ChitchatId, u64)>,
    live: &[&ChitchatId],
) -> Vec<Holder> {
    known
        .filter(|(id, _)| id.node_id == me.node_id && *id != me)
        .map(|(id, heartbeat)| Holder {
            generation: id.generation_id,
            gossip_addr: id.gossip_advertise_addr,
            heartbeat,
            live: live.contains(&id),
        })
        .collect()
}

impl Cluster {
    /// This node's epoch (its chitchat generation).
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Other live nodes gossiping under this node's id (empty when all is well).
    pub fn identity_conflicts(&self) -> Vec<IdentityConflict> {
        lock(&self.inner.identity.tracker).conflicts().to_vec()
    }

    /// The membership loop's hook: looks for other holders of our node id
    /// and logs new conflicts at error.
    pub(crate) async fn check_identity(&self) {
        let holders = self
            .inner
            .chitchat
            .with_chitchat(|c| {
                let me = c.self_chitchat_id().clone();
                let live: Vec<&ChitchatId> = c.live_nodes().collect();
                holders_of(
                    &me,
                    c.node_states()
                        .iter()
                        .map(|(id, st)| (id, u64::from(st.heartbeat()))),
                    &live,
                )
            })
            .await;
        let seen = lock(&self.inner.identity.tracker).observe(Instant::now(), &holders);
        for c in seen.to_log {
            tracing::error!(
                node_id = %c.node_id,
                other_gossip_addr = %c.gossip_addr,
                other_epoch = c.epoch,
                our_epoch = self.inner.epoch,
                "node_id {:?} is already in use by a live node at {}: two nodes share this node id, \
                 messages will be lost; give each node its own node_id",
                c.node_id,
                c.gossip_addr
            );
        }
        for c in seen.resolved {
            tracing::info!(node_id = %c.node_id, other_gossip_addr = %c.gossip_addr, "the other node with this node id is gone");
        }
    }
}

#[cfg(test)]
mod tests;
