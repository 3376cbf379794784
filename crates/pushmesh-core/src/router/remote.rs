//! A shard and its peers: what they hold (their interest, subscriber counts
//! and presence members per channel, from the replication), the channel
//! messages and cached events they send (the events themselves go through
//! `publish.rs`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::ChannelName;
use serde_json::value::RawValue;

use super::presence::MemberChange;
use super::{Channel, Event, RemoteMember, Shard, CACHE_TTL};
use crate::app::AppIdx;
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
                    let added = MemberChange::Added {
                        user: &user,
                        info: info.as_deref(),
                    };
                    self.member_event(app, &name, added, None, sink);
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
                        let removed = MemberChange::Removed { user: &user };
                        self.member_event(app, &name, removed, None, sink);
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
        if self.tables[app].cache.get(&name).is_some_and(|c| c.at > at) {
            return;
        }
        self.cache_event(at, &Event::new(app, &name, event, data), None);
    }

    /// Sends every live cache entry to a peer whose link just came up, so a
    /// node that joins later answers with the cached event, not a miss.
    pub fn send_cache(&self, now: Instant, to: &NodeId, sink: &mut impl Sink<H>) {
        for (app, t) in self.tables.iter() {
            let app_id = self.app_id(app);
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

    pub(super) fn local_count(&self, app: AppIdx, name: &str) -> usize {
        self.tables[app]
            .channels
            .get(name)
            .map_or(0, Channel::count)
    }
}

impl<H: Handle> Shard<H> {
    /// A peer's frame for a channel of this shard (see
    /// [`PeerFrame::channel`]); other frames are not the shard's.
    pub fn handle_channel_frame(
        &mut self,
        now: Instant,
        frame: PeerFrame,
        sink: &mut impl Sink<H>,
    ) {
        match frame {
            PeerFrame::Event(e) => self.deliver_peer_event(now, e, sink),
            PeerFrame::CacheSet {
                app,
                channel,
                event,
                data,
                age_ms,
            } => self.cache_set(now, &app, &channel, &event, &data, age_ms),
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
