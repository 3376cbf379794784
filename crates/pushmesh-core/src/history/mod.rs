//! Message history: which channels keep it (per app), and one shard's
//! store of it, bounded by count, age and memory.
//!
//! Every node keeps the history of every history channel (publishes on
//! them go to every peer), numbered per origin; see `docs/history.md` for
//! the design and its guarantees. The router uses the store
//! (`router/history.rs`); this module knows nothing of connections.

pub mod log;
pub mod position;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use pushmesh_protocol::ChannelName;

pub use crate::app::AppHistory;
use crate::app::AppIdx;
pub use log::{Appended, ChannelLog, Check, Stored};
pub use position::{BadPosition, Origin, Position};

/// Default `history_max_bytes`: 256 MiB per node.
pub const MAX_BYTES: usize = 256 << 20;

/// An event to store: its number (origin and sequence), when it arrived
/// here (`at`, for the ttl) and was published (`at_ms`), and its content.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// The publishing incarnation.
    pub origin: Origin,
    /// Its number among the origin's events on the channel.
    pub seq: u64,
    /// When this node got it.
    pub at: Instant,
    /// When it was published, Unix ms.
    pub at_ms: u64,
    /// Event name.
    pub event: &'a str,
    /// Data.
    pub data: &'a str,
    /// `user_id` of a presence client event.
    pub user_id: Option<&'a str>,
    /// Its tags.
    pub tags: crate::filter::Tags,
}

/// Counters of a shard's history store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Events held.
    pub events: usize,
    /// Bytes held.
    pub bytes: usize,
    /// Events evicted because a channel had `max_events`.
    pub evicted_max_events: u64,
    /// Events evicted because the node had `history_max_bytes`.
    pub evicted_memory: u64,
    /// Events expired (`ttl_secs`).
    pub expired: u64,
    /// Subscriptions that asked for a position and recovered.
    pub recovered: u64,
    /// Subscriptions that asked for a position and did not.
    pub not_recovered: u64,
}

/// Why an event left the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    MaxEvents,
    Memory,
    Expired,
}

type Key = (AppIdx, ChannelName);

/// One shard's history: a log per channel and, across them, the order the
/// events came in (for eviction by memory and expiry).
#[derive(Debug)]
pub struct HistoryStore {
    origin: Origin,
    budget: usize,
    next_id: u64,
    logs: HashMap<Key, ChannelLog>,
    /// (channel, event id, when it came): per channel in log order.
    order: VecDeque<(Key, u64, Instant)>,
    /// A wall-clock reading and the instant it was taken.
    clock: (Instant, u64),
    /// Counters.
    pub stats: HistoryStats,
}

impl HistoryStore {
    /// A store for a shard of the node whose own origin is `origin`,
    /// holding at most `budget` bytes; `clock` maps instants to Unix ms.
    pub fn new(origin: Origin, budget: usize, clock: (Instant, u64)) -> Self {
        Self {
            origin,
            budget,
            next_id: 0,
            logs: HashMap::new(),
            order: VecDeque::new(),
            clock,
            stats: HistoryStats::default(),
        }
    }

    /// This node's origin.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Unix ms at `now`.
    pub fn wall_ms(&self, now: Instant) -> u64 {
        let (at, ms) = self.clock;
        match now.checked_duration_since(at) {
            Some(d) => ms.saturating_add(d.as_millis() as u64),
            None => ms.saturating_sub(at.duration_since(now).as_millis() as u64),
        }
    }

    /// A channel's log, if it has one.
    pub fn log(&self, app: AppIdx, name: &ChannelName) -> Option<&ChannelLog> {
        self.logs.get(&(app, name.clone()))
    }

    /// The next sequence number of this node's own events on a channel.
    pub fn next_own_seq(&self, app: AppIdx, name: &ChannelName) -> u64 {
        self.log(app, name).map_or(1, |l| l.next_seq(self.origin))
    }

    /// A new event with a fresh id.
    pub fn event(&mut self, e: NewEvent<'_>) -> Stored {
        self.next_id += 1;
        Stored {
            origin: e.origin,
            seq: e.seq,
            id: self.next_id,
            at: e.at,
            at_ms: e.at_ms,
            event: e.event.into(),
            data: e.data.into(),
            user_id: e.user_id.map(Into::into),
            tags: e.tags,
        }
    }

    /// Appends an event to a channel's log, then enforces `max_events`
    /// and the memory budget.
    pub fn append(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
        e: Stored,
        max_events: usize,
    ) -> Appended {
        let key = (app, name.clone());
        let (id, at) = (e.id, e.at);
        let log = self.logs.entry(key.clone()).or_default();
        let before = log.bytes();
        let (appended, dropped) = log.append(e);
        let after = log.bytes();
        self.stats.bytes = self.stats.bytes + after - before;
        if appended == Appended::Duplicate {
            return appended;
        }
        self.stats.events = self.stats.events + 1 - dropped.len();
        self.order.push_back((key.clone(), id, at));
        self.compact();
        self.trim(&key, max_events);
        appended
    }

