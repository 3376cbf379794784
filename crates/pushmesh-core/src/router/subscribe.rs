//! Subscribing and unsubscribing in a shard: the answer
//! (`subscription_succeeded`, a history recovery, the cached event), the
//! subscription's filter in place before anything is sent, and leaving
//! (members, interest, counts).

use std::sync::Arc;
use std::time::Instant;

use pushmesh_protocol::server;
use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::ChannelName;

use super::presence_limit::Admission;
use super::{filter, history, Joining, Shard, Subscribe, CACHE_TTL};
use crate::app::{AppIdx, ConnId};
use crate::filter::Selector;
use crate::session::{PresenceJoin, Proto};
use crate::sink::{Handle, Sink};

impl<H: Handle> Shard<H> {
    /// Subscribes a connection (authorized by its session). Pusher
    /// connections get `subscription_succeeded` (and the cached event of a
    /// cache channel); subscribing twice delivers once. With a selector
    /// (`None`: every event) the subscription takes only the events it
    /// matches; subscribing again with another selector replaces it. The
    /// selector is in place before anything is sent to the subscription,
    /// so a history replay is filtered like live events. On a history
    /// channel, `position` asks for every event after it (`history.rs`).
    pub fn subscribe(&mut self, now: Instant, s: Subscribe<H>, sink: &mut impl Sink<H>) {
        let Subscribe {
            conn: h,
            app,
            channel: name,
            proto,
            presence,
            selector,
            position,
        } = s;
        let j = Joining { h, app, name };
        let Some(join) = presence else {
            return self.subscribe_plain(now, j, proto, selector, position.as_deref(), sink);
        };
        // A presence join: the selector waits where an admission applies
        // it (`admitted`, before the answer and any replay).
        let conn = j.h.conn();
        let key = (conn, app, j.name.clone());
        let parked_before = self.is_parked(conn, app, &j.name);
        match &selector {
            Some(s) => {
                self.parked_selectors.insert(key.clone(), s.clone());
            }
            None if !parked_before => {
                self.parked_selectors.remove(&key);
            }
            None => {}
        }
        self.subscribe_presence_cached(now, j, join, Admission::Ask, sink);
        let name = &key.2;
        let subscribed = self.tables[app]
            .channels
            .get(name)
            .is_some_and(|c| c.subs.contains_key(&conn));
        if subscribed {
            // Subscribed already (no admission ran): apply it now.
            match self.parked_selectors.remove(&key) {
                Some(s) => self.select(app, name, conn, Some(s), sink),
                None if selector.is_none() => self.select(app, name, conn, None, sink),
                None => {}
            }
        } else if !self.is_parked(conn, app, name) {
            // Refused (the channel is full).
            self.parked_selectors.remove(&key);
        }
    }

    /// A non-presence subscribe without a filter decision yet: on a history
    /// channel, answered now or parked until the events its position names
    /// arrive.
    fn subscribe_plain(
        &mut self,
        now: Instant,
        j: Joining<H>,
        proto: Proto,
        selector: Option<Arc<Selector>>,
        position: Option<&str>,
        sink: &mut impl Sink<H>,
    ) {
        let answer = if self.keeps_history(j.app, j.name.as_str()).is_some() {
            match self.history_answer(j.app, &j.name, position) {
                Some(a) => Some(a),
                None => {
                    // Its events are on their way from a peer: wait for them.
                    let position = position.unwrap_or_default();
                    self.park_recovery(now, j, proto, position, selector);
                    return;
                }
            }
        } else {
            None
        };
        self.subscribe_answered(now, j, proto, answer, selector, sink);
    }

