//! A shard and its peers: what they hold (their interest, subscriber counts
//! and presence members per channel, from the replication), the channel
//! messages and cached events they send, and the first half of a publish
//! (room in every interested peer's buffer, then the frame to each).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::ChannelName;
use serde_json::value::RawValue;

use super::filter::peer_wants;
use super::{Channel, Event, PublishRefused, RemoteMember, Shard, CACHE_TTL};
use crate::app::AppIdx;
use crate::filter::Tags;
use crate::peer_frame::{Delta, FrameKind, NodeId, PeerFrame};
use crate::sink::{Handle, Sink};

fn raw(info: Option<&str>) -> Option<Box<RawValue>> {
    info.and_then(|s| RawValue::from_string(s.to_owned()).ok())
}

impl<H: Handle> Shard<H> {
    /// The app and channel a peer's frame names; `None` for an app this
    /// node does not serve or a name that does not parse.
    pub(super) fn peer_channel(
        &self,
        app_id: &str,
        channel: &str,
    ) -> Option<(AppIdx, ChannelName)> {
        let app = self.apps.by_id(app_id)?;
        let name = ChannelName::parse_with_limit(channel, usize::MAX).ok()?;
        Some((app, name))
    }

    /// Applies one change of `peer`'s state for a channel of this shard
    /// (idempotent). User deltas belong to the user registry and are ignored.
    pub fn apply_remote(&mut self, peer: &NodeId, delta: Delta, sink: &mut impl Sink<H>) {
        let Some(app) = self.apps.by_id(delta.app()) else {
            return;
        };
        match delta {
            Delta::Interest { channel, add, .. } => {
                let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) else {
                    return;
                };
                let before = self.remote_interest(app, &name);
                let t = self.table(app);
                let local = t.channels.get(&name).is_some_and(|c| c.count() > 0);
                let r = t.remote.entry(name.clone()).or_default();
                let changed = if add {
                    r.interested.insert(peer.clone())
                } else {
                    r.interested.remove(peer)
                };
                let after = !r.interested.is_empty();
                if r.is_empty() {
                    t.remote.remove(&name);
                }
                if changed && !local && before != after {
                    let event = if after {
                        WebhookEvent::ChannelOccupied {
                            channel: channel.clone(),
                        }
                    } else {
                        WebhookEvent::ChannelVacated {
                            channel: channel.clone(),
                        }
                    };
                    self.hook(app, &channel, event, sink);
                }
            }
            Delta::Count { channel, count, .. } => {
                let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) else {
                    return;
                };
                let cfg = self.apps.get(app).clone();
                let t = self.table(app);
                let r = t.remote.entry(name.clone()).or_default();
                let changed = if count == 0 {
                    r.counts.remove(peer).is_some()
                } else {
                    r.counts.insert(peer.clone(), count) != Some(count)
                };
                if r.is_empty() {
                    t.remote.remove(&name);
                }
                if changed && (cfg.subscription_count_events || cfg.webhooks) {
                    t.dirty_events.insert(name);
                }
            }
            Delta::Member {
                channel,
                user,
                info,
                add,
                ..
            } => {
                let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) else {
                    return;
                };
                let t = self.table(app);
                let local = t.channels.get(&name).is_some_and(|c| c.has_member(&user));
                let r = t.remote.entry(name.clone()).or_default();
                let was = r.members.contains_key(&user);
                if add {
                    let m = r
                        .members
                        .entry(user.clone())
                        .or_insert_with(|| RemoteMember {
                            info: raw(info.as_deref()),
                            nodes: BTreeSet::new(),
                        });
                    if !m.nodes.insert(peer.clone()) || was || local {
                        return;
                    }
                    let info = m.info.clone();
                    self.member_event(app, &name, &user, info.as_deref(), true, None, sink);
                } else {
                    let Some(m) = r.members.get_mut(&user) else {
                        return;
                    };
                    if !m.nodes.remove(peer) {
                        return;
                    }
                    let gone = m.nodes.is_empty();
                    if gone {
                        r.members.swap_remove(&user);
                    }
                    if r.is_empty() {
                        t.remote.remove(&name);
                    }
                    if gone && !local {
                        self.member_event(app, &name, &user, None, false, None, sink);
                    }
                }
            }
            Delta::User { .. } => {}
            Delta::Filter {
                channel,
                filter,
                add,
                ..
            } => self.apply_remote_filter(peer, app, &channel, filter, add),
        }
    }

    /// A channel message from a peer: delivered locally, never forwarded.
    #[allow(clippy::too_many_arguments)]
    pub fn deliver_remote(
        &mut self,
        now: Instant,
        app_id: &str,
        channel: &str,
        event: &str,
        data: &str,
        exclude: Option<&str>,
        user_id: Option<&str>,
        sink: &mut impl Sink<H>,
    ) {
        let Some((app, name)) = self.peer_channel(app_id, channel) else {
            return;
        };
        let ev = Event {
            app,
            channel: &name,
            name: event,
            data,
            content: None,
            exclude_socket: exclude,
            user_id,
        };
        // Not forwarded, so never refused.
        let _ = self.publish(now, &ev, false, sink);
    }

    /// The last event of a cache channel, published on a peer.
    pub fn cache_set(
        &mut self,
        now: Instant,
        app_id: &str,
        channel: &str,
        event: &str,
        data: &str,
        age_ms: u64,
    ) {
        let Some((app, name)) = self.peer_channel(app_id, channel) else {
            return;
        };
        let age = Duration::from_millis(age_ms);
        if age >= CACHE_TTL {
            return;
        }
        let at = now.checked_sub(age).unwrap_or(now);
        // A node that joins gets every peer's copy: the newest wins.
        if self.tables[app.0 as usize]
            .cache
            .get(&name)
            .is_some_and(|c| c.at > at)
        {
            return;
        }
        let ev = Event {
            app,
            channel: &name,
            name: event,
            data,
            content: None,
            exclude_socket: None,
            user_id: None,
        };
        self.cache_event(at, &ev, None);
    }

    /// Sends every live cache entry to a peer whose link just came up, so a
    /// node that joins later answers with the cached event, not a miss.
    pub fn send_cache(&self, now: Instant, to: &NodeId, sink: &mut impl Sink<H>) {
        for (app, t) in self.tables.iter().enumerate() {
            let app_id = self.app_id(AppIdx(app as u32));
            for (name, c) in &t.cache {
                let age = now.saturating_duration_since(c.at);
                if age >= CACHE_TTL {
                    continue;
                }
                let frame = PeerFrame::CacheSet {
                    app: app_id.to_owned(),
                    channel: name.to_string(),
                    event: c.event.clone(),
                    data: c.data.clone(),
                    age_ms: age.as_millis() as u64,
                };
                sink.peer(to, FrameKind::Data, &frame.encode());
            }
        }
    }

    pub(super) fn local_count(&self, app: crate::app::AppIdx, name: &str) -> usize {
        self.tables[app.0 as usize]
            .channels
            .get(name)
            .map_or(0, Channel::count)
    }
}

