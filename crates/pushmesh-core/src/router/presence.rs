//! Presence channels in a shard: members (local and on peers), member
//! limits, `member_added` / `member_removed`.

use std::time::Instant;

use pushmesh_protocol::server::{self, MemberRef, Recovery};
use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::ChannelName;
use serde_json::value::RawValue;

use super::history::Answer;
use super::presence_limit::{full, Admission};
use super::{Channel, Joining, Member, Shard};
use crate::app::AppIdx;
use crate::peer_frame::Delta;
use crate::session::{PresenceJoin, Proto};
use crate::sink::{Handle, Sink};

/// A presence member that joined or left a channel (cluster-wide).
#[derive(Debug, Clone, Copy)]
pub(super) enum MemberChange<'a> {
    /// `member_added`, with its `user_info`.
    Added {
        user: &'a str,
        info: Option<&'a RawValue>,
    },
    /// `member_removed`.
    Removed { user: &'a str },
}

impl<H: Handle> Shard<H> {
    /// Adds a presence subscriber; false if refused (channel full) or
    /// parked until the channel's owner admits it (see `presence_limit.rs`).
    pub(super) fn subscribe_presence(
        &mut self,
        now: Instant,
        j: Joining<H>,
        join: PresenceJoin,
        admission: Admission,
        sink: &mut impl Sink<H>,
    ) -> bool {
        let (app, name) = (j.app, &j.name);
        let conn = j.h.conn();
        let max_members = self.apps.get(app).limits.max_presence_members;
        let user_id = join.user_id;
        let remote_has = self.remote_member(app, name.as_str(), &user_id);
        let t = &self.tables[app];
        if t.channels
            .get(name)
            .is_some_and(|c| c.subs.contains_key(&conn))
        {
            // Already subscribed: answer again, change nothing.
            let fresh = self
                .keeps_history(app, name.as_str())
                .map(|_| Answer::Fresh);
            let frame = self.presence_frame(app, name, fresh.as_ref());
            sink.send(&j.h, &frame);
            return true;
        }
        if self.is_parked(conn, app, name) {
            // Subscribed again while the owner decides: one answer is coming.
            return false;
        }
        let is_new_local = !t.channels.get(name).is_some_and(|c| c.has_member(&user_id));
        let is_new_member = is_new_local && !remote_has;
        if is_new_member && admission == Admission::Ask && self.must_ask(app, name) {
            let join = PresenceJoin {
                user_id,
                info: join.info,
                position: join.position,
            };
            self.ask_owner(now, j, join, sink);
            return false;
        }
        if is_new_member
            && admission != Admission::Granted
            && self.member_count(app, name.as_str()) + self.reservations(now, app, name)
                >= max_members
        {
            sink.send(&j.h, &full(name));
            return false;
        }
        let Joining { h, app, name } = j;
        let name = &name;
        let info_json = join.info.as_ref().map(|i| i.get().to_owned());
        let position = join.position;
        let t = self.table(app);
        let ch = t.channels.entry(name.clone()).or_default();
        let occupied = ch.count() == 0;
        let p = ch.presence.get_or_insert_with(Box::default);
        if is_new_local {
            p.members.insert(
                user_id.clone(),
                Member {
                    info: join.info,
                    conns: 1,
                },
            );
        } else if let Some(m) = p.members.get_mut(&user_id) {
            m.conns += 1;
        }
        p.of.insert(conn, user_id.clone());
        ch.insert(conn, h.clone(), Proto::Pusher);
        t.dirty_counts.insert(name.clone());
        self.counted(name, occupied, 1);
        if occupied {
            self.local_interest(app, name, true, sink);
        }
        if is_new_local {
            sink.replicate(Delta::Member {
                app: self.app_id(app).to_owned(),
                channel: name.to_string(),
                user: user_id.clone(),
                info: info_json.clone(),
                add: true,
            });
        }
        if is_new_member {
            // To the subscribers already there, not to the joining connection.
            let info = info_json.and_then(|s| RawValue::from_string(s).ok());
            let added = MemberChange::Added {
                user: &user_id,
                info: info.as_deref(),
            };
            self.member_event(app, name, added, Some(&h), sink);
        }
        self.admitted(conn, app, name, sink);
        if !self.peers.is_empty() {
            sink.hold(&h);
        }
        // On a history channel: recovered or not, at once (a position
        // ahead of this node is not waited for on presence channels).
        let answer = self.keeps_history(app, name.as_str()).map(|_| {
            self.history_answer(app, name, position.as_deref())
                .unwrap_or(Answer::Lost)
        });
        let frame = self.presence_frame(app, name, answer.as_ref());
        sink.send(&h, &frame);
        if let Some(Answer::Recovered(from)) = &answer {
            self.replay(&h, app, name, Proto::Pusher, from, sink);
        }
        true
    }

