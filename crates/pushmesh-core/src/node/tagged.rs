//! The test driver's joins with a filter (issue #13).

use super::Core;
use crate::app::ConnId;

impl Core {
    /// wsify `join` with `args.filter`.
    pub fn wsify_join_filtered(
        &mut self,
        conn: ConnId,
        channel: &str,
        filter: Option<&str>,
    ) -> Result<(), crate::session::WsifyJoinError> {
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