    /// A non-presence subscribe, answered (`answer` on history channels).
    pub(super) fn subscribe_answered(
        &mut self,
        now: Instant,
        j: Joining<H>,
        proto: Proto,
        mut answer: Option<history::Answer>,
        selector: Option<Arc<Selector>>,
        sink: &mut impl Sink<H>,
    ) {
        let Joining { h, app, name } = j;
        let name = &name;
        let conn = h.conn();
        let t = self.table(app);
        let ch = t.channels.entry(name.clone()).or_default();
        let occupied = ch.count() == 0;
        if ch.insert(conn, h.clone(), proto) {
            t.dirty_counts.insert(name.clone());
            self.counted(name, occupied, 1);
            if occupied {
                self.local_interest(app, name, true, sink);
            }
        } else if answer.is_some() {
            // Subscribed already: it has every event since; no replay.
            answer = Some(history::Answer::Fresh);
        }
        // Its filter (or none) before anything is sent to it: the replay
        // below is filtered too.
        self.select(app, name, conn, selector, sink);
        // The barrier: what follows waits until every peer knows of
        // this node's interest (see `Sink::hold`).
        if !self.peers.is_empty() {
            sink.hold(&h);
        }
        if proto == Proto::Pusher {
            let frame = match &answer {
                Some(a) => self.succeeded_frame(app, name, a),
                None => server::subscription_succeeded(name.as_str()),
            };
            sink.send(&h, &frame);
        } else if let Some(a) = &answer {
            self.recovery_fields(app, name, a);
        }
        if let Some(history::Answer::Recovered(from)) = &answer {
            self.replay(&h, app, name, proto, from, sink);
        }
        if proto == Proto::Pusher && name.is_cache() {
            self.send_cached(now, &h, app, name, sink);
        }
    }

    /// A presence join ([`Shard::subscribe_presence`]), then the cached
    /// event of a cache channel if it was admitted now.
    pub(super) fn subscribe_presence_cached(
        &mut self,
        now: Instant,
        j: Joining<H>,
        join: PresenceJoin,
        admission: Admission,
        sink: &mut impl Sink<H>,
    ) {
        let cached = j
            .name
            .is_cache()
            .then(|| (j.h.clone(), j.app, j.name.clone()));
        if self.subscribe_presence(now, j, join, admission, sink) {
            if let Some((h, app, name)) = cached {
                self.send_cached(now, &h, app, &name, sink);
            }
        }
    }

    pub(super) fn send_cached(
        &mut self,
        now: Instant,
        h: &H,
        app: AppIdx,
        name: &ChannelName,
        sink: &mut impl Sink<H>,
    ) {
        let hook = self.apps.get(app).webhooks;
        let t = self.table(app);
        match t.cache.get(name) {
            Some(c) if now.saturating_duration_since(c.at) < CACHE_TTL => {
                sink.send(h, &c.frame);
            }
            _ => {
                t.cache.remove(name);
                sink.send(h, &server::cache_miss(name.as_str()));
                if hook {
                    let event = WebhookEvent::CacheMiss {
                        channel: name.to_string(),
                    };
                    sink.hook(app, event);
                }
            }
        }
    }

    /// Removes a connection from a channel; nothing if it is not in it.
    pub fn unsubscribe(
        &mut self,
        conn: ConnId,
        app: AppIdx,
        name: &ChannelName,
        sink: &mut impl Sink<H>,
    ) {
        self.unpark(conn, app, name);
        self.unpark_recovery(conn, app, name);
        self.forget_parked(conn, app, name);
        let t = self.table(app);
        let Some(ch) = t.channels.get_mut(name) else {
            return;
        };
        let Some(sub) = ch.subs.swap_remove(&conn) else {
            return;
        };
        if sub.proto != Proto::Pusher {
            ch.wsify -= 1;
        }
        let advert = filter::left(ch, sub.group);
        let mut member_gone = None;
        if let Some(p) = ch.presence.as_mut() {
            if let Some(uid) = p.of.remove(&conn) {
                let gone = match p.members.get_mut(&uid) {
                    Some(m) => {
                        m.conns -= 1;
                        m.conns == 0
                    }
                    None => false,
                };
                if gone {
                    p.members.swap_remove(&uid);
                    member_gone = Some(uid);
                }
            }
        }
        let empty = ch.count() == 0;
        t.dirty_counts.insert(name.clone());
        if empty {
            t.channels.remove(name);
        }
        self.counted(name, empty, -1);
        self.advertise(app, name, advert, sink);
        if let Some(uid) = member_gone {
            self.member_left(app, name, uid, sink);
        }
        if empty {
            self.local_interest(app, name, false, sink);
        }
    }
}
