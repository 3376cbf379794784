//! The presence member limit, cluster-wide: the channel's owner decides.
//!
//! Each node knows the members of the others only as fast as replication
//! brings them, so two nodes admitting a new member at the same moment
//! could both see room for one more. A join of a **new** member (not
//! already a member anywhere) on a node that is not the channel's owner
//! (rendezvous hashing, `routing.rs`) is parked, and a
//! [`PeerFrame::PresenceClaim`] goes to the owner. The owner admits against
//! its view (its members, the members its peers replicated) plus its
//! outstanding **reservations**: members it admitted that have not shown up
//! in its view yet (they expire after [`RESERVATION_TTL`]). Its own new
//! members are checked the same way. The answer, a
//! [`PeerFrame::PresenceGrant`], completes the parked join:
//! `subscription_succeeded`, or the usual `subscription_error` 403.
//!
//! A claim not answered within [`CLAIM_WAIT`] (the owner unreachable) is
//! decided locally, as before, and counted in
//! [`PresenceLimitStats::local_decisions`]. An unsubscribe (or disconnect)
//! while parked drops the join.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pushmesh_protocol::{server, ChannelName};

use super::{Joining, Shard};
use crate::app::{AppIdx, ConnId};
use crate::peer_frame::{FrameKind, NodeId, PeerFrame};
use crate::routing::is_owner;
use crate::session::PresenceJoin;
use crate::sink::{Handle, Sink};

/// Longest wait for the owner's answer before the join is decided locally.
pub const CLAIM_WAIT: Duration = Duration::from_secs(1);
/// How long the owner counts a member it admitted for a peer before that
/// member shows up in its view.
pub const RESERVATION_TTL: Duration = Duration::from_secs(5);
/// Joins parked at once per shard; beyond, decided locally (counted).
pub const MAX_PENDING: usize = 65_536;

/// How a presence join is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// Ask the owner if this node is not the owner (the normal path).
    Ask,
    /// The owner granted it: admit whatever the local view says.
    Granted,
    /// Decide with the local view (the owner did not answer in time).
    Local,
}

/// Counters of the cluster-wide presence limit (one shard).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PresenceLimitStats {
    /// Claims sent to owners.
    pub claims: u64,
    /// Claims this node answered as owner: granted.
    pub granted: u64,
    /// Claims this node answered as owner: refused (channel full).
    pub refused: u64,
    /// Joins decided locally: no answer within [`CLAIM_WAIT`], or too many parked.
    pub local_decisions: u64,
}

struct Parked<H> {
    owner: NodeId,
    j: Joining<H>,
    join: PresenceJoin,
    since: Instant,
}

impl<H: Handle> Parked<H> {
    fn is(&self, conn: ConnId, app: AppIdx, name: &ChannelName) -> bool {
        self.j.h.conn() == conn && self.j.app == app && self.j.name == *name
    }
}

/// A peer's [`PeerFrame::PresenceClaim`], for the owner.
struct Claim<'a> {
    from: NodeId,
    req: u64,
    app_id: &'a str,
    channel: &'a str,
    user: &'a str,
}

/// The state of the cluster-wide limit in one shard.
pub(super) struct PresenceLimit<H> {
    next_req: u64,
    parked: HashMap<u64, Parked<H>>,
    /// Owner side: users admitted for peers, per channel, until when.
    reserved: HashMap<(AppIdx, ChannelName), HashMap<String, Instant>>,
    stats: PresenceLimitStats,
}

impl<H> Default for PresenceLimit<H> {
    fn default() -> Self {
        Self {
            next_req: 1,
            parked: HashMap::new(),
            reserved: HashMap::new(),
            stats: PresenceLimitStats::default(),
        }
    }
}

impl<H: Handle> PresenceLimit<H> {
    /// Whether joins wait for their owner's answer (the tick decides late ones).
    pub(super) fn has_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    fn is_parked(&self, conn: ConnId, app: AppIdx, name: &ChannelName) -> bool {
        self.parked.values().any(|p| p.is(conn, app, name))
    }

    fn unpark(&mut self, conn: ConnId, app: AppIdx, name: &ChannelName) {
        self.parked.retain(|_, p| !p.is(conn, app, name));
    }

    /// Parks a join under a new request id, counted as a claim.
    fn park(&mut self, p: Parked<H>) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        self.stats.claims += 1;
        self.parked.insert(req, p);
        req
    }
}

impl<H: Handle> Shard<H> {
    /// Counters of the cluster-wide presence limit.
    pub fn presence_limit_stats(&self) -> PresenceLimitStats {
        self.limit.stats
    }

    /// Whether a new member's join must be asked of the channel's owner.
    pub(super) fn must_ask(&self, app: AppIdx, name: &ChannelName) -> bool {
        !self.peers.is_empty()
            && !is_owner(&self.node, &self.peers, self.app_id(app), name.as_str())
    }

    /// Whether `conn` has a join of `name` parked.
    pub(super) fn is_parked(&self, conn: ConnId, app: AppIdx, name: &ChannelName) -> bool {
        self.limit.is_parked(conn, app, name)
    }

    /// Parks a join and asks the owner; decided locally if too many are parked.
    pub(super) fn ask_owner(
        &mut self,
        now: Instant,
        j: Joining<H>,
        join: PresenceJoin,
        sink: &mut impl Sink<H>,
    ) {
        let name = &j.name;
        let app_id = self.app_id(j.app).to_owned();
        let owner = self
            .peers
            .iter()
            .find(|p| {
                let others = self.peers.iter().filter(|q| q != p).cloned();
                let others = others.chain(std::iter::once(self.node.clone())).collect();
                is_owner(p, &others, &app_id, name.as_str())
            })
            .cloned();
        let Some(owner) = owner.filter(|_| self.limit.parked.len() < MAX_PENDING) else {
            self.limit.stats.local_decisions += 1;
            self.subscribe_presence(now, j, join, Admission::Local, sink);
            return;
        };
        let (channel, user) = (name.to_string(), join.user_id.clone());
        let to = owner.clone();
        let parked = Parked {
            owner,
            j,
            join,
            since: now,
        };
        let req = self.limit.park(parked);
        let frame = PeerFrame::PresenceClaim {
            node: self.node.to_string(),
            req,
            app: app_id,
            channel,
            user,
        };
        sink.peer(&to, FrameKind::Control, &frame.encode());
    }

