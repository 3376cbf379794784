//! Publishing through the test driver: the HTTP API's publish and the
//! wsify commands (join, leave, broadcast).

use std::time::Instant;

use pushmesh_protocol::ChannelName;
use serde_json::value::RawValue;

use super::{CollectSink, Core, PublishedChannel};
use crate::app::{AppIdx, ConnId, PublishError, PublishRequest, Refusal};
use crate::router::Event;

impl Core {
    /// Publishes one event from the HTTP API.
    pub fn publish(
        &mut self,
        now: Instant,
        app: AppIdx,
        req: &PublishRequest<'_>,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        self.publish_with(now, app, req, None)
    }

    /// A publish, with tags or without (`Core::publish_tagged`).
    pub(super) fn publish_with(
        &mut self,
        now: Instant,
        app: AppIdx,
        req: &PublishRequest<'_>,
        tags: Option<&crate::filter::Tags>,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        let names = self.apps.validate_publish(app, req)?;
        let mut published = Vec::with_capacity(names.len());
        for name in names {
            let i = self.shard(app, name.as_str());
            let ev = Event {
                app,
                channel: &name,
                name: req.name,
                data: req.data,
                content: None,
                exclude_socket: req.exclude_socket,
                user_id: None,
            };
            let mut sink = sink!(self);
            let shard = &mut self.shards[i];
            match tags {
                Some(t) => shard.publish_tagged(now, &ev, t, true, &mut sink),
                None => shard.publish(now, &ev, true, &mut sink),
            }
            .map_err(|_| PublishError::Unavailable(Refusal::PeerBufferFull))?;
            let info = self.shards[i].info(now, app, &name);
            published.push(PublishedChannel { name, info });
        }
        Ok(published)
    }

    /// Checks a channel name a wsify client may use.
    pub fn wsify_channel(&self, conn: ConnId, channel: &str) -> Result<ChannelName, String> {
        match self.sessions.get(&conn) {
            Some(s) => s.wsify_channel(channel),
            None => Err("no such connection".into()),
        }
    }

    /// wsify `join`: idempotent; `position` recovers on a history channel.
    pub fn wsify_join(
        &mut self,
        conn: ConnId,
        channel: &str,
        position: Option<&str>,
    ) -> Result<(), String> {
        let r = match self.sessions.get_mut(&conn) {
            Some(s) => s.wsify_join(channel, position),
            None => Ok(()),
        };
        self.pump(Instant::now(), conn);
        r
    }

    /// wsify `leave`.
    pub fn wsify_leave(&mut self, conn: ConnId, channel: &str) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.wsify_leave(channel);
        }
        self.pump(Instant::now(), conn);
    }

    /// A wsify `broadcast` (from a client or `POST /broadcast`).
    pub fn wsify_broadcast(
        &mut self,
        now: Instant,
        app: AppIdx,
        channel: &str,
        content: &RawValue,
    ) -> Result<(), PublishError> {
        let name = self.apps.validate_wsify_broadcast(app, channel, content)?;
        let cfg = self.apps.get(app).clone();
        let i = self.shard(app, name.as_str());
        let ev = Event {
            app,
            channel: &name,
            name: &cfg.wsify_event,
            data: content.get(),
            content: Some(content),
            exclude_socket: None,
            user_id: None,
        };
        let mut sink = sink!(self);
        self.shards[i]
            .publish(now, &ev, true, &mut sink)
            .map_err(|_| PublishError::Unavailable(Refusal::PeerBufferFull))
    }
}
