//! Message history through the test driver: a channel's history page, as
//! the server's HTTP endpoint asks its shard for it.

use pushmesh_protocol::ChannelName;

use super::Core;
use crate::app::AppIdx;
use crate::router::{HistoryError, HistoryPage};

impl Core {
    /// A page of a channel's history as this node holds it.
    pub fn history_page(
        &self,
        app: AppIdx,
        channel: &ChannelName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<HistoryPage, HistoryError> {
        let i = self.shard(app, channel.as_str());
        self.shards[i]
            .shard()
            .history_page(app, channel, after, limit)
    }
}
