//! Subscriptions by filter (issue #13), in the router.
//!
//! - A channel's subscriptions with equal [`Selector`]s share a group; a
//!   publish evaluates each group once (10,000 subscribers sharing 10
//!   filters cost 10 evaluations), then walks the subscribers as before.
//!   A channel without selected subscriptions keeps the plain fan-out.
//! - Interest: a node advertises the filters of its groups
//!   ([`Delta::Filter`], at most [`MAX_ADVERTISED`] per channel), and "every
//!   event" (`filter: None`) while it also has subscribers that no
//!   advertised filter covers. A peer forwards a publish to a node only if
//!   the node advertises nothing for the channel, or "every event", or a
//!   filter the event's tags match. Changes are ordered so that a peer's
//!   view is never narrower than the node's subscribers: "every event" is
//!   added before a filter, and removed after.
//! - Selectors with a target (`#server-to-user-<id>`: device, zone) are not
//!   advertised: such channels are forwarded as before and decided here.

use std::collections::HashMap;
use std::sync::Arc;

use pushmesh_protocol::{ChannelKind, ChannelName};

use super::{Channel, Remote, Shard};
use crate::app::{AppIdx, ConnId};
use crate::filter::{Filter, Selector, Tags};
use crate::peer_frame::{Delta, NodeId};
use crate::sink::{Handle, Sink};

/// The group of a subscription without a selector.
pub(super) const PLAIN: u32 = u32::MAX;

/// At most this many filters advertised per channel by one node; past it,
/// the node takes every event of the channel ("every event").
pub const MAX_ADVERTISED: u32 = 32;

/// A channel's groups of selected subscriptions.
#[derive(Default)]
pub(super) struct Groups {
    slots: Vec<Option<Group>>,
    free: Vec<u32>,
    index: HashMap<Arc<Selector>, u32>,
    /// Subscriptions in a group.
    grouped: u32,
    /// Groups whose filter is advertised / not advertised.
    advertised: u32,
    unadvertised: u32,
    /// Whether "every event" is advertised.
    star: bool,
}

struct Group {
    sel: Arc<Selector>,
    count: u32,
    /// The canonical filter, when advertised.
    advert: Option<String>,
}

/// Interest changes to replicate, in the order that keeps peers' views wide.
#[derive(Default)]
pub(super) struct Advert {
    star_add: bool,
    add: Option<String>,
    remove: Option<String>,
    star_remove: bool,
}