    /// Drops the parked joins of `conn` on `name` (it unsubscribed or left).
    pub(super) fn unpark(&mut self, conn: ConnId, app: AppIdx, name: &ChannelName) {
        self.limit.unpark(conn, app, name);
    }

    /// Owner side: members admitted for peers and not yet in this node's
    /// view of the channel (expired ones forgotten).
    pub(super) fn reservations(&mut self, now: Instant, app: AppIdx, name: &ChannelName) -> usize {
        let key = (app, name.clone());
        let Some(r) = self.limit.reserved.get(&key) else {
            return 0;
        };
        let live: HashMap<String, Instant> = r
            .iter()
            .filter(|(user, until)| {
                **until > now
                    && !self.remote_member(app, name.as_str(), user)
                    && !self.tables[app]
                        .channels
                        .get(name)
                        .is_some_and(|c| c.has_member(user))
            })
            .map(|(u, t)| (u.clone(), *t))
            .collect();
        let n = live.len();
        if live.is_empty() {
            self.limit.reserved.remove(&key);
        } else {
            self.limit.reserved.insert(key, live);
        }
        n
    }

    /// A `PresenceClaim` or `PresenceGrant` for a channel of this shard.
    pub fn handle_presence_frame(
        &mut self,
        now: Instant,
        frame: PeerFrame,
        sink: &mut impl Sink<H>,
    ) {
        match frame {
            PeerFrame::PresenceClaim {
                node,
                req,
                app,
                channel,
                user,
            } => {
                let claim = Claim {
                    from: NodeId::new(&node),
                    req,
                    app_id: &app,
                    channel: &channel,
                    user: &user,
                };
                self.claim(now, claim, sink)
            }
            PeerFrame::PresenceGrant { req, granted, .. } => {
                let Some(p) = self.limit.parked.remove(&req) else {
                    // Answered after the wait, or the connection left.
                    return;
                };
                if granted {
                    self.subscribe_presence_cached(now, p.j, p.join, Admission::Granted, sink);
                } else {
                    sink.send(&p.j.h, &full(&p.j.name));
                }
            }
            _ => {}
        }
    }

    /// Owner side: answers a claim from `from`.
    fn claim(&mut self, now: Instant, c: Claim<'_>, sink: &mut impl Sink<H>) {
        let Claim {
            from,
            req,
            app_id,
            channel,
            user,
        } = c;
        let Some((app, name)) = self.peer_channel(app_id, channel) else {
            return;
        };
        let max = self.apps.get(app).limits.max_presence_members;
        let reserved = self.reservations(now, app, &name);
        let known = self.remote_member(app, channel, user)
            || self.tables[app]
                .channels
                .get(&name)
                .is_some_and(|c| c.has_member(user))
            || self
                .limit
                .reserved
                .get(&(app, name.clone()))
                .is_some_and(|r| r.contains_key(user));
        let granted = known || self.member_count(app, channel) + reserved < max;
        if granted {
            self.limit.stats.granted += 1;
            if !known {
                self.limit
                    .reserved
                    .entry((app, name))
                    .or_default()
                    .insert(user.to_owned(), now + RESERVATION_TTL);
            }
        } else {
            self.limit.stats.refused += 1;
        }
        let answer = PeerFrame::PresenceGrant {
            req,
            app: app_id.to_owned(),
            channel: channel.to_owned(),
            granted,
        };
        sink.peer(&from, FrameKind::Control, &answer.encode());
    }

    /// Periodic work: joins whose owner did not answer in time are decided
    /// locally.
    pub(super) fn presence_limit_tick(&mut self, now: Instant, sink: &mut impl Sink<H>) {
        self.decide_locally(
            now,
            |p| now.saturating_duration_since(p.since) >= CLAIM_WAIT,
            sink,
        );
    }

    /// Call after [`Shard::set_peers`]: joins parked for an owner that is no
    /// longer a peer (its link is down: the claim or the answer may be lost)
    /// are decided locally at once.
    pub fn presence_peers_changed(&mut self, now: Instant, sink: &mut impl Sink<H>) {
        let peers = self.peers.clone();
        self.decide_locally(now, |p| !peers.contains(&p.owner), sink);
    }

    fn decide_locally(
        &mut self,
        now: Instant,
        which: impl Fn(&Parked<H>) -> bool,
        sink: &mut impl Sink<H>,
    ) {
        let mut late: Vec<u64> = self
            .limit
            .parked
            .iter()
            .filter(|(_, p)| which(p))
            .map(|(r, _)| *r)
            .collect();
        late.sort_unstable();
        for req in late {
            if let Some(p) = self.limit.parked.remove(&req) {
                self.limit.stats.local_decisions += 1;
                tracing::debug!(channel = %p.j.name, "presence owner did not answer in time, admission decided locally");
                self.subscribe_presence_cached(now, p.j, p.join, Admission::Local, sink);
            }
        }
    }
}

/// The refusal of a join to a full presence channel.
pub(super) fn full(name: &ChannelName) -> bytes::Bytes {
    server::subscription_error(
        name.as_str(),
        "LimitReached",
        "presence channel is full",
        403,
    )
}

#[cfg(test)]
mod tests;
