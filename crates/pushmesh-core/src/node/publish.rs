//! Publishing through the test driver: the HTTP API's publish and the
//! wsify commands (join, leave, broadcast).

use std::sync::Arc;
use std::time::Instant;

use pushmesh_protocol::ChannelName;
use serde_json::value::RawValue;

use super::{CollectSink, Core, PublishedChannel};
use crate::app::{AppIdx, ConnId, PublishError, PublishRequest, Refusal};
use crate::machine::{ShardInput, ShardPublish};
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
    /// without (`None`, as [`Core::publish`]): each channel's shard takes
    /// it as the server's shard task does; refused (503) if any interested
    /// peer's buffer was full for one of them.
    pub fn publish_with(
        &mut self,
        now: Instant,
        app: AppIdx,
        req: &PublishRequest<'_>,
        tags: Option<&crate::filter::Tags>,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        let names = self.apps.validate_publish(app, req)?;
        let tags = tags.map(|t| Arc::new(t.clone()));
        let mut published = Vec::with_capacity(names.len());
        let mut refused = false;
        for p in ShardPublish::each(app, names, req, tags, true) {
            let name = p.channel.clone();
            match self.publish_one(now, p) {
                Some(Ok(info)) => published.push(PublishedChannel { name, info }),
                _ => refused = true,
            }
        }
        if refused {
            return Err(PublishError::Unavailable(Refusal::PeerBufferFull));
        }
        Ok(published)
    }

    /// One channel's publish through its shard; its answer.
    fn publish_one(
        &mut self,
        now: Instant,
        p: ShardPublish,
    ) -> Option<Result<crate::router::ChannelInfo, crate::router::PublishRefused>> {
        self.now = self.now.max(now);
        let i = self.shard(p.app, p.channel.as_str());
        let mut sink = sink!(self);
        self.shards[i].handle(now, ShardInput::Publish(p, ()), &mut sink);
        self.flush_deltas();
        self.answer.take()
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
        self.pump(self.now, conn);
        r
    }

    /// wsify `leave`.
    pub fn wsify_leave(&mut self, conn: ConnId, channel: &str) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.wsify_leave(channel);
        }
        self.pump(self.now, conn);
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
        let content: Arc<RawValue> = Arc::from(content.to_owned());
        let p = ShardPublish {
            app,
            channel: name,
            event: Arc::from(self.apps.get(app).wsify_event.as_str()),
            data: Arc::from(content.get()),
            content: Some(content),
            exclude: None,
            tags: None,
            info: false,
        };
        match self.publish_one(now, p) {
            Some(Ok(_)) => Ok(()),
            _ => Err(PublishError::Unavailable(Refusal::PeerBufferFull)),
        }
    }
}
