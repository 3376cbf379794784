//! The test driver's publishes with tags and joins with a filter (issue #13).

use std::time::Instant;

use super::{Core, PublishedChannel};
use crate::app::{AppIdx, ConnId, PublishError, PublishRequest};
use crate::filter::Tags;

impl Core {
    /// Publishes one event with tags from the HTTP API.
    pub fn publish_tagged(
        &mut self,
        now: Instant,
        app: AppIdx,
        req: &PublishRequest<'_>,
        tags: &Tags,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        self.publish_with(now, app, req, Some(tags))
    }

    /// wsify `join` with `args.filter`.
    pub fn wsify_join_filtered(
        &mut self,
        conn: ConnId,
        channel: &str,
        filter: Option<&str>,
    ) -> Result<(), String> {
        let r = match self.sessions.get_mut(&conn) {
            Some(s) => s.wsify_join_filtered(channel, filter, None),
            None => Ok(()),
        };
        self.pump(self.now, conn);
        r
    }
}

impl Core {
    /// The identity a trusted load balancer set for a connection (before
    /// its first frame).
    pub fn set_identity(
        &mut self,
        conn: ConnId,
        id: crate::session::Identity,
    ) -> Result<(), crate::session::IdentityError> {
        let r = match self.sessions.get_mut(&conn) {
            Some(s) => s.set_identity(id),
            None => Ok(()),
        };
        self.pump(self.now, conn);
        r
    }
}