impl<H: Handle> Shard<H> {
    /// The first half of a publish: refused if an interested peer's buffer
    /// is full, else handed to every interested peer. After it succeeds the
    /// publish cannot fail any more (the driver answers 2xx then, before the
    /// local fan-out, which is [`Shard::deliver_local`]).
    pub fn hand_to_peers(
        &mut self,
        now: Instant,
        ev: &Event<'_>,
        sink: &mut impl Sink<H>,
    ) -> Result<(), PublishRefused> {
        if self.keeps_history(ev.app, ev.channel.as_str()).is_some() {
            return self.history_hand(now, ev, &crate::filter::Tags::default(), sink);
        }
        let untagged = crate::filter::Tags::default();
        self.check_peer_room(ev, &untagged, sink)?;
        self.forward(ev, &untagged, sink);
        Ok(())
    }

    /// Whether every peer the publish goes to can hold it.
    pub(super) fn check_peer_room(
        &self,
        ev: &Event<'_>,
        tags: &Tags,
        sink: &mut impl Sink<H>,
    ) -> Result<(), PublishRefused> {
        if self.peers.is_empty() {
            return Ok(());
        }
        let remote = self.tables[ev.app.0 as usize].remote.get(ev.channel);
        let to = if ev.channel.is_cache() {
            &self.peers
        } else {
            match remote {
                Some(r) => &r.interested,
                None => return Ok(()),
            }
        };
        for p in to {
            if remote.is_some_and(|r| !peer_wants(r, p, tags)) && !ev.channel.is_cache() {
                continue;
            }
            if !sink.peer_has_room(p) {
                return Err(PublishRefused::PeerBufferFull(p.clone()));
            }
        }
        Ok(())
    }

