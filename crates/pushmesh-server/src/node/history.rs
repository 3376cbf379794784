//! The node's side of message history: the HTTP history query, and the
//! shards' history counters for `/metrics` (read without asking a shard).

use std::sync::atomic::{AtomicU64, Ordering};

use pushmesh_core::history::HistoryStats;
use pushmesh_core::{AppIdx, HistoryError, HistoryPage};
use pushmesh_protocol::ChannelName;

use super::Node;

/// A shard's history counters, as it last reported them.
#[derive(Default)]
pub(super) struct HistorySlots([AtomicU64; 7]);

impl HistorySlots {
    pub(super) fn store(&self, s: HistoryStats) {
        let v = [
            s.events as u64,
            s.bytes as u64,
            s.evicted_max_events,
            s.evicted_memory,
            s.expired,
            s.recovered,
            s.not_recovered,
        ];
        for (slot, v) in self.0.iter().zip(v) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    fn load(&self) -> HistoryStats {
        let v: Vec<u64> = self.0.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        HistoryStats {
            events: v[0] as usize,
            bytes: v[1] as usize,
            evicted_max_events: v[2],
            evicted_memory: v[3],
            expired: v[4],
            recovered: v[5],
            not_recovered: v[6],
        }
    }
}

/// Why a history query failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryQueryError {
    /// A bad channel name.
    #[error("invalid channel name {0:?}")]
    Channel(String),
    /// Refused by the shard (no history, bad position).
    #[error(transparent)]
    History(#[from] HistoryError),
    /// The shard is gone (the node is stopping).
    #[error("the node is stopping")]
    Stopping,
}

impl Node {
    /// `GET /apps/{app_id}/channels/{channel}/history`: this node's copy
    /// (every node keeps every history channel's events).
    pub async fn history_page(
        &self,
        app: AppIdx,
        channel: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<HistoryPage, HistoryQueryError> {
        let name = ChannelName::parse_with_limit(channel, usize::MAX)
            .map_err(|_| HistoryQueryError::Channel(channel.to_owned()))?;
        let shard = self.shard(app, name.as_str()).clone();
        self.ask(&shard, move |sh, _| {
            sh.history_page(app, &name, after.as_deref(), limit)
        })
        .await
        .ok_or(HistoryQueryError::Stopping)?
        .map_err(Into::into)
    }

    /// History counters summed over the shards.
    pub fn history_stats(&self) -> HistoryStats {
        let mut t = HistoryStats::default();
        for s in &self.slots {
            let h = s.1.load();
            t.events += h.events;
            t.bytes += h.bytes;
            t.evicted_max_events += h.evicted_max_events;
            t.evicted_memory += h.evicted_memory;
            t.expired += h.expired;
            t.recovered += h.recovered;
            t.not_recovered += h.not_recovered;
        }
        t
    }
}