    /// The last local connection of a member left the channel.
    pub(super) fn member_left(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
        uid: String,
        sink: &mut impl Sink<H>,
    ) {
        sink.replicate(Delta::Member {
            app: self.app_id(app).to_owned(),
            channel: name.to_string(),
            user: uid.clone(),
            info: None,
            add: false,
        });
        if !self.remote_member(app, name.as_str(), &uid) {
            self.member_event(app, name, MemberChange::Removed { user: &uid }, None, sink);
        }
    }

    /// Whether a user is a presence member of a channel on some peer.
    pub(super) fn remote_member(&self, app: AppIdx, name: &str, user: &str) -> bool {
        self.tables[app]
            .remote
            .get(name)
            .is_some_and(|r| r.members.contains_key(user))
    }

    /// Sends `member_added` / `member_removed` to the local subscribers of a
    /// channel (but `skip`) and fires the webhook.
    pub(super) fn member_event(
        &self,
        app: AppIdx,
        name: &ChannelName,
        change: MemberChange<'_>,
        skip: Option<&H>,
        sink: &mut impl Sink<H>,
    ) {
        let (frame, user, add) = match change {
            MemberChange::Added { user, info } => {
                (server::member_added(name.as_str(), user, info), user, true)
            }
            MemberChange::Removed { user } => {
                (server::member_removed(name.as_str(), user), user, false)
            }
        };
        if let Some(ch) = self.tables[app].channels.get(name) {
            let skip = skip.map(Handle::conn);
            for (c, h) in ch.pusher() {
                if Some(*c) != skip {
                    sink.send(h, &frame);
                }
            }
        }
        let channel = name.to_string();
        let user_id = user.to_owned();
        let event = if add {
            WebhookEvent::MemberAdded { channel, user_id }
        } else {
            WebhookEvent::MemberRemoved { channel, user_id }
        };
        self.hook(app, name.as_str(), event, sink);
    }

    /// Presence members of a channel, cluster-wide: local ones, then remote ones.
    pub(super) fn members_union(
        &self,
        app: AppIdx,
        name: &str,
    ) -> Vec<(String, Option<Box<RawValue>>)> {
        let t = &self.tables[app];
        let local = t.channels.get(name);
        let mut out: Vec<(String, Option<Box<RawValue>>)> = local
            .map(|c| {
                c.members()
                    .map(|(id, m)| (id.clone(), m.info.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(r) = t.remote.get(name) {
            for (id, m) in &r.members {
                if !local.is_some_and(|c| c.has_member(id)) {
                    out.push((id.clone(), m.info.clone()));
                }
            }
        }
        out
    }

    /// Distinct members of a channel, cluster-wide.
    pub(super) fn member_count(&self, app: AppIdx, name: &str) -> usize {
        let t = &self.tables[app];
        let local = t.channels.get(name);
        let remote_only = t.remote.get(name).map_or(0, |r| {
            r.members
                .keys()
                .filter(|id| !local.is_some_and(|c| c.has_member(id)))
                .count()
        });
        local.map_or(0, Channel::member_count) + remote_only
    }

    fn presence_frame(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
        a: Option<&Answer>,
    ) -> bytes::Bytes {
        let fields = a.map(|a| self.recovery_fields(app, name, a));
        let members = self.members_union(app, name.as_str());
        server::presence_subscription_succeeded(
            name.as_str(),
            members.iter().map(|(id, info)| MemberRef {
                id: id.as_str(),
                info: info.as_deref(),
            }),
            fields.as_ref().map(|(recovered, position)| Recovery {
                recovered: *recovered,
                position,
            }),
        )
    }
}
