//! Publishing through the test driver: the HTTP API's publish and the
//! wsify commands (join, leave, broadcast).

use std::time::Instant;

use pushmesh_protocol::ChannelName;
use serde_json::value::RawValue;

use super::{CollectSink, Core, PublishedChannel};
use crate::app::{AppIdx, ConnId, PublishError, PublishRequest};
use crate::router::{Event, Publish};
use crate::session::WsifyJoinError;

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

    /// Publishes one event from the HTTP API, with tags (issue #13) or
    /// without (`None`, as [`Core::publish`]).
    pub fn publish_with(
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
            self.shards[i]
                .publish(now, &Publish { event: ev, tags }, &mut sink)
                .map_err(|e| PublishError::Unavailable(e.to_string()))?;
            let info = self.shards[i].info(now, app, &name);
            published.push(PublishedChannel { name, info });
        }
        Ok(published)
    }

    /// Checks a channel name a wsify client may use.
    pub fn wsify_channel(
        &self,
        conn: ConnId,
        channel: &str,
    ) -> Result<ChannelName, WsifyJoinError> {
        match self.sessions.get(&conn) {
            Some(s) => s.wsify_channel(channel),
            None => Err(WsifyJoinError::NoConnection),
        }
    }

    /// wsify `join`: idempotent; `position` recovers on a history channel.
    pub fn wsify_join(
        &mut self,
        conn: ConnId,
        channel: &str,
        position: Option<&str>,
    ) -> Result<(), WsifyJoinError> {
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
            .publish(now, &Publish::from(ev), &mut sink)
            .map_err(|e| PublishError::Unavailable(e.to_string()))
    }
}