    /// Enforces a channel's `max_events`, then the memory budget.
    fn trim(&mut self, key: &Key, max_events: usize) {
        while self
            .logs
            .get(key)
            .is_some_and(|l| l.len() > max_events.max(1))
        {
            self.evict_front(key, Gone::MaxEvents);
        }
        self.enforce_budget();
    }

    /// Merges a peer's copy of a channel's history (see [`ChannelLog::merge`]).
    pub fn merge(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
        events: Vec<Stored>,
        base: &Position,
        extend: bool,
        max_events: usize,
    ) -> usize {
        let key = (app, name.clone());
        let log = self.logs.entry(key.clone()).or_default();
        let before = (log.len(), log.bytes());
        let n = log.merge(events, base, extend);
        let after = (log.len(), log.bytes());
        if n == 0 {
            if log.is_empty() && log.head().entries().next().is_none() {
                self.logs.remove(&key);
            }
            return 0;
        }
        self.stats.events = self.stats.events + after.0 - before.0;
        self.stats.bytes = self.stats.bytes + after.1 - before.1;
        // Renumber the channel's events in log order (ids increase along
        // every log) and rebuild its place in the order: where its oldest
        // event belongs by age.
        let log = self.logs.get_mut(&key).expect("just merged");
        log.renumber(&mut self.next_id);
        self.order.retain(|(k, _, _)| *k != key);
        let ids: Vec<(Key, u64, Instant)> =
            log.events().map(|e| (key.clone(), e.id, e.at)).collect();
        let first = ids.first().map(|e| e.2);
        let pos = self
            .order
            .iter()
            .position(|(_, _, at)| first.is_some_and(|f| *at > f))
            .unwrap_or(self.order.len());
        let tail = self.order.split_off(pos);
        self.order.extend(ids);
        self.order.extend(tail);
        self.trim(&key, max_events);
        n
    }

    /// Drops events older than their app's ttl (in arrival order).
    pub fn expire(&mut self, now: Instant, ttl_of: impl Fn(AppIdx) -> Option<Duration>) {
        while let Some((key, id, at)) = self.order.front() {
            let ttl = ttl_of(key.0).unwrap_or(Duration::ZERO);
            if now.saturating_duration_since(*at) < ttl {
                break;
            }
            let (key, id) = (key.clone(), *id);
            self.order.pop_front();
            if self.front_is(&key, id) {
                self.pop(&key, Gone::Expired);
                if self.logs.get(&key).is_some_and(ChannelLog::is_empty) {
                    self.logs.remove(&key);
                }
            }
        }
    }

    fn front_is(&self, key: &Key, id: u64) -> bool {
        self.logs
            .get(key)
            .and_then(ChannelLog::front)
            .is_some_and(|e| e.id == id)
    }

    /// Whether an entry of the order still names a held event (ids
    /// increase along a log; a gap's dropped events may still pass, and are
    /// skipped when they reach the front).
    fn live(&self, key: &Key, id: u64) -> bool {
        self.logs
            .get(key)
            .and_then(ChannelLog::front)
            .is_some_and(|f| f.id <= id)
    }

    /// Drops the order's entries of evicted events once they are as many
    /// as the held ones (amortised O(1) per append).
    fn compact(&mut self) {
        if self.order.len() > 2 * self.stats.events + 64 {
            let order = std::mem::take(&mut self.order);
            self.order = order
                .into_iter()
                .filter(|(k, id, _)| self.live(k, *id))
                .collect();
        }
    }

    fn enforce_budget(&mut self) {
        while self.stats.bytes > self.budget {
            let Some((key, id, _)) = self.order.pop_front() else {
                break;
            };
            if self.front_is(&key, id) {
                self.pop(&key, Gone::Memory);
                if self.logs.get(&key).is_some_and(ChannelLog::is_empty) {
                    self.logs.remove(&key);
                }
            }
        }
    }

    /// Evicts a channel's oldest event; its entry in the order goes stale.
    fn evict_front(&mut self, key: &Key, why: Gone) {
        self.pop(key, why);
    }

    fn pop(&mut self, key: &Key, why: Gone) {
        let Some(e) = self.logs.get_mut(key).and_then(ChannelLog::pop_front) else {
            return;
        };
        self.stats.events -= 1;
        self.stats.bytes -= e.bytes();
        match why {
            Gone::MaxEvents => self.stats.evicted_max_events += 1,
            Gone::Memory => self.stats.evicted_memory += 1,
            Gone::Expired => self.stats.expired += 1,
        }
    }

    /// Channels with history here (for a peer that joins).
    pub fn channels(&self) -> impl Iterator<Item = (&AppIdx, &ChannelName, &ChannelLog)> {
        self.logs.iter().map(|((a, n), l)| (a, n, l))
    }
}

#[cfg(test)]
mod tests;