    /// Sends an event to every peer interested in the channel (once each),
    /// and the new cached event of a cache channel to the others.
    pub(super) fn forward(&self, ev: &Event<'_>, tags: &Tags, sink: &mut impl Sink<H>) {
        if self.peers.is_empty() {
            return;
        }
        let app_id = self.app_id(ev.app);
        let remote = self.tables[ev.app.0 as usize].remote.get(ev.channel);
        let interested = remote.map(|r| &r.interested);
        if let (Some(r), Some(interested)) = (remote, interested.filter(|i| !i.is_empty())) {
            let mut frame = None;
            for to in interested.iter().filter(|p| peer_wants(r, p, tags)) {
                let frame = frame.get_or_insert_with(|| publish_frame(app_id, ev, tags));
                sink.peer(to, FrameKind::Data, frame);
            }
        }
        let n = interested.map_or(0, BTreeSet::len);
        if ev.channel.is_cache() && n < self.peers.len() {
            let frame = PeerFrame::CacheSet {
                app: app_id.to_owned(),
                channel: ev.channel.to_string(),
                event: ev.name.to_owned(),
                data: ev.data.to_owned(),
                age_ms: 0,
            }
            .encode();
            for to in &self.peers {
                if !interested.is_some_and(|i| i.contains(to)) {
                    sink.peer(to, FrameKind::Data, &frame);
                }
            }
        }
    }

    /// A peer's frame for a channel of this shard (see
    /// [`PeerFrame::channel`]); other frames are not the shard's.
    pub fn handle_channel_frame(
        &mut self,
        now: Instant,
        frame: PeerFrame,
        sink: &mut impl Sink<H>,
    ) {
        match frame {
            PeerFrame::Publish {
                app,
                channel,
                event,
                data,
                exclude,
                user_id,
            } => self.deliver_remote(
                now,
                &app,
                &channel,
                &event,
                &data,
                exclude.as_deref(),
                user_id.as_deref(),
                sink,
            ),
            PeerFrame::CacheSet {
                app,
                channel,
                event,
                data,
                age_ms,
            } => self.cache_set(now, &app, &channel, &event, &data, age_ms),
            PeerFrame::TaggedPublish {
                app,
                channel,
                event,
                data,
                exclude,
                tags,
            } => self.deliver_remote_tagged(
                now,
                &app,
                &channel,
                &event,
                &data,
                exclude.as_deref(),
                tags,
                sink,
            ),
            PeerFrame::HistoryPublish {
                app,
                channel,
                event,
                data,
                exclude,
                user_id,
                origin,
                seq,
                at_ms,
                tags,
            } => self.deliver_history(
                now,
                &app,
                &channel,
                &event,
                &data,
                exclude.as_deref(),
                user_id.as_deref(),
                (origin, seq, at_ms),
                tags,
                sink,
            ),
            PeerFrame::HistorySync {
                app,
                channel,
                base,
                events,
            } => self.merge_history(now, &app, &channel, &base, events, sink),
            f @ (PeerFrame::PresenceClaim { .. } | PeerFrame::PresenceGrant { .. }) => {
                self.handle_presence_frame(now, f, sink)
            }
            _ => {}
        }
    }
}

/// The frame of a publish for peers: tagged events carry their tags.
fn publish_frame(app_id: &str, ev: &Event<'_>, tags: &Tags) -> bytes::Bytes {
    if tags.is_empty() {
        PeerFrame::Publish {
            app: app_id.to_owned(),
            channel: ev.channel.to_string(),
            event: ev.name.to_owned(),
            data: ev.data.to_owned(),
            exclude: ev.exclude_socket.map(str::to_owned),
            user_id: ev.user_id.map(str::to_owned),
        }
    } else {
        PeerFrame::TaggedPublish {
            app: app_id.to_owned(),
            channel: ev.channel.to_string(),
            event: ev.name.to_owned(),
            data: ev.data.to_owned(),
            exclude: ev.exclude_socket.map(str::to_owned),
            tags: tags.to_pairs(),
        }
    }
    .encode()
}