impl Groups {
    fn join(&mut self, sel: Arc<Selector>, advertise: bool, adv: &mut Advert) -> u32 {
        self.grouped += 1;
        if let Some(&g) = self.index.get(&sel) {
            if let Some(Some(grp)) = self.slots.get_mut(g as usize) {
                grp.count += 1;
            }
            return g;
        }
        let advert = match sel.advertised() {
            Some(f) if advertise && self.advertised < MAX_ADVERTISED => Some(f.canonical()),
            _ => None,
        };
        if advert.is_some() {
            self.advertised += 1;
        } else {
            self.unadvertised += 1;
        }
        adv.add.clone_from(&advert);
        let grp = Group {
            sel: sel.clone(),
            count: 1,
            advert,
        };
        let g = match self.free.pop() {
            Some(g) => {
                self.slots[g as usize] = Some(grp);
                g
            }
            None => {
                self.slots.push(Some(grp));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(sel, g);
        g
    }

    fn leave(&mut self, g: u32, adv: &mut Advert) {
        let Some(slot) = self.slots.get_mut(g as usize) else {
            return;
        };
        let Some(grp) = slot.as_mut() else {
            return;
        };
        self.grouped -= 1;
        grp.count -= 1;
        if grp.count > 0 {
            return;
        }
        if let Some(grp) = slot.take() {
            self.index.remove(&grp.sel);
            self.free.push(g);
            if grp.advert.is_some() {
                self.advertised -= 1;
            } else {
                self.unadvertised -= 1;
            }
            adv.remove = grp.advert;
        }
    }

    fn sync_star(&mut self, plain: usize, adv: &mut Advert) {
        let want = self.advertised > 0 && (plain > 0 || self.unadvertised > 0);
        if want && !self.star {
            adv.star_add = true;
        } else if !want && self.star {
            adv.star_remove = true;
        }
        self.star = want;
    }

    fn is_empty(&self) -> bool {
        self.grouped == 0 && !self.star
    }

    /// Evaluates each group once against an event's `tags` (into
    /// `matched`, by group); false if none of the channel's `subs`
    /// subscriptions takes the event.
    pub(super) fn evaluate(&self, tags: &Tags, subs: usize, matched: &mut Vec<bool>) -> bool {
        matched.extend(
            self.slots
                .iter()
                .map(|g| g.as_ref().is_some_and(|g| g.sel.matches(tags))),
        );
        matched.iter().any(|m| *m) || (self.grouped as usize) < subs
    }

    fn selector(&self, g: u32) -> Option<&Arc<Selector>> {
        self.slots
            .get(g as usize)
            .and_then(Option::as_ref)
            .map(|grp| &grp.sel)
    }
}

/// A subscription left `ch` (already removed from its subscribers): its
/// group's count, and what to replicate.
pub(super) fn left<H>(ch: &mut Channel<H>, group: u32) -> Advert {
    let mut adv = Advert::default();
    if let Some(g) = ch.groups.as_mut() {
        if group != PLAIN {
            g.leave(group, &mut adv);
        }
        let plain = ch.subs.len() - g.grouped as usize;
        g.sync_star(plain, &mut adv);
        if g.is_empty() {
            ch.groups = None;
        }
    }
    adv
}

/// What a peer advertised for one channel.
#[derive(Default)]
pub(super) struct PeerFilters {
    star: bool,
    list: Vec<(String, Filter)>,
}

impl PeerFilters {
    fn wants(&self, tags: &Tags) -> bool {
        self.star || self.list.is_empty() || self.list.iter().any(|(_, f)| f.matches(tags))
    }
}

/// Whether a peer interested in the channel takes an event with `tags`.
pub(super) fn peer_wants(r: &Remote, peer: &NodeId, tags: &Tags) -> bool {
    r.filters.get(peer).is_none_or(|pf| pf.wants(tags))
}

impl<H: Handle> Shard<H> {
    /// The selector of a subscription, if it has one.
    pub(super) fn selector_of(
        &self,
        app: AppIdx,
        name: &ChannelName,
        conn: ConnId,
    ) -> Option<Arc<Selector>> {
        let ch = self.tables[app].channels.get(name)?;
        let group = ch.subs.get(&conn)?.group;
        ch.groups.as_ref()?.selector(group).cloned()
    }

    /// A presence join was admitted: its selector, or none. A member
    /// without a filter is placed too: on a channel with groups it must
    /// count among the plain subscribers, or peers would not be told that
    /// this node takes every event (found by a test: a plain member
    /// admitted after a filtered one missed tagged events from other nodes).
    pub(super) fn admitted(
        &mut self,
        conn: ConnId,
        app: AppIdx,
        name: &ChannelName,
        sink: &mut impl Sink<H>,
    ) {
        let selector = if self.parked_selectors.is_empty() {
            None
        } else {
            self.parked_selectors.remove(&(conn, app, name.clone()))
        };
        self.select(app, name, conn, selector, sink);
    }

    /// Forgets the selector of a join that waited and was dropped.
    pub(super) fn forget_parked(&mut self, conn: ConnId, app: AppIdx, name: &ChannelName) {
        if !self.parked_selectors.is_empty() {
            self.parked_selectors.remove(&(conn, app, name.clone()));
        }
    }

    /// Puts a subscription in the group of `selector` (or none).
    pub(super) fn select(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
        conn: ConnId,
        selector: Option<Arc<Selector>>,
        sink: &mut impl Sink<H>,
    ) {
        let advertise = name.kind() != ChannelKind::ServerToUser;
        let t = &mut self.tables[app];
        let Some(ch) = t.channels.get_mut(name) else {
            return;
        };
        let Some(old) = ch.subs.get(&conn).map(|s| s.group) else {
            return;
        };
        if selector.is_none() && ch.groups.is_none() {
            return;
        }
        let groups = ch.groups.get_or_insert_with(Box::default);
        if let Some(s) = &selector {
            if groups.selector(old).is_some_and(|o| o == s) {
                return;
            }
        }
        let mut adv = Advert::default();
        let new = match selector {
            Some(s) => groups.join(s, advertise, &mut adv),
            None => PLAIN,
        };
        if old != PLAIN && old != new {
            groups.leave(old, &mut adv);
        }
        let plain = ch.subs.len() - groups.grouped as usize;
        groups.sync_star(plain, &mut adv);
        if groups.is_empty() {
            ch.groups = None;
        }
        if let Some(s) = ch.subs.get_mut(&conn) {
            s.group = new;
        }
        self.advertise(app, name, adv, sink);
    }

    /// Replicates interest changes: "every event" first, removals last.
    pub(super) fn advertise(
        &self,
        app: AppIdx,
        name: &ChannelName,
        adv: Advert,
        sink: &mut impl Sink<H>,
    ) {
        let mut emit = |filter: Option<String>, add: bool| {
            sink.replicate(Delta::Filter {
                app: self.app_id(app).to_owned(),
                channel: name.to_string(),
                filter,
                add,
            });
        };
        if adv.star_add {
            emit(None, true);
        }
        if let Some(f) = adv.add {
            emit(Some(f), true);
        }
        if let Some(f) = adv.remove {
            emit(Some(f), false);
        }
        if adv.star_remove {
            emit(None, false);
        }
    }

    /// A peer's [`Delta::Filter`] (idempotent; a filter that does not parse
    /// is taken as "every event", never as less).
    pub(super) fn apply_remote_filter(
        &mut self,
        peer: &NodeId,
        app: AppIdx,
        channel: &str,
        filter: Option<String>,
        add: bool,
    ) {
        let Ok(name) = ChannelName::parse_with_limit(channel, usize::MAX) else {
            return;
        };
        let t = self.table(app);
        let r = t.remote.entry(name.clone()).or_default();
        let pf = r.filters.entry(peer.clone()).or_default();
        match filter {
            None => pf.star = add,
            Some(text) => {
                let i = pf.list.iter().position(|(c, _)| *c == text);
                match (add, i) {
                    (true, None) => match Filter::parse(&text) {
                        Ok(Some(f)) if pf.list.len() < MAX_ADVERTISED as usize => {
                            pf.list.push((text, f))
                        }
                        // Unusable or too many: safe side, every event.
                        _ => pf.star = true,
                    },
                    (false, Some(i)) => {
                        pf.list.swap_remove(i);
                    }
                    _ => {}
                }
            }
        }
        if !pf.star && pf.list.is_empty() {
            r.filters.remove(peer);
        }
        if r.is_empty() {
            t.remote.remove(&name);
        }
    }
}
